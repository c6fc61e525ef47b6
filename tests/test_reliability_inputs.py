"""Bad inputs and damaged files at every public entry point: a clear error or the correct value.

The attack list of issue 15 (items 8 and 9) outside the training state: configs, SAE folders,
model calls, splicing, evaluation, interpretation caches and scoring. Each case asserts the error
names the problem and the fix (files: the path too), or that the value returned is the right one.
Nothing here may pass silently with a wrong value.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file
from tiny_models import HIDDEN_SIZE, tiny_input_ids, tiny_model
from transformers import AutoConfig, AutoModel

from hf_deepsae import (
    ActivationMetrics,
    DeepSAEConfig,
    DeepSAEModel,
    LanguageModelMetrics,
    capture_activations,
    clamp_latents,
    evaluate_saes,
    find_mlp_sites,
    load_sae,
    load_saes,
    save_sae,
    save_saes,
    scale_latents,
    splice,
    zero_latents,
)
from hf_deepsae.files import FileFormatError
from hf_deepsae.interpret import (
    ChatJudge,
    LatentCache,
    SamplingConfig,
    ScoringConfig,
    build_latent_cache,
    build_latent_caches,
    compute_statistics,
    decoder_directions,
    nearest_latents,
    quantile_bins,
)
from hf_deepsae.interpret.sampling import Example, LatentExamples
from hf_deepsae.interpret.scoring import score_latent

D = 8
HOOK = "model.layers.0.mlp.down_proj"


def make_sae(**overrides) -> DeepSAEModel:
    torch.manual_seed(0)
    return DeepSAEModel(DeepSAEConfig(**({"d_in": D, "n_latents": 16, "k": 2} | overrides)))


def lm_sae(**overrides) -> DeepSAEModel:
    """An SAE for the tiny llama's layer-0 MLP output."""
    return make_sae(d_in=HIDDEN_SIZE, n_latents=64, k=4, hookpoint=HOOK, **overrides)


# ---------------------------------------------------------------- DeepSAEConfig arguments

CONFIG_ATTACKS = {
    "typo": ({"n_latnts": 4}, TypeError, r"unknown arguments 'n_latnts' \(did you mean "
                                         r"'n_latents'\?\)"),
    "unknown": ({"flavour": "x"}, TypeError, r"unknown arguments 'flavour'; see help"),
    "bandwidth 0": ({"sparsity": "jumprelu", "jumprelu_bandwidth": 0.0}, ValueError,
                    r"jumprelu_bandwidth=0.0; the pseudo-derivative divides by it"),
    "bandwidth nan": ({"jumprelu_bandwidth": float("nan")}, ValueError, "jumprelu_bandwidth=nan"),
    "negative threshold": ({"jumprelu_init_threshold": -1.0}, ValueError, ">= 0"),
    "momentum string": ({"batchtopk_threshold_momentum": "0.9"}, ValueError, r"use \[0, 1\)"),
    "coefficient nan": ({"l1_coefficient": float("nan")}, ValueError, "must be >= 0"),
    "coefficient string": ({"auxk_coefficient": "big"}, ValueError, "invalid auxk_coefficient"),
    "coefficient inf": ({"l0_coefficient": float("inf")}, ValueError, "(and finite)"),
    "k_aux above n_latents": ({"k_aux": 17}, ValueError, "at most n_latents=16 latents"),
    "k_aux zero": ({"k_aux": 0}, ValueError, "invalid k_aux=0"),
    "k float": ({"k": 2.5}, ValueError, "invalid k=2.5"),
    "k for relu": ({"sparsity": "relu", "k": -1}, ValueError, "invalid k=-1"),
    "bool as string": ({"transcoder": "False"}, ValueError, "transcoder='False'; it must be True"),
    "layer_norm int": ({"layer_norm": 1}, ValueError, "layer_norm=1"),
    "skip_connection string": ({"transcoder": True, "skip_connection": "yes"}, ValueError,
                               "skip_connection='yes'; it must be True or False"),
    "widths not a list": ({"encoder_hidden": 32}, ValueError, r"give a list of widths"),
    "width string": ({"decoder_hidden": ["8"]}, ValueError, "every hidden width"),
    "expansion float": ({"n_latents": None, "expansion_factor": 0.5}, ValueError,
                        "expansion_factor=0.5; it must be a positive integer"),
    "layer negative": ({"layer": -1}, ValueError, "layer index >= 0"),
    "hookpoint int": ({"hookpoint": 3}, ValueError, "hookpoint=3; it must be a string"),
    "initializer_range 0": ({"initializer_range": 0.0}, ValueError, "std > 0"),
    "metrics list": ({"metrics": [0.5]}, ValueError, "metrics=.*a dict or None"),
}


