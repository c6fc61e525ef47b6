"""Pushing SAEs to the Hub and loading them back, through the real client and a local Hub.

The first tests pin down the local Hub itself (`hub_server.py`): it must answer the real
`huggingface_hub` client the way huggingface.co does, or the SAE tests below prove nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, RepoCard, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from transformers import AutoModel

from hf_deepsae import DeepSAEConfig, DeepSAEModel
from hf_deepsae.hub import (
    load_sae,
    load_saes,
    push_sae_to_hub,
    push_saes_to_hub,
    sae_subfolders,
    save_sae,
    save_saes,
)
from hf_deepsae.model_card import describe_architecture, sae_card

pytest_plugins = ["hub_server"]


# -- the local Hub speaks the Hub API ----------------------------------------------------------
def test_whoami_names_the_token_owner_and_refuses_unknown_tokens(hub):
    assert HfApi().whoami()["name"] == hub.user
    with pytest.raises(HfHubHTTPError, match="Invalid user token") as error:
        HfApi(token="hf_not_a_real_token").whoami()
    assert error.value.response.status_code == 401


def test_upload_then_download_round_trips_bytes_and_reports_the_commit(hub):
    api = HfApi()
    repo_id = api.create_repo("round-trip").repo_id
    commit = api.upload_file(path_or_fileobj=b"\x00weights", path_in_repo="w.bin", repo_id=repo_id)
    path = hf_hub_download(repo_id, "w.bin")
    assert repo_id == f"{hub.user}/round-trip"
    assert Path(path).read_bytes() == b"\x00weights"
    assert api.model_info(repo_id).sha == commit.oid


def test_create_repo_is_idempotent_with_exist_ok_and_conflicts_without(hub):
    api = HfApi()
    api.create_repo("twice")
    assert api.create_repo("twice", exist_ok=True).repo_id == f"{hub.user}/twice"
    with pytest.raises(HfHubHTTPError) as error:
        api.create_repo("twice")
    assert error.value.response.status_code == 409


def test_folders_list_and_snapshot_with_subfolders(hub, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.json").write_text("{}")
    (tmp_path / "top.txt").write_text("top")
    api = HfApi()
    repo_id = api.create_repo("folders").repo_id
    api.upload_folder(folder_path=tmp_path, repo_id=repo_id)
    assert set(api.list_repo_files(repo_id)) == {".gitattributes", "a/x.json", "top.txt"}
    snapshot = snapshot_download(repo_id, allow_patterns=["a/*"])
    assert (Path(snapshot) / "a" / "x.json").read_text() == "{}"
    assert hub.files(repo_id)["top.txt"] == b"top"


def test_unchanged_files_are_not_committed_again(hub):
    api = HfApi()
    repo_id = api.create_repo("no-op").repo_id
    first = api.upload_file(path_or_fileobj=b"same", path_in_repo="f.txt", repo_id=repo_id)
    second = api.upload_file(path_or_fileobj=b"same", path_in_repo="f.txt", repo_id=repo_id)
    assert first.oid == second.oid


def test_branches_hold_their_own_files(hub):
    api = HfApi()
    repo_id = api.create_repo("branchy").repo_id
    api.upload_file(path_or_fileobj=b"main", path_in_repo="f.txt", repo_id=repo_id)
    api.create_branch(repo_id, branch="v2")
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="f.txt", repo_id=repo_id, revision="v2")
    assert Path(hf_hub_download(repo_id, "f.txt")).read_bytes() == b"main"
    assert Path(hf_hub_download(repo_id, "f.txt", revision="v2")).read_bytes() == b"v2"
    assert {ref.name for ref in api.list_repo_refs(repo_id).branches} == {"main", "v2"}


def test_private_repos_are_hidden_from_other_users_and_anonymous_callers(hub):
    api = HfApi()
    repo_id = api.create_repo("secret", private=True).repo_id
    api.upload_file(path_or_fileobj=b"s", path_in_repo="s.txt", repo_id=repo_id)
    assert api.model_info(repo_id).private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=hub.other_token).model_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "s.txt", token=False)


def test_missing_entries_and_revisions_raise_the_clients_typed_errors(hub):
    repo_id = HfApi().create_repo("sparse").repo_id
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "nope.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{hub.user}/does-not-exist", "config.json")


def test_commits_to_someone_elses_namespace_are_refused(hub):
    repo_id = HfApi(token=hub.other_token).create_repo("theirs").repo_id
    with pytest.raises(HfHubHTTPError) as error:
        HfApi().upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=repo_id)
    assert error.value.response.status_code == 403


def test_readme_metadata_is_validated_like_the_hub(hub):
    ModelCard("---\nlicense: mit\ntags: [a]\n---\n# ok").validate()
    with pytest.raises(ValueError, match="tags"):
        RepoCard("---\ntags: 3\n---\n# bad").validate(repo_type="model")


# -- SAEs on the Hub ----------------------------------------------------------------------------

D_IN = 8
ARCHITECTURES = {
    "shallow-topk": {},
    "mlp-encoder-batchtopk": {"encoder_hidden": [16], "sparsity": "batchtopk"},
    "deep-jumprelu": {"encoder_hidden": [16], "decoder_hidden": [16, 12], "sparsity": "jumprelu",
                      "layer_norm": True},
    "stacked-relu": {"n_stacked": 2, "sparsity": "relu"},
    "mlp-decoder": {"decoder_hidden": [16]},
    "transcoder": {"transcoder": True, "d_out": 6, "hook_site": "mlp_in"},
    "normalized": {"normalize_input": True},
}
PROVENANCE = {
    "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M",
    "hookpoint": "model.layers.1.mlp.down_proj",
    "layer": 1,
    "training_config": {"dataset": "HuggingFaceFW/fineweb-edu", "num_tokens": 2_000_000,
                        "lr": 3e-4},
    "metrics": {"fvu": 0.25, "l0": 4.0, "dead_fraction": 0.01, "ce_loss_score": 0.93,
                "n_tokens": 4096},
}


def make_sae(name: str = "shallow-topk", **overrides) -> DeepSAEModel:
    torch.manual_seed(0)
    settings = {"d_in": D_IN, "n_latents": 32, "k": 4} | ARCHITECTURES[name] | overrides
    sae = DeepSAEModel(DeepSAEConfig(**settings)).eval()
    if sae.config.normalize_input:
        sae.initialize_from_activations(3 * torch.randn(64, D_IN))
    return sae


def outputs(sae: DeepSAEModel) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(5, sae.config.d_in)
    target = torch.randn(5, sae.config.d_out) if sae.config.transcoder else None
    with torch.no_grad():
        return sae(x, target=target).reconstruction


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_push_then_auto_model_from_pretrained_round_trips(hub, name):
    sae = make_sae(name, **PROVENANCE)
    commit = push_sae_to_hub(sae, "round-trip")
    loaded = AutoModel.from_pretrained(f"{hub.user}/round-trip")
    assert isinstance(loaded, DeepSAEModel)
    assert commit.oid == HfApi().model_info(f"{hub.user}/round-trip").sha
    torch.testing.assert_close(outputs(loaded), outputs(sae), rtol=0, atol=0)


def test_push_to_hub_method_pushes_the_hf_deepsae_card(hub):
    sae = make_sae("deep-jumprelu")
    sae.push_to_hub("inherited", revision="dev")
    loaded = AutoModel.from_pretrained(f"{hub.user}/inherited", revision="dev")
    torch.testing.assert_close(outputs(loaded), outputs(sae), rtol=0, atol=0)
    card = ModelCard.load(hf_hub_download(f"{hub.user}/inherited", "README.md", revision="dev"))
    assert card.data.library_name == "hf_deepsae"
    assert "sparse-autoencoder" in card.data.tags


def test_repo_holds_weights_config_code_card_and_plot(hub):
    density = torch.tensor([0.0, 1e-4, 1e-3, 0.02, 0.3] * 6 + [0.0, 0.0])
    push_sae_to_hub(make_sae(**PROVENANCE), "complete", density_plot=density)
    files = hub.files(f"{hub.user}/complete")
    assert {"config.json", "model.safetensors", "README.md", "feature_density.png",
            "modeling_deepsae.py", "configuration_deepsae.py"} <= set(files)
    assert files["feature_density.png"].startswith(b"\x89PNG")


def test_card_metadata_and_body_come_from_the_sae(hub):
    sae = make_sae(**PROVENANCE)
    push_sae_to_hub(sae, "carded", license="mit")
    card = ModelCard.load(f"{hub.user}/carded")
    assert card.data.library_name == "hf_deepsae"
    assert card.data.license == "mit"
    assert card.data.base_model == ["HuggingFaceTB/SmolLM2-135M"]
    assert card.data.datasets == ["HuggingFaceFW/fineweb-edu"]
    assert {"sparse-autoencoder", "shallow-sae", "topk"} <= set(card.data.tags)
    reported = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert reported == {"fvu": 0.25, "l0": 4.0, "dead_fraction": 0.01, "ce_loss_score": 0.93}
    for fact in ("model.layers.1.mlp.down_proj", "2,000,000 tokens", "| FVU | 0.25 |",
                 f'AutoModel.from_pretrained("{hub.user}/carded")', "splice(model, sae)",
                 describe_architecture(sae.config)):
        assert fact in card.text


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("provenance", [PROVENANCE, {}], ids=["recorded", "bare"])
def test_cards_render_completely_and_validate_for_every_architecture(hub, name, provenance):
    card = sae_card(make_sae(name, **provenance), repo_id="user/sae")
    card.validate()
    assert "None" not in card.content and "{{" not in card.content
    assert f"{make_sae(name).config.n_total_latents:,} latents" in card.text


def test_multi_hookpoint_repo_loads_by_subfolder_and_all_at_once(hub):
    saes = {
        "model.layers.0.mlp.down_proj": make_sae("shallow-topk", hookpoint="model.layers.0.mlp"),
        "model.layers.1.mlp.down_proj": make_sae("deep-jumprelu", **PROVENANCE),
    }
    push_saes_to_hub(saes, "many")
    repo_id = f"{hub.user}/many"
    for name, sae in saes.items():
        loaded = AutoModel.from_pretrained(repo_id, subfolder=name)
        torch.testing.assert_close(outputs(loaded), outputs(sae), rtol=0, atol=0)
    assert list(load_saes(repo_id)) == list(saes)
    readme = ModelCard.load(repo_id)
    assert all(f"[`{name}`]({name}/README.md)" in readme.text for name in saes)
    assert {result.metric_config for result in readme.data.eval_results} == {
        "model.layers.1.mlp.down_proj"}


def test_load_saes_points_single_sae_repos_to_auto_model(hub):
    push_sae_to_hub(make_sae(), "single")
    with pytest.raises(ValueError, match=r"no SAE subfolders.*AutoModel.from_pretrained"):
        load_saes(f"{hub.user}/single")


def test_push_to_a_branch_leaves_main_untouched(hub):
    first, second = make_sae(), make_sae("mlp-decoder")
    push_sae_to_hub(first, "versions")
    push_sae_to_hub(second, "versions", revision="v2")
    repo_id = f"{hub.user}/versions"
    torch.testing.assert_close(outputs(AutoModel.from_pretrained(repo_id)), outputs(first))
    on_branch = AutoModel.from_pretrained(repo_id, revision="v2")
    torch.testing.assert_close(outputs(on_branch), outputs(second))


def test_private_repos_are_private(hub, tmp_path):
    push_sae_to_hub(make_sae(), "hidden", private=True)
    repo_id = f"{hub.user}/hidden"
    assert HfApi().model_info(repo_id).private is True
    assert isinstance(AutoModel.from_pretrained(repo_id), DeepSAEModel)
    with pytest.raises(OSError, match="hidden"):
        AutoModel.from_pretrained(repo_id, token=hub.other_token, cache_dir=tmp_path / "other")


def test_pushing_without_login_says_how_to_log_in(hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PermissionError, match="not logged in.*hf auth login"):
        push_sae_to_hub(make_sae(), "anonymous")


def test_pushing_with_a_rejected_token_says_how_to_fix_it(hub):
    with pytest.raises(PermissionError, match="rejected the token.*hf auth login --force"):
        push_sae_to_hub(make_sae(), "bad-token", token="hf_expired")


@pytest.mark.parametrize("repo_id", ["two/slashes/here", "spaces are bad", "a" * 100, "x--y"])
def test_invalid_repo_ids_are_refused_before_any_upload(hub, repo_id):
    with pytest.raises(ValueError, match="invalid Hub repo id.*namespace/name"):
        push_sae_to_hub(make_sae(), repo_id)
    assert hub.state.repos == {}


def test_foreign_namespaces_are_refused_with_the_writable_ones(hub):
    with pytest.raises(PermissionError, match=f"{hub.other_user}.*{hub.user}"):
        push_sae_to_hub(make_sae(), f"{hub.other_user}/not-mine")
    push_sae_to_hub(make_sae(), f"{hub.org}/shared")
    assert (("model", f"{hub.org}/shared")) in hub.state.repos


@pytest.mark.parametrize("name", ["", "a/b", "..", ".hidden", "README.md"])
def test_subfolder_names_must_be_single_folders(tmp_path, name):
    with pytest.raises(ValueError, match="invalid subfolder name"):
        save_saes({name: make_sae()}, tmp_path)


def test_save_saes_writes_what_load_saes_reads(tmp_path):
    saes = {"layers.0.mlp": make_sae(), "layers.1.mlp": make_sae("stacked-relu")}
    folder = save_saes(saes, tmp_path / "saes", density_plots={"layers.0.mlp": torch.rand(32)})
    loaded = load_saes(folder)
    assert list(loaded) == list(saes)
    for name, sae in saes.items():
        torch.testing.assert_close(outputs(loaded[name]), outputs(sae), rtol=0, atol=0)
    assert (folder / "layers.0.mlp" / "feature_density.png").exists()
    assert "layers.1.mlp" in (folder / "README.md").read_text()


def test_load_sae_takes_one_sae_from_either_layout(tmp_path):
    first, second = make_sae(), make_sae("stacked-relu")
    save_sae(first, tmp_path / "single")
    save_saes({"layers.0.mlp": first}, tmp_path / "one")
    save_saes({"layers.0.mlp": first, "layers.1.mlp": second}, tmp_path / "two")
    for folder in ("single", "one"):
        torch.testing.assert_close(outputs(load_sae(tmp_path / folder)), outputs(first))
    torch.testing.assert_close(outputs(load_sae(tmp_path / "two", "layers.1.mlp")),
                               outputs(second))
    with pytest.raises(ValueError, match=r"holds 2 SAEs .*pick one with subfolder="):
        load_sae(tmp_path / "two")
    with pytest.raises(ValueError, match="no SAE folder at .*not a Hub repo id"):
        load_sae(tmp_path / "missing")


def test_load_sae_reads_hub_repos_of_either_layout(hub):
    push_sae_to_hub(make_sae(), "single")
    push_saes_to_hub({"layers.0.mlp": make_sae("stacked-relu")}, "collection")
    torch.testing.assert_close(outputs(load_sae(f"{hub.user}/single")), outputs(make_sae()))
    loaded = load_sae(f"{hub.user}/collection", "layers.0.mlp")
    torch.testing.assert_close(outputs(loaded), outputs(make_sae("stacked-relu")))


def test_save_sae_copies_a_given_plot_image(tmp_path):
    image = tmp_path / "plot.png"
    image.write_bytes(b"\x89PNG fake")
    folder = save_sae(make_sae(), tmp_path / "sae", density_plot=image)
    assert (folder / "feature_density.png").read_bytes() == b"\x89PNG fake"
    assert "![Histogram" in (folder / "README.md").read_text()


# -- the top of a folder of SAEs -----------------------------------------------------------------
@pytest.mark.parametrize("where", ["local", "hub"])
def test_the_top_of_a_folder_of_saes_names_its_subfolders(hub, tmp_path, where):
    saes = {"layers.0.mlp": make_sae(), "layers.1.mlp": make_sae("stacked-relu")}
    if where == "local":
        path = str(save_saes(saes, tmp_path / "saes"))
    else:
        push_saes_to_hub(saes, "saes")
        path = f"{hub.user}/saes"
    message = rf"{path!r} holds 2 SAEs, one per hookpoint, in the subfolders \['layers.0.mlp', " \
              rf"'layers.1.mlp'\]: load one with AutoModel.from_pretrained\({path!r}, " \
              rf"subfolder='layers.0.mlp'\)"
    with pytest.raises(ValueError, match=message):
        DeepSAEModel.from_pretrained(path)
    with pytest.raises(ValueError, match=r"holds 2 SAEs.*hf_deepsae.load_saes"):
        AutoModel.from_pretrained(path)  # AutoConfig reads the config.json itself
    assert sae_subfolders(path) == list(saes)


def test_a_folder_of_one_sae_loads_without_a_subfolder_from_the_hub(hub):
    push_saes_to_hub({"layers.0.mlp": make_sae("stacked-relu")}, "one")
    torch.testing.assert_close(outputs(load_sae(f"{hub.user}/one")),
                               outputs(make_sae("stacked-relu")))


def test_folders_saved_before_the_top_config_still_load(tmp_path):
    saes = {"layers.0.mlp": make_sae(), "layers.1.mlp": make_sae("stacked-relu")}
    folder = save_saes(saes, tmp_path / "old")
    (folder / "config.json").unlink()
    assert sae_subfolders(folder) == list(saes)
    assert list(load_saes(folder)) == list(saes)


def test_only_the_saes_of_the_latest_save_count(tmp_path):
    folder = tmp_path / "run"
    save_saes({"layers.0.mlp": make_sae(), "layers.1.mlp": make_sae()}, folder)
    save_saes({"layers.1.mlp": make_sae("stacked-relu")}, folder)  # the output folder reused
    torch.testing.assert_close(outputs(load_sae(folder)), outputs(make_sae("stacked-relu")))
