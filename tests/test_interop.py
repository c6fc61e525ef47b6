"""sparsify and SAELens checkpoints load into DeepSAEModel, and linear SAEs export back, unchanged.

The first tests build checkpoints from the formats as documented (no third-party library needed);
the last ones write and read them with the real libraries when those are installed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import save_file

from hf_deepsae import DeepSAEConfig, DeepSAEModel
from hf_deepsae.files import FileFormatError
from hf_deepsae.interop import from_saelens, from_sparsify, to_saelens, to_sparsify

pytest_plugins = ["hub_server"]

PEERS_MISSING = '{} is not installed: pip install -e ".[peers]" runs these tests'

D_IN, N_LATENTS, K = 8, 32, 4
LINEAR = {
    "topk": {},
    "relu": {"sparsity": "relu"},
    "jumprelu": {"sparsity": "jumprelu"},
    "batchtopk": {"sparsity": "batchtopk"},
    "normalized-topk": {"normalize_input": True},
}
TRANSCODERS = {
    "transcoder": {"transcoder": True},
    "skip-transcoder": {"transcoder": True, "skip_connection": True},
    "normalized-skip-transcoder": {"transcoder": True, "skip_connection": True,
                                   "normalize_input": True},
}
NOT_LINEAR = {
    "mlp-encoder": {"encoder_hidden": [16]},
    "deep": {"encoder_hidden": [16], "decoder_hidden": [16]},
    "stacked": {"n_stacked": 2},
}


def random_sae(name: str, **overrides) -> DeepSAEModel:
    """An SAE whose every parameter (biases, thresholds, scales) is random, so folds are tested."""
    torch.manual_seed(0)
    settings = {"d_in": D_IN, "n_latents": N_LATENTS, "k": K} | (LINEAR | NOT_LINEAR
                                                                  | TRANSCODERS)[name]
    sae = DeepSAEModel(DeepSAEConfig(**settings | overrides)).eval()
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        if sae.config.sparsity in ("jumprelu", "batchtopk"):
            sae.stages[0].sparsity.threshold.uniform_(0.0, 0.3)
    if sae.config.normalize_input:
        x = 4 * torch.randn(256, D_IN) + 1
        sae.initialize_from_activations(x, 2 * x if sae.config.transcoder else None)
    return sae


def activations(width: int = D_IN) -> torch.Tensor:
    torch.manual_seed(1)
    return 2 * torch.randn(16, width)


def reconstruct(sae: DeepSAEModel, x: torch.Tensor):
    with torch.no_grad():
        return sae(x, target=x if sae.config.transcoder else None).reconstruction


def random_linear_weights(d_in: int = D_IN, n: int = N_LATENTS) -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    return {"W_enc": torch.randn(d_in, n) / d_in**0.5, "b_enc": 0.1 * torch.randn(n),
            "W_dec": torch.randn(n, d_in) / n**0.5, "b_dec": 0.1 * torch.randn(d_in)}


def write_checkpoint(folder: Path, cfg_name: str, cfg: dict, weights_name: str,
                     weights: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / cfg_name).write_text(json.dumps(cfg))
    save_file(weights, folder / weights_name)
    return folder


def write_sparsify(folder: Path, weights: dict[str, torch.Tensor], **cfg) -> Path:
    """A checkpoint as sparsify's `SparseCoder.save_to_disk` lays it out."""
    cfg = {"activation": "topk", "expansion_factor": 4, "normalize_decoder": True,
           "num_latents": N_LATENTS, "k": K, "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": D_IN} | cfg
    return write_checkpoint(folder, "cfg.json", cfg, "sae.safetensors", {
        "encoder.weight": weights["W_enc"].T.contiguous(), "encoder.bias": weights["b_enc"],
        "W_dec": weights["W_dec"], "b_dec": weights["b_dec"],
    })