@pytest.mark.parametrize("name", CONFIG_ATTACKS)
def test_bad_config_arguments_fail_with_field_and_fix(name):
    kwargs, error, message = CONFIG_ATTACKS[name]
    with pytest.raises(error, match=message):
        DeepSAEConfig(**({"d_in": D, "n_latents": 16, "k": 2} | kwargs))


def test_default_k_aux_fits_a_narrow_sae():
    assert DeepSAEConfig(d_in=64, n_latents=16, k=2).k_aux == 16


def test_initializer_range_sets_the_std_of_linear_weights():
    sae = make_sae(d_in=64, n_latents=4096, encoder_hidden=[256], initializer_range=0.02)
    assert sae.stages[0].encoder.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert sae.stages[0].encoder_mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_a_changed_config_value_is_the_one_that_runs_and_is_saved(tmp_path):
    sae = make_sae()
    sae.config.k = 5
    assert (sae.encode(torch.randn(3, D)).latent_acts != 0).sum(-1).max() <= 5
    assert sae.encode(torch.randn(3, D)).latent_indices.shape == (3, 5)
    sae.save_pretrained(tmp_path)
    assert DeepSAEModel.from_pretrained(tmp_path).config.k == 5


# ---------------------------------------------------------------- saved SAE folders

def _edit_config(change):
    def apply(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))
    return apply


def _rewrite_weights(change, keep_checksum: bool = False):
    """Change the stored tensors; without `keep_checksum` the folder looks like an old one."""
    def apply(folder: Path) -> None:
        tensors = load_file(folder / "model.safetensors")
        change(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        if not keep_checksum:
            _edit_config(lambda config: config.pop("weights_sha256"))(folder)
    return apply


def _flip_a_bit(folder: Path) -> None:
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-3] ^= 0x08
    (folder / "model.safetensors").write_bytes(bytes(data))


def _truncate(name: str, keep: int = 40):
    def apply(folder: Path) -> None:
        (folder / name).write_bytes((folder / name).read_bytes()[:keep])
    return apply


def _nan_decoder(tensors: dict) -> None:
    tensors["stages.0.W_dec"][0, 0] = float("nan")


FOLDER_ATTACKS = {
    "config without k": (_edit_config(lambda c: c.pop("k")), "config.json",
                         r"missing \['k'\].*add them with the values"),
    "config without sparsity": (_edit_config(lambda c: c.pop("sparsity")), "config.json",
                                r"missing \['sparsity'\]"),
    "config without hook_site": (_edit_config(lambda c: c.pop("hook_site")), "config.json",
                                 r"missing \['hook_site'\]"),
    "config without widths": (_edit_config(lambda c: [c.pop("d_in"), c.pop("encoder_hidden")]),
                              "config.json", r"missing \['d_in', 'encoder_hidden'\]"),
    "config with a typo": (_edit_config(lambda c: c.update(n_latnts=4)), "config.json",
                           r"unknown fields 'n_latnts' \(did you mean 'n_latents'\?\); fix"),
    "config value of wrong type": (_edit_config(lambda c: c.update(k="2")), "config.json",
                                   r"invalid k='2'.*correct the value"),
    "config not JSON": (lambda f: (f / "config.json").write_text("{ nope"), "config.json",
                        "not valid JSON.*restore the SAE's config.json"),
    "config empty": (lambda f: (f / "config.json").write_text(""), "config.json",
                     "not valid JSON"),
    "config a list": (lambda f: (f / "config.json").write_text("[1]"), "config.json",
                      "expected a JSON object, found list"),
    "checksum record broken": (_edit_config(lambda c: c.update(weights_sha256="abc")),
                               "config.json", "must map weights file names to SHA-256"),
    "weights missing": (lambda f: (f / "model.safetensors").unlink(), "model.safetensors",
                        "does not exist.*re-download or re-copy"),
    "weights truncated": (_truncate("model.safetensors"), "model.safetensors",
                          "corrupt or truncated.*re-download"),
    "weights bit-flipped": (_flip_a_bit, "model.safetensors",
                            "corrupt or truncated: its SHA-256 is"),
    "weights rewritten": (_rewrite_weights(_nan_decoder, keep_checksum=True),
                          "model.safetensors", "records .* changed after it was saved"),
    "old folder truncated": (lambda f: [_truncate("model.safetensors")(f),
                                        _edit_config(lambda c: c.pop("weights_sha256"))(f)],
                             "model.safetensors", "not a readable safetensors file"),
    "old folder with NaN weights": (_rewrite_weights(_nan_decoder), "model.safetensors",
                                    r"\['stages.0.W_dec'\] hold NaN or inf.*earlier checkpoint"),
}


