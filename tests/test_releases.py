"""Named releases: `load_sae(release, sae_id)` resolves the registry, offline from the cache too."""

from __future__ import annotations

import re

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants

from hf_deepsae import DeepSAEConfig, DeepSAEModel, list_releases, load_sae, push_saes_to_hub
from hf_deepsae.files import FileFormatError
from hf_deepsae.interop import to_sparsify
from hf_deepsae.releases import REGISTRY_ENV

pytest_plugins = ["hub_server"]


def make_sae(layer: int, **overrides) -> DeepSAEModel:
    torch.manual_seed(layer)
    sae = DeepSAEModel(DeepSAEConfig(d_in=8, n_latents=32, k=4, layer=layer,
                                     base_model_name_or_path="tiny/llama", **overrides)).eval()
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return sae


def outputs(sae: DeepSAEModel) -> torch.Tensor:
    torch.manual_seed(7)
    with torch.no_grad():
        return sae(torch.randn(6, 8)).reconstruction


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode with the Hub unreachable: only the local cache can answer."""
    dead = "http://127.0.0.1:9"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", dead)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        dead + "/{repo_id}/resolve/{revision}/{filename}")


def test_the_packaged_registry_lists_its_releases():
    releases = list_releases()
    release = releases["eleutherai-llama-3-8b-32x"]
    assert (release.repo_id, release.format) == ("EleutherAI/sae-llama-3-8b-32x", "sparsify")
    assert release.subfolder("layers.10") == "layers.10"


def test_a_pushed_collections_card_registers_a_release_that_loads_offline(
        hub, tmp_path, monkeypatch):
    saes = {f"model.layers.{layer}.mlp.down_proj": make_sae(layer) for layer in (0, 1)}
    push_saes_to_hub(saes, "tiny-saes")
    card = ModelCard.load(f"{hub.user}/tiny-saes").text
    entry = re.search(r"```yaml\n(.*?)```", card, re.DOTALL).group(1)
    (tmp_path / "releases.yaml").write_text(entry)
    monkeypatch.setenv(REGISTRY_ENV, str(tmp_path / "releases.yaml"))
    assert list_releases()["tiny-saes"].sae_ids == {
        "layer_0": "model.layers.0.mlp.down_proj", "layer_1": "model.layers.1.mlp.down_proj"}

    printed_code = re.search(r"```python\n(import hf_deepsae\n.*?)```", card, re.DOTALL).group(1)
    namespace: dict = {}
    exec(printed_code, namespace)  # noqa: S102 - the card's own lines are under test
    torch.testing.assert_close(outputs(namespace["sae"]),
                               outputs(saes["model.layers.0.mlp.down_proj"]), rtol=0, atol=0)
    online = load_sae("tiny-saes", "layer_1")
    go_offline(monkeypatch)
    offline = load_sae("tiny-saes", "layer_1")
    for loaded in (online, offline):
        torch.testing.assert_close(outputs(loaded), outputs(saes["model.layers.1.mlp.down_proj"]),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"no SAE 'layer_7'.*\['layer_0', 'layer_1'\]"):
        load_sae("tiny-saes", "layer_7")


def test_a_sparsify_release_is_converted_on_load(hub, tmp_path, monkeypatch):
    sae = make_sae(3)
    to_sparsify(sae, tmp_path / "repo" / "layers.3")
    repo_id = HfApi().create_repo("sparsify-release").repo_id
    HfApi().upload_folder(repo_id=repo_id, folder_path=tmp_path / "repo")
    (tmp_path / "releases.yaml").write_text(
        f"eai-tiny:\n  repo_id: {repo_id}\n  format: sparsify\n")
    monkeypatch.setenv(REGISTRY_ENV, str(tmp_path / "releases.yaml"))
    load_sae("eai-tiny", "layers.3")
    go_offline(monkeypatch)
    loaded = load_sae("eai-tiny", "layers.3")
    assert loaded.config.training_config["converted_from"] == "eai-sparsify"
    torch.testing.assert_close(outputs(loaded), outputs(sae), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("text", "problem"), [
    ("a: [1, 2", "not valid YAML"),
    ("a:\n  format: sparsify\n", "release 'a' has no repo_id"),
    ("a:\n  repo_id: x/y\n  format: pickle\n", "format 'pickle'"),
    ("a:\n  repo_id: x/y\n  revison: v1\n", r"unknown fields \['revison'\]"),
    ("a/b:\n  repo_id: x/y\n", "contains '/'"),
])
def test_a_broken_registry_names_the_file_and_the_problem(tmp_path, monkeypatch, text, problem):
    (tmp_path / "releases.yaml").write_text(text)
    monkeypatch.setenv(REGISTRY_ENV, str(tmp_path / "releases.yaml"))
    with pytest.raises(FileFormatError, match=problem) as caught:
        list_releases()
    assert caught.value.path == tmp_path / "releases.yaml"