def write_saelens(folder: Path, architecture: str, weights: dict[str, torch.Tensor],
                  **cfg) -> Path:
    """A checkpoint as SAELens' `SAE.save_model` lays it out."""
    cfg = {"architecture": architecture, "d_in": D_IN, "d_sae": N_LATENTS, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.5.0", "model_name": "gpt2",
                        "hook_name": "blocks.3.hook_mlp_out"}} | cfg
    return write_checkpoint(folder, "cfg.json", cfg, "sae_weights.safetensors", weights)


# -- the formats as documented ------------------------------------------------------------------
def test_sparsify_format_loads_with_its_documented_forward(tmp_path):
    weights = random_linear_weights()
    sae = from_sparsify(write_sparsify(tmp_path / "layers.3.mlp", weights))
    x = activations()
    pre = torch.relu((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
    values, indices = pre.topk(K, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, indices, values) @ weights["W_dec"]
    torch.testing.assert_close(reconstruct(sae, x), expected + weights["b_dec"])
    assert (sae.config.hookpoint, sae.config.layer, sae.config.k) == ("layers.3.mlp", 3, K)


@pytest.mark.parametrize(("architecture", "variant"), [
    (architecture, variant) for architecture in ("standard", "topk", "jumprelu")
    for variant in ("plain", "no-b_dec-shift")
] + [("topk", "rescaled-topk")])
def test_saelens_format_loads_with_its_documented_forward(tmp_path, architecture, variant):
    weights = random_linear_weights()
    cfg = {"k": K} if architecture == "topk" else {}
    if variant == "no-b_dec-shift":
        cfg["apply_b_dec_to_input"] = False
    if variant == "rescaled-topk":
        cfg["rescale_acts_by_decoder_norm"] = True
    if architecture == "jumprelu":
        weights["threshold"] = torch.linspace(-0.2, 0.4, N_LATENTS)
    sae = from_saelens(write_saelens(tmp_path / "sae", architecture, weights, **cfg))

    x = activations()
    shift = 0 if variant == "no-b_dec-shift" else weights["b_dec"]
    pre = (x - shift) @ weights["W_enc"] + weights["b_enc"]
    norms = weights["W_dec"].norm(dim=-1) if variant == "rescaled-topk" else torch.ones(N_LATENTS)
    acts = torch.relu(pre * norms)
    if architecture == "topk":
        values, indices = (pre * norms).topk(K, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    if architecture == "jumprelu":
        acts = acts * (pre > weights["threshold"])
    expected = (acts / norms) @ weights["W_dec"] + weights["b_dec"]
    torch.testing.assert_close(reconstruct(sae, x), expected, rtol=1e-5, atol=1e-5)


def test_saelens_hook_names_become_layer_and_site(tmp_path):
    folder = write_saelens(tmp_path / "sae", "standard", random_linear_weights(),
                           metadata={"model_name": "gpt2", "hook_name": "blocks.4.hook_resid_pre"})
    config = from_saelens(folder).config
    assert (config.layer, config.hook_site, config.base_model_name_or_path) == (3, "resid", "gpt2")
    assert config.training_config["hook_name"] == "blocks.4.hook_resid_pre"


@pytest.mark.parametrize("name", LINEAR)
def test_saelens_export_round_trips(tmp_path, name):
    sae = random_sae(name)
    loaded = from_saelens(to_saelens(sae, tmp_path / "saelens"))
    torch.testing.assert_close(reconstruct(loaded, activations()),
                               reconstruct(sae, activations()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["topk", "normalized-topk", *TRANSCODERS])
def test_sparsify_export_round_trips(tmp_path, name):
    sae = random_sae(name)
    loaded = from_sparsify(to_sparsify(sae, tmp_path / "sparsify"))
    torch.testing.assert_close(reconstruct(loaded, activations()),
                               reconstruct(sae, activations()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("export", [to_sparsify, to_saelens])
def test_a_matryoshka_sae_exports_with_its_latents_in_order(tmp_path, export):
    """The formats hold no prefixes, but the weights' order is the prefixes' order."""
    sae = random_sae("topk", matryoshka_prefixes=[4, 16])
    load = from_sparsify if export is to_sparsify else from_saelens
    loaded = load(export(sae, tmp_path / "exported"))
    torch.testing.assert_close(loaded.W_dec, sae.W_dec, rtol=1e-6, atol=1e-6)
    x = activations()
    for prefix in sae.config.matryoshka_prefixes:
        torch.testing.assert_close(loaded.decode(*loaded.encode(x, prefix=prefix)),
                                   sae.decode(*sae.encode(x, prefix=prefix)),
                                   rtol=1e-5, atol=1e-5)


def test_sparsify_repo_loads_a_hookpoint_from_the_hub(hub, tmp_path):
    for layer in (0, 1):
        write_sparsify(tmp_path / "repo" / f"layers.{layer}.mlp", random_linear_weights())
    repo_id = HfApi().create_repo("sparsify-saes").repo_id
    HfApi().upload_folder(repo_id=repo_id, folder_path=tmp_path / "repo")
    remote = from_sparsify(repo_id, hookpoint="layers.1.mlp")
    local = from_sparsify(tmp_path / "repo", hookpoint="layers.1.mlp")
    torch.testing.assert_close(reconstruct(remote, activations()),
                               reconstruct(local, activations()), rtol=0, atol=0)
    assert remote.config.hookpoint == "layers.1.mlp"
    with pytest.raises(FileNotFoundError, match=r"\['layers.0.mlp', 'layers.1.mlp'\].*hookpoint="):
        from_sparsify(repo_id)


# -- what the formats can't hold ----------------------------------------------------------------
@pytest.mark.parametrize("name", NOT_LINEAR)
@pytest.mark.parametrize("export", [to_sparsify, to_saelens])
def test_deep_and_stacked_saes_cannot_be_exported(tmp_path, name, export):
    with pytest.raises(ValueError, match="single-stage SAEs with a linear encoder and decoder"):
        export(random_sae(name), tmp_path)


def test_sparsify_export_needs_topk_and_saelens_export_refuses_transcoders(tmp_path):
    with pytest.raises(ValueError, match="only holds top-k"):
        to_sparsify(random_sae("relu"), tmp_path)
    with pytest.raises(ValueError, match="transcoder"):
        to_saelens(random_sae("topk", transcoder=True, d_out=6), tmp_path)


def test_unconvertible_checkpoints_say_why(tmp_path):
    weights = random_linear_weights()
    with pytest.raises(ValueError, match="groupmax"):
        from_sparsify(write_sparsify(tmp_path / "a", weights, activation="groupmax"))
    with pytest.raises(ValueError, match="'gated'"):
        from_saelens(write_saelens(tmp_path / "b", "gated", weights))
    with pytest.raises(ValueError, match="layer_norm"):
        from_saelens(write_saelens(tmp_path / "c", "standard", weights,
                                   normalize_activations="layer_norm"))
    with pytest.raises(FileNotFoundError, match="no cfg.json"):
        from_saelens(tmp_path / "a", subfolder="missing")


# -- the real libraries -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sparsify():
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    return pytest.importorskip("sparsify", reason=PEERS_MISSING.format("eai-sparsify"))


@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens", reason=PEERS_MISSING.format("sae-lens"))


@pytest.mark.parametrize(("transcode", "skip"), [(False, False), (True, False), (True, True)],
                         ids=["sae", "transcoder", "skip-transcoder"])
def test_sparsify_checkpoints_load_with_identical_outputs(tmp_path, sparsify, transcode, skip):
    torch.manual_seed(3)
    reference = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(
        num_latents=N_LATENTS, k=K, transcode=transcode, skip_connection=skip))
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(0, 0.3)
    reference.save_to_disk(tmp_path / "layers.2.mlp")
    sae = from_sparsify(tmp_path, hookpoint="layers.2.mlp")
    x, y = activations(), activations() + 1
    with torch.no_grad():
        expected = reference(x, y)
        output = sae(x, target=y if transcode else None)
    torch.testing.assert_close(output.reconstruction, expected.sae_out)
    torch.testing.assert_close(sae.densify(output.latent_acts, output.latent_indices),
                               sae.densify(expected.latent_acts, expected.latent_indices))
    assert (sae.config.transcoder, sae.config.skip_connection) == (transcode, skip)


@pytest.mark.parametrize("name", ["topk", "normalized-topk", *TRANSCODERS])
def test_sparsify_reads_exported_saes_with_identical_outputs(tmp_path, sparsify, name):
    sae = random_sae(name)
    reference = sparsify.SparseCoder.load_from_disk(to_sparsify(sae, tmp_path / "export"))
    with torch.no_grad():
        expected = reference(activations()).sae_out
    torch.testing.assert_close(reconstruct(sae, activations()), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_saelens_checkpoints_load_with_identical_outputs(tmp_path, sae_lens, architecture):
    classes = {"standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
               "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": K}),
               "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {})}
    sae_class, config_class, extra = classes[architecture]
    torch.manual_seed(4)
    reference = sae_class(config_class(d_in=D_IN, d_sae=N_LATENTS, **extra))
    reference.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            parameter.copy_(torch.rand_like(parameter) * 0.2 if name == "threshold"
                            else torch.randn_like(parameter) * 0.3)
    reference.save_model(tmp_path / "blocks.1.hook_resid_post")
    sae = from_saelens(tmp_path, subfolder="blocks.1.hook_resid_post")
    with torch.no_grad():
        expected = reference(activations())
    torch.testing.assert_close(reconstruct(sae, activations()), expected, rtol=1e-5, atol=1e-5)
    assert (sae.config.layer, sae.config.hook_site) == (1, "resid")


@pytest.mark.parametrize("name", LINEAR)
def test_saelens_reads_exported_saes_with_identical_outputs(tmp_path, sae_lens, name):
    sae = random_sae(name)
    reference = sae_lens.SAE.load_from_disk(to_saelens(sae, tmp_path / "export"))
    with torch.no_grad():
        expected = reference(activations())
    torch.testing.assert_close(reconstruct(sae, activations()), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "sparsity"), [(name, sparsity) for name in TRANSCODERS
                                                for sparsity in ("relu", "jumprelu")])
def test_saelens_transcoder_export_round_trips(tmp_path, name, sparsity):
    sae = random_sae(name, sparsity=sparsity)
    loaded = from_saelens(to_saelens(sae, tmp_path / "saelens"))
    assert loaded.config.skip_connection is sae.config.skip_connection
    torch.testing.assert_close(reconstruct(loaded, activations()),
                               reconstruct(sae, activations()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "sparsity"), [(name, sparsity) for name in TRANSCODERS
                                                for sparsity in ("relu", "jumprelu")])
def test_saelens_reads_exported_transcoders_with_identical_outputs(tmp_path, sae_lens, name,
                                                                   sparsity):
    sae = random_sae(name, sparsity=sparsity)
    reference = sae_lens.SAE.load_from_disk(to_saelens(sae, tmp_path / "export"))
    with torch.no_grad():
        expected = reference(activations())
    torch.testing.assert_close(reconstruct(sae, activations()), expected, rtol=1e-5, atol=1e-5)


# -- broken checkpoints: the file, the problem and the fix ---------------------------------------
def sparsify_with(folder: Path, cfg: dict | str | None = None,
                  weights: dict[str, torch.Tensor] | None = None) -> Path:
    """A sparsify folder whose cfg.json (a dict or raw text) or tensors are replaced."""
    write_sparsify(folder, random_linear_weights())
    if cfg is not None:
        (folder / "cfg.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    if weights is not None:
        save_file(weights, folder / "sae.safetensors")
    return folder


def sparsify_tensors(**replaced: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """sparsify's tensors with some replaced, or dropped when given None."""
    tensors = {"encoder.weight": torch.zeros(N_LATENTS, D_IN), "encoder.bias": torch.zeros(
        N_LATENTS), "W_dec": torch.zeros(N_LATENTS, D_IN), "b_dec": torch.zeros(D_IN)}
    tensors |= {name.replace("__", "."): value for name, value in replaced.items()}
    return {name: value for name, value in tensors.items() if value is not None}


def saelens_topk(folder: Path, weights: dict[str, torch.Tensor] | None = None, **cfg) -> Path:
    return write_saelens(folder, "topk", weights or random_linear_weights(), **{"k": K} | cfg)


def truncated(folder: Path, filename: str) -> Path:
    (folder / filename).write_bytes((folder / filename).read_bytes()[:100])
    return folder


BROKEN = {
    "sparsify k null": (lambda folder: sparsify_with(folder, {"d_in": D_IN, "k": None}),
                        from_sparsify, "cfg.json", "k=None is not a positive integer"),
    "sparsify no k": (lambda folder: sparsify_with(folder, {"d_in": D_IN}),
                      from_sparsify, "cfg.json", r"missing required keys \['k'\]"),
    "sparsify truncated cfg": (lambda folder: sparsify_with(folder, '{"k": 4'),
                               from_sparsify, "cfg.json", "not valid JSON"),
    "sparsify missing tensor": (
        lambda folder: sparsify_with(folder, weights=sparsify_tensors(encoder__bias=None)),
        from_sparsify, "sae.safetensors", r"missing tensors \['encoder.bias'\]"),
    "sparsify 1-D weight": (
        lambda folder: sparsify_with(folder, weights=sparsify_tensors(
            encoder__weight=torch.zeros(N_LATENTS * D_IN))),
        from_sparsify, "sae.safetensors", "'encoder.weight' has shape .* expected 2 dimensions"),
    "sparsify int weight": (
        lambda folder: sparsify_with(folder, weights=sparsify_tensors(
            W_dec=torch.zeros(N_LATENTS, D_IN, dtype=torch.int32))),
        from_sparsify, "sae.safetensors", "'W_dec' has dtype torch.int32, expected a floating"),
    "sparsify shapes disagree": (
        lambda folder: sparsify_with(folder, weights=sparsify_tensors(b_dec=torch.zeros(D_IN + 1))),
        from_sparsify, "sae.safetensors", "shapes don't fit together"),
    "sparsify skip without W_skip": (
        lambda folder: sparsify_with(folder, {"k": K, "skip_connection": True}),
        from_sparsify, "cfg.json", "skip_connection=True but sae.safetensors lacks W_skip"),
    "saelens topk without k": (lambda folder: saelens_topk(folder, k=None),
                               from_saelens, "cfg.json", "'topk' SAE needs a positive integer 'k'"),
    "saelens missing W_dec": (
        lambda folder: saelens_topk(folder, drop(random_linear_weights(), "W_dec")),
        from_saelens, "sae_weights.safetensors", r"missing tensors \['W_dec'\]"),
    "saelens 1-D W_enc": (
        lambda folder: saelens_topk(folder, random_linear_weights() | {
            "W_enc": torch.zeros(D_IN * N_LATENTS)}),
        from_saelens, "sae_weights.safetensors", "'W_enc' has shape"),
    "saelens truncated weights": (
        lambda folder: truncated(saelens_topk(folder), "sae_weights.safetensors"),
        from_saelens, "sae_weights.safetensors", "not a readable safetensors file"),
    "saelens jumprelu without threshold": (
        lambda folder: write_saelens(folder, "jumprelu", random_linear_weights()),
        from_saelens, "sae_weights.safetensors", "without 'threshold'"),
}


def drop(weights: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {key: value for key, value in weights.items() if key != name}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_checkpoints_name_the_file_the_problem_and_the_fix(tmp_path, case):
    write, load, filename, problem = BROKEN[case]
    folder = write(tmp_path / "sae")
    with pytest.raises(FileFormatError, match=problem) as caught:
        load(folder)
    assert caught.value.path == folder / filename
    assert re.search("re-save|add the k", caught.value.fix)