@pytest.fixture(scope="module")
def saved_sae(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sae") / "sae"
    make_sae(encoder_hidden=[12]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", FOLDER_ATTACKS)
def test_a_damaged_sae_folder_fails_naming_the_file_and_the_fix(name, saved_sae, tmp_path):
    damage, file_name, message = FOLDER_ATTACKS[name]
    folder = tmp_path / "sae"
    shutil.copytree(saved_sae, folder)
    damage(folder)
    loaders = [load_sae, DeepSAEModel.from_pretrained]
    if not name.startswith("config not") and name not in ("config empty", "config a list"):
        loaders.append(AutoModel.from_pretrained)  # AutoConfig reads the JSON with its own error
    for load in loaders:
        with pytest.raises(FileFormatError, match=message) as caught:
            load(folder)
        assert caught.value.path == folder / file_name


def test_the_weights_file_instead_of_the_folder_fails(saved_sae):
    with pytest.raises(FileFormatError, match="a file, not an SAE folder; pass the folder"):
        load_sae(saved_sae / "model.safetensors")


def test_config_without_k_also_fails_through_autoconfig(saved_sae, tmp_path):
    shutil.copytree(saved_sae, tmp_path / "sae")
    _edit_config(lambda c: c.pop("k"))(tmp_path / "sae")
    with pytest.raises(FileFormatError, match=r"missing \['k'\]"):
        AutoConfig.from_pretrained(tmp_path / "sae")


def test_the_checksum_is_recorded_and_an_old_folder_without_one_loads(saved_sae, tmp_path):
    config = json.loads((saved_sae / "config.json").read_text())
    assert set(config["weights_sha256"]) == {"model.safetensors"}
    assert len(config["weights_sha256"]["model.safetensors"]) == 64
    shutil.copytree(saved_sae, tmp_path / "old")
    _edit_config(lambda c: c.pop("weights_sha256"))(tmp_path / "old")
    assert not hasattr(load_sae(tmp_path / "old").config, "weights_sha256")


def test_a_sharded_checkpoint_records_and_checks_every_shard(tmp_path):
    make_sae(n_latents=256).save_pretrained(tmp_path, max_shard_size="4KB")
    recorded = json.loads((tmp_path / "config.json").read_text())["weights_sha256"]
    assert len(recorded) > 1
    shard = tmp_path / sorted(recorded)[-1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x08
    shard.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="corrupt or truncated") as caught:
        DeepSAEModel.from_pretrained(tmp_path)
    assert caught.value.path == shard


def test_an_sae_with_nan_weights_is_not_saved(tmp_path):
    sae = make_sae()
    with torch.no_grad():
        sae.stages[0].encoder.bias[3] = float("inf")
    with pytest.raises(ValueError, match=r"\['stages.0.encoder.bias'\] of this SAE hold NaN"):
        sae.save_pretrained(tmp_path)


CHECKPOINT_KINDS = ["save_pretrained", "save_sae", "save_saes", "save_sae deep stacked",
                    "transformers 4 config keys"]


@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
def test_every_kind_of_checkpoint_this_library_writes_loads(kind, tmp_path):
    """The strict config checks accept all of transformers' and hf_deepsae's own keys."""
    sae = make_sae(hookpoint=HOOK, layer=0, base_model_name_or_path="org/model",
                   training_config={"lr": 1e-3, "layers": [0]}, metrics={"fvu": 0.2})
    if kind == "save_pretrained":
        sae.save_pretrained(tmp_path / "sae")
        loaded = [AutoModel.from_pretrained(tmp_path / "sae")]
    elif kind == "save_sae":
        save_sae(sae, tmp_path / "sae", density_plot=torch.rand(16))
        loaded = [load_sae(tmp_path / "sae")]
    elif kind == "save_saes":
        save_saes({HOOK: sae, "other": make_sae(sparsity="jumprelu")}, tmp_path / "saes")
        loaded = list(load_saes(tmp_path / "saes").values())
    elif kind == "save_sae deep stacked":
        sae = make_sae(encoder_hidden=[12], decoder_hidden=[10], layer_norm=True, n_stacked=2,
                       normalize_input=True, topk_selection_dtype="bfloat16")
        save_sae(sae, tmp_path / "sae")
        loaded = [load_sae(tmp_path / "sae")]
    else:
        sae.save_pretrained(tmp_path / "sae")
        _edit_config(lambda c: c.update(torch_dtype="float32", _name_or_path="x",
                                        _commit_hash=None))(tmp_path / "sae")
        loaded = [load_sae(tmp_path / "sae")]
    assert all(isinstance(model, DeepSAEModel) for model in loaded)
    assert loaded[0].config.to_diff_dict()["k"] == 2


# ---------------------------------------------------------------- DeepSAEModel calls

def _call(method: str, *args, **kwargs):
    return lambda sae: getattr(sae, method)(*args, **kwargs)


ids = torch.tensor
MODEL_ATTACKS = {
    "decode id out of range": (_call("decode", torch.ones(1, 2), ids([[0, 16]])), ValueError,
                               r"latent ids must lie in \[0, 16\), got \[16\]"),
    "decode negative id": (_call("decode", torch.ones(1, 2), ids([[-1, 3]])), ValueError,
                           r"got \[-1\]"),
    "decode float ids": (_call("decode", torch.ones(1, 2), torch.zeros(1, 2)), TypeError,
                         "must hold integer latent ids"),
    "decode bool ids": (_call("decode", torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.bool)),
                        TypeError, "must hold integer latent ids"),
    "decode int values": (_call("decode", ids([[1, 2]]), ids([[0, 1]])), TypeError,
                          "latent_acts must be floating point"),
    "decode shape mismatch": (_call("decode", torch.ones(1, 2), ids([[0, 1, 2]])), ValueError,
                              r"latent_indices \(1, 3\) must match latent_acts \(1, 2\)"),
    "decode 0-d": (_call("decode", torch.tensor(1.0)), ValueError, "got a 0-d tensor"),
    "decode dense of wrong width": (_call("decode", torch.ones(2, 15)), ValueError,
                                    r"dense latents must have shape \[\.\.\., 16\]"),
    "decode a list": (_call("decode", [[1.0, 2.0]]), TypeError, "must be a torch.Tensor"),
    "decode on another device": (_call("decode", torch.ones(1, 16, device="meta")), ValueError,
                                 "latent_acts is on meta but the SAE is on cpu"),
    "densify id out of range": (_call("densify", torch.ones(1, 2), ids([[0, 99]])), ValueError,
                                r"got \[99\]"),
    "densify negative id": (_call("densify", torch.ones(1, 2), ids([[-2, 0]])), ValueError,
                            r"got \[-2\]"),
    "latent_directions float ids": (_call("latent_directions", torch.zeros(3)), TypeError,
                                    "integer latent ids"),
    "latent_directions at activation 0": (_call("latent_directions", activation=0.0),
                                          ValueError, "finite non-zero number"),
    "latent_directions block 0": (_call("latent_directions", block_size=0), ValueError,
                                  "block_size=0 must be a positive int"),
    "forward on another device": (_call("forward", torch.randn(2, D, device="meta")), ValueError,
                                  r"x is on meta .* move one of them"),
    "forward 0-d": (_call("forward", torch.tensor(1.0)), ValueError, "0-d tensor"),
    "forward target rows differ": (_call("forward", torch.randn(4, D), torch.randn(5, D)),
                                   ValueError, "leading shape of x"),
    "forward std_coefficient nan": (_call("forward", torch.randn(4, D),
                                          std_coefficient=float("nan")), ValueError,
                                    "std_coefficient=nan must be a finite number"),
    "forward float dead_mask": (_call("forward", torch.randn(4, D), dead_mask=torch.ones(16)),
                                TypeError, "dead_mask must be a bool tensor"),
    "encode bool": (_call("encode", torch.ones(2, D, dtype=torch.bool)), TypeError,
                    "floating point"),
    "encode_dense inf": (_call("encode_dense", torch.full((2, D), float("inf"))), ValueError,
                         "NaN or inf"),
    "initialize on no rows": (_call("initialize_from_activations", torch.empty(0, D)),
                              ValueError, "needs rows of activations"),
    "initialize with fewer targets": (_call("initialize_from_activations", torch.randn(4, D),
                                            torch.randn(3, D)), ValueError, "got 4 and 3"),
}


@pytest.mark.parametrize("name", MODEL_ATTACKS)
def test_bad_tensors_and_arguments_to_the_model_fail_clearly(name):
    call, error, message = MODEL_ATTACKS[name]
    with pytest.raises(error, match=message):
        call(make_sae())


def test_fitting_a_scale_to_all_zero_activations_fails():
    with pytest.raises(ValueError, match="all zero, so no input scale can be fitted"):
        make_sae(normalize_input=True).initialize_from_activations(torch.zeros(4, D))


@pytest.mark.parametrize("rows", [torch.randn(1, D), torch.randn(1, D).expand(5, D),
                                  torch.randn(D)])
def test_fvu_without_variance_is_nan_not_a_huge_number(rows):
    out = make_sae()(rows)
    assert torch.isnan(out.fvu) and torch.isfinite(out.reconstruction).all()


def test_auxk_loss_without_variance_in_the_error_is_zero():
    out = make_sae()(torch.randn(1, D), dead_mask=torch.ones(16, dtype=torch.bool))
    assert out.aux_loss.item() == 0.0


@pytest.mark.parametrize("method", ["forward", "encode", "encode_dense"])
def test_an_empty_batch_gives_empty_results(method):
    result = getattr(make_sae(), method)(torch.empty(0, 3, D))
    first = result.reconstruction if method == "forward" else (
        result if method == "encode_dense" else result.latent_acts)
    assert first.shape[:2] == (0, 3)


def test_non_contiguous_inputs_give_the_contiguous_result():
    x = torch.randn(D, 6).T
    sae = make_sae()
    torch.testing.assert_close(sae(x).reconstruction, sae(x.contiguous()).reconstruction)


# ---------------------------------------------------------------- splice and capture

@pytest.fixture
def llama():
    return tiny_model("llama")


def test_nested_splices_on_one_site_are_refused_naming_both(llama):
    with splice(llama, lm_sae()):
        for mode in ("replace", "error", "capture"):
            with pytest.raises(ValueError, match=rf"\[Site\(path='{HOOK}'.*already used by an "
                               r"active splice\(mode='replace'\) of SAEs \['model.layers.0"):
                splice(llama, {0: lm_sae()}, mode=mode)
        with pytest.raises(ValueError, match="capture_activations: .*already used by"):
            capture_activations(llama, tiny_input_ids(), [0])
    with splice(llama, {0: lm_sae()}, mode="capture"):
        with pytest.raises(ValueError, match=r"already used by an active splice\(mode='capture'"):
            splice(llama, {0: lm_sae()})
        with splice(llama, {0: lm_sae()}, mode="capture"):  # two readers of one site are fine
            llama(tiny_input_ids())


def test_splices_on_different_sites_nest_and_release_their_sites(llama):
    other = make_sae(d_in=HIDDEN_SIZE, n_latents=64, k=4)
    with splice(llama, lm_sae()), splice(llama, {1: other}):
        llama(tiny_input_ids())
    with splice(llama, lm_sae()):  # free again after the blocks
        pass


def test_two_saes_on_one_site_in_one_splice_are_refused(llama):
    with pytest.raises(ValueError, match="use the same site .* splice one SAE per site"):
        splice(llama, {0: lm_sae(), HOOK: lm_sae()})


def test_an_sae_with_nan_weights_is_not_spliced(llama):
    sae = lm_sae()
    with torch.no_grad():
        sae.stages[0].W_dec[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"has NaN or inf in \['stages.0.W_dec'\]"):
        splice(llama, sae)
    with pytest.raises(ValueError, match=r"does not fit .*NaN or inf"):
        evaluate_saes(llama, {"nan": sae}, [tiny_input_ids()])


EDIT_ATTACKS = {
    "wrong shape": (lambda z: z[..., :3], "must return the dense latents' shape"),
    "NaN": (lambda z: z * float("nan"), "returned NaN/inf"),
    "not a tensor": (lambda z: 0.0, "must return the dense latents' shape"),
}


@pytest.mark.parametrize("name", EDIT_ATTACKS)
def test_an_edit_returning_bad_latents_fails(name, llama):
    edit, message = EDIT_ATTACKS[name]
    with splice(llama, lm_sae(), edit=edit), pytest.raises(ValueError, match=message):
        llama(tiny_input_ids())


@pytest.mark.parametrize(("make", "message"), [
    (lambda: zero_latents(True), "non-negative ints"),
    (lambda: zero_latents([]), "non-negative ints"),
    (lambda: zero_latents("3"), "non-negative ints"),
    (lambda: clamp_latents([1]), "needs min= or max="),
    (lambda: clamp_latents([1], min=5.0, max=1.0), "min=5.0 is above max=1.0"),
    (lambda: clamp_latents([1], min=float("nan")), "min=nan must be a finite number"),
    (lambda: scale_latents([1], float("inf")), "factor=inf must be a finite number"),
])
def test_bad_edit_arguments_fail_at_once(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_edit_ids_may_come_as_any_iterable_of_ints():
    assert zero_latents({1, 2})(torch.ones(1, 4)).tolist() == [[1.0, 0.0, 0.0, 1.0]]


@pytest.mark.parametrize(("input_ids", "mask", "message"), [
    (tiny_input_ids().float(), None, "integer tensor of token ids"),
    (tiny_input_ids()[0], None, r"\[batch, seq\], got a torch.int64 tensor of shape \(8,\)"),
    (torch.empty(0, 4, dtype=torch.long), None, "input_ids is empty"),
    (tiny_input_ids(), torch.ones(2, 3), "attention_mask must have the shape of input_ids"),
])
def test_bad_token_batches_fail_before_the_model_runs(input_ids, mask, message, llama):
    with pytest.raises(ValueError, match=message):
        capture_activations(llama, input_ids, [0], attention_mask=mask)


@pytest.mark.parametrize("call", [lambda: splice("model", {}), lambda: capture_activations(
    None, tiny_input_ids(), [0]), lambda: find_mlp_sites({"layers": []})])
def test_a_model_that_is_no_module_fails(call):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        call()


# ---------------------------------------------------------------- evaluation

METRIC_ATTACKS = {
    "NaN reconstruction": (lambda m: m.update(torch.randn(4, D), torch.full((4, D), torch.nan)),
                           "reconstruction contains NaN or inf"),
    "inf target": (lambda m: m.update(torch.full((4, D), torch.inf), torch.randn(4, D)),
                   "target contains NaN or inf"),
    "0-d target": (lambda m: m.update(torch.tensor(1.0), torch.tensor(1.0)),
                   r"shape \[\.\.\., width\]"),
    "a list": (lambda m: m.update([[1.0]], [[1.0]]), "must be a real tensor"),
    "negative latent id": (lambda m: m.update(torch.randn(4, D), torch.randn(4, D),
                                              torch.ones(4, 2), -torch.ones(4, 2).long()),
                           r"hold the negative id -1, outside n_latents=16"),
    "latent id too large": (lambda m: m.update(torch.randn(4, D), torch.randn(4, D),
                                               torch.ones(4, 2), torch.full((4, 2), 16)),
                            r"reach 16, beyond n_latents=16: ids must lie in \[0, 16\)"),
    "float latent ids": (lambda m: m.update(torch.randn(4, D), torch.randn(4, D),
                                            torch.ones(4, 2), torch.ones(4, 2)),
                         "integer latent ids"),
    "latent rows differ": (lambda m: m.update(torch.randn(4, D), torch.randn(4, D),
                                              torch.ones(3, 2), torch.ones(3, 2).long()),
                           "one row per target row"),
    "NaN latents": (lambda m: m.update(torch.randn(4, D), torch.randn(4, D),
                                       torch.full((4, 2), torch.nan), torch.ones(4, 2).long()),
                    "latent_acts contains NaN"),
    "merge another SAE's": (lambda m: m.merge(ActivationMetrics(n_latents=8)),
                            "can't merge metrics of 8 latents into metrics of 16"),
}


@pytest.mark.parametrize("name", METRIC_ATTACKS)
def test_bad_inputs_to_activation_metrics_fail(name):
    attack, message = METRIC_ATTACKS[name]
    with pytest.raises(ValueError, match=message):
        attack(ActivationMetrics(n_latents=16))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_latents": 0}, "n_latents=0 must be a positive int"),
    ({"dense_threshold": 1.5}, r"dense_threshold=1.5 must be a fraction in \[0, 1\]"),
])
def test_bad_activation_metrics_settings_fail(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ActivationMetrics(**kwargs)


@pytest.mark.parametrize("target", [torch.ones(5, D), torch.randn(1, D).expand(7, D)])
def test_fvu_of_constant_activations_is_an_error_not_a_number(target):
    metrics = ActivationMetrics()
    metrics.update(target, torch.zeros_like(target))
    with pytest.raises(ValueError, match="constant over the evaluated tokens.*undefined"):
        metrics.compute()


def _logits(vocab: int = 10, fill: float | None = None) -> torch.Tensor:
    logits = torch.randn(2, 5, vocab)
    return logits if fill is None else logits.fill_(fill)


@pytest.mark.parametrize(("args", "message"), [
    ((torch.randint(0, 10, (2, 5)), _logits(), _logits(fill=torch.nan), _logits()),
     r"\['ce_spliced', 'kl_spliced'\] of this batch are NaN or inf"),
    ((torch.randint(0, 10, (2, 5)), _logits(), _logits(), _logits()[:, :4]),
     "ablated_logits must be float"),
    ((torch.full((2, 5), 12), _logits(), _logits(), _logits()),
     r"token ids in \[12, 12\], outside the 10 logits"),
    ((torch.randn(2, 5), _logits(), _logits(), _logits()), "input_ids must be an integer"),
])
def test_bad_inputs_to_language_model_metrics_fail(args, message):
    with pytest.raises(ValueError, match=message):
        LanguageModelMetrics().update(*args)


def test_evaluating_something_that_is_no_sae_fails(llama):
    with pytest.raises(TypeError, match=r"saes\['x'\] must be a DeepSAEModel, got Linear"):
        evaluate_saes(llama, {"x": torch.nn.Linear(2, 2)}, [tiny_input_ids()])


def test_capturing_no_sites_returns_nothing(llama):
    assert capture_activations(llama, tiny_input_ids(), []) == {}


def test_a_batch_without_input_ids_fails_clearly(llama):
    with pytest.raises(ValueError, match=r"mapping with 'input_ids'.*got \['ids'\]"):
        evaluate_saes(llama, {"sae": lm_sae()}, [{"ids": tiny_input_ids()}],
                      language_model_metrics=False)


@pytest.mark.parametrize(("plot", "message"), [
    ("/nonexistent/plot.png", "plot.png: the density plot to copy does not exist"),
    (torch.full((16,), torch.nan), r"firing frequencies in \[0, 1\]"),
    (torch.empty(0), "non-empty tensor"),
])
def test_a_bad_density_plot_fails_before_anything_is_written(plot, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        save_sae(make_sae(), tmp_path / "sae", density_plot=plot)
    assert not (tmp_path / "sae").exists()


def test_density_plots_for_unknown_saes_fail(tmp_path):
    with pytest.raises(ValueError, match=r"density_plots\['typo'\] names no SAE"):
        save_saes({"a": make_sae()}, tmp_path, density_plots={"typo": torch.rand(16)})


# ---------------------------------------------------------------- interpretation

def tiny_cache() -> LatentCache:
    tokens = torch.arange(16).reshape(2, 8)
    locations = torch.tensor([[0, 1, 0], [1, 2, 3], [1, 5, 3]])
    return LatentCache(tokens, locations, torch.tensor([1.0, 2.0, 0.5]), 4)


CACHE_ATTACKS = {
    "float tokens": (lambda t, loc, a: (t.float() + 0.7, loc, a, 4), "tokens must be an integer"),
    "float locations": (lambda t, loc, a: (t, loc.float(), a, 4), "locations must be an integer"),
    "NaN activations": (lambda t, loc, a: (t, loc, a * torch.nan, 4), "without NaN or inf"),
    "no tokens": (lambda t, loc, a: (t[:0], loc[:0], a[:0], 4), "non-empty"),
    "zero latents": (lambda t, loc, a: (t, loc, a, 0), "n_latents=0 must be a positive int"),
    "latent out of range": (lambda t, loc, a: (t, loc, a, 3), "locations fall outside"),
}


@pytest.mark.parametrize("name", CACHE_ATTACKS)
def test_bad_latent_cache_contents_fail(name):
    change, message = CACHE_ATTACKS[name]
    cache = tiny_cache()
    with pytest.raises(ValueError, match=message):
        LatentCache(*change(cache.tokens, cache.locations, cache.activations))


def _shard(folder: Path) -> Path:
    return sorted(folder.glob("*_*.safetensors"))[0]


def _rewrite_shard(change):
    def apply(folder: Path) -> None:
        tensors = {name: value.numpy() for name, value in load_file(_shard(folder)).items()}
        change(tensors)
        save_numpy(tensors, str(_shard(folder)))
    return apply


SAVED_CACHE_ATTACKS = {
    "config not JSON": (lambda f: (f / "config.json").write_text("{"), "config.json",
                        "not valid JSON.*rebuild the cache"),
    "shard truncated": (lambda f: _shard(f).write_bytes(_shard(f).read_bytes()[:30]), "shard",
                        "not a readable safetensors file"),
    "shard without tokens": (_rewrite_shard(lambda t: t.pop("tokens")), "shard",
                             r"missing tensors \['tokens'\]"),
    "1-D locations": (_rewrite_shard(lambda t: t.update(locations=t["locations"].ravel())),
                      "shard", "tensor 'locations' has shape"),
    "float locations": (_rewrite_shard(lambda t: t.update(
        locations=t["locations"].astype(np.float32))), "shard", "expected an integer dtype"),
    "int activations": (_rewrite_shard(lambda t: t.update(
        activations=t["activations"].astype(np.int32))), "shard", "floating-point dtype"),
    "latent beyond its shard": (_rewrite_shard(lambda t: t["locations"].__setitem__(
        (0, 2), 9)), "shard", r"latents outside its range 0\.\.1"),
    "tokens of another corpus": (_rewrite_shard(lambda t: t.update(tokens=t["tokens"] + 1)),
                                 "shard", "tokens differ from"),
    "NaN activation": (_rewrite_shard(lambda t: t["activations"].__setitem__(0, np.nan)), "",
                       "inconsistent.*without NaN or inf"),
}


@pytest.mark.parametrize("name", SAVED_CACHE_ATTACKS)
def test_a_damaged_latent_cache_fails_naming_the_file(name, tmp_path):
    damage, file_name, message = SAVED_CACHE_ATTACKS[name]
    tiny_cache().save(tmp_path, n_splits=2)
    damage(tmp_path)
    with pytest.raises(FileFormatError, match=message) as caught:
        LatentCache.load(tmp_path)
    expected = {"config.json": tmp_path / "config.json", "shard": None, "": tmp_path}[file_name]
    assert caught.value.path == (expected or caught.value.path)
    assert caught.value.path.is_relative_to(tmp_path)


def test_a_stray_file_named_like_a_shard_is_ignored(tmp_path):
    tiny_cache().save(tmp_path, n_splits=2)
    (tmp_path / "notes_old.safetensors").write_text("x")
    assert LatentCache.load(tmp_path).n_latents == 4


@pytest.mark.parametrize(("call", "message"), [
    (lambda: SamplingConfig(n_top=-1), "n_top=-1 must be an int >= 0"),
    (lambda: SamplingConfig(n_quantiles=0), "n_quantiles=0 must be an int >= 1"),
    (lambda: quantile_bins(torch.ones(3), 0), "n_quantiles=0"),
    (lambda: nearest_latents(torch.full((4, 3), torch.nan), 2), "finite"),
    (lambda: nearest_latents(torch.randn(4, 3), -1), "n_neighbours=-1"),
    (lambda: decoder_directions(make_sae(), -1.0), "finite and >= 0"),
    (lambda: decoder_directions(make_sae(), torch.nan), "finite and >= 0"),
    (lambda: compute_statistics(tiny_cache(), n_top_tokens=0), "n_top_tokens=0"),
    (lambda: compute_statistics(tiny_cache(), single_token_threshold=2.0), r"\(0, 1\]"),
    (lambda: ScoringConfig(highlight_threshold=-0.1), "highlight_threshold=-0.1"),
    (lambda: ChatJudge(lambda messages: "", batch_size=0), "batch_size=0"),
])
def test_bad_interpretation_settings_fail(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_building_a_cache_from_no_saes_or_bad_batches_fails(llama):
    with pytest.raises(ValueError, match="no SAEs given"):
        build_latent_caches(llama, {}, tiny_input_ids())
    with pytest.raises(ValueError, match="batch_size=0 must be a positive int"):
        build_latent_cache(llama, lm_sae(), tiny_input_ids(), batch_size=0)


class _Judge:
    def __init__(self, verdicts, explanation="fires on w1"):
        self.verdicts, self.explanation = verdicts, explanation

    def explain(self, examples):
        return self.explanation

    def detect(self, explanation, texts):
        return self.verdicts


def _examples() -> LatentExamples:
    example = Example(0, [1, 2], [1.0, 0.0], quantile=0)
    negative = Example(1, [3, 4], [0.0, 0.0])
    return LatentExamples(0, 2, 0.5, [example], [(1.0, 1.0)], [[example]], [negative], [], [])


@pytest.mark.parametrize(("judge", "error", "message"), [
    (_Judge([True]), ValueError, "returned 1 verdicts for 2 texts"),
    (_Judge([True, False], explanation=None), TypeError, "explain must return a str"),
])
def test_a_judge_breaking_its_contract_fails(judge, error, message):
    tokenizer = type("T", (), {"batch_decode": lambda self, ids, **kw: ["w"] * len(ids)})()
    with pytest.raises(error, match=message):
        score_latent(_examples(), judge, judge, tokenizer, firing_rate=0.1,
                     config=ScoringConfig(quantile_agreement=False))
