"""SAEs in SAELens' `HookedSAETransformer` compute what `splice` computes in `transformers`.

One tiny GPT-2 exists twice: as a `transformers` model and, with the same weights, as a
TransformerLens `HookedSAETransformer`. An SAE exported with `to_saelens` (linear) or wrapped with
`to_hooked_sae` (any architecture) and attached there must give the logits `splice` gives.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import HIDDEN_SIZE, NUM_LAYERS, VOCAB_SIZE, tiny_input_ids, tiny_model

from hf_deepsae import DeepSAEConfig, DeepSAEModel, splice, zero_latents
from hf_deepsae.interop import to_saelens

PEERS = "install the test-only peers extra: pip install -e '.[peers]' (see .ci/run)"
LAYER = 1
SAE_HOOK = f"blocks.{LAYER}.hook_mlp_out"
MLP_INPUT_HOOK = f"blocks.{LAYER}.ln2.hook_normalized"
ARCHITECTURES = {
    "topk": {},
    "jumprelu": {"sparsity": "jumprelu"},
    "mlp-encoder": {"encoder_hidden": [48]},
    "deep": {"encoder_hidden": [48], "decoder_hidden": [48], "layer_norm": True},
    "stacked": {"n_stacked": 2},
}


@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens", reason=PEERS)


@pytest.fixture(scope="module")
def models(sae_lens):
    """(the tiny transformers GPT-2, the same weights as a HookedSAETransformer)."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    hf_model = tiny_model("gpt2").eval()
    config = HookedTransformerConfig(
        n_layers=NUM_LAYERS, d_model=HIDDEN_SIZE, n_heads=4, d_head=HIDDEN_SIZE // 4, d_mlp=64,
        n_ctx=64, d_vocab=VOCAB_SIZE, act_fn="gelu_new", normalization_type="LN",
        positional_embedding_type="standard", default_prepend_bos=False, device="cpu")
    tl_model = sae_lens.HookedSAETransformer(config)
    tl_model.load_and_process_state_dict(
        convert_gpt2_weights(hf_model, config), fold_ln=False, center_writing_weights=False,
        center_unembed=False, fold_value_biases=False)
    return hf_model, tl_model.eval()


def random_sae(name: str, **overrides) -> DeepSAEModel:
    torch.manual_seed(0)
    settings = {"d_in": HIDDEN_SIZE, "n_latents": 96, "k": 8,
                "hookpoint": f"transformer.h.{LAYER}.mlp.c_proj"} | ARCHITECTURES[name] | overrides
    sae = DeepSAEModel(DeepSAEConfig(**settings)).eval()
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        if sae.config.sparsity == "jumprelu":
            sae.stages[0].sparsity.threshold.uniform_(0.0, 0.1)
    return sae


def spliced_logits(hf_model, sae: DeepSAEModel, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), splice(hf_model, sae):
        return hf_model(input_ids).logits


def hooked_logits(tl_model, sae, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return tl_model.run_with_saes(input_ids, saes=[sae])


def assert_logits_match(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 through two implementations of 2 layers of width 32: rounding only, ~1e-6."""
    assert not torch.allclose(expected, expected.mean(), atol=1e-3)  # the SAE changes something
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_both_models_agree_without_saes(models):
    hf_model, tl_model = models
    input_ids = tiny_input_ids()
    with torch.no_grad():
        torch.testing.assert_close(tl_model(input_ids), hf_model(input_ids).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["topk", "jumprelu"])
def test_saelens_loaded_export_matches_splice(tmp_path, models, sae_lens, name):
    hf_model, tl_model = models
    sae = random_sae(name)
    exported = sae_lens.SAE.load_from_disk(to_saelens(sae, tmp_path, hook_name=SAE_HOOK))
    input_ids = tiny_input_ids()
    assert_logits_match(hooked_logits(tl_model, exported, input_ids),
                        spliced_logits(hf_model, sae, input_ids))


@pytest.mark.parametrize("sparsity", ["relu", "jumprelu"])
def test_saelens_loaded_transcoder_matches_splice(tmp_path, models, sae_lens, sparsity):
    hf_model, tl_model = models
    sae = random_sae("topk", sparsity=sparsity, transcoder=True, layer=LAYER, hookpoint=None)
    exported = sae_lens.SAE.load_from_disk(to_saelens(
        sae, tmp_path, hook_name=MLP_INPUT_HOOK, hook_name_out=SAE_HOOK))
    input_ids = tiny_input_ids()
    assert_logits_match(hooked_logits(tl_model, exported, input_ids),
                        spliced_logits(hf_model, sae, input_ids))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_wrapped_sae_of_any_architecture_matches_splice(models, name):
    from hf_deepsae.interop import to_hooked_sae

    hf_model, tl_model = models
    sae = random_sae(name)
    input_ids = tiny_input_ids()
    assert_logits_match(hooked_logits(tl_model, to_hooked_sae(sae, SAE_HOOK), input_ids),
                        spliced_logits(hf_model, sae, input_ids))


def test_wrapped_latents_are_hookable_and_editable(models):
    from hf_deepsae.interop import to_hooked_sae

    hf_model, tl_model = models
    sae = random_sae("deep")
    wrapped = to_hooked_sae(sae, SAE_HOOK)
    input_ids = tiny_input_ids()
    with torch.no_grad():
        _, cache = tl_model.run_with_cache_with_saes(input_ids, saes=[wrapped])
    latents = cache[f"{SAE_HOOK}.hook_sae_acts_post"]
    with torch.no_grad():
        torch.testing.assert_close(latents, sae.encode_dense(cache[f"{SAE_HOOK}.hook_sae_input"]))
    zeroed = latents[0, 0].nonzero()[:2, 0].tolist()

    def zero(acts, hook):
        acts[..., zeroed] = 0
        return acts

    with torch.no_grad(), splice(hf_model, sae, edit=zero_latents(zeroed)):
        expected = hf_model(input_ids).logits
    with torch.no_grad():
        edited = tl_model.run_with_hooks_with_saes(
            input_ids, saes=[wrapped], fwd_hooks=[(f"{SAE_HOOK}.hook_sae_acts_post", zero)])
    torch.testing.assert_close(edited, expected, rtol=1e-4, atol=1e-4)


def test_skip_transcoders_are_refused_with_the_alternative(sae_lens):
    from hf_deepsae.interop import to_hooked_sae

    sae = random_sae("topk", transcoder=True, skip_connection=True, hookpoint=None)
    with pytest.raises(ValueError, match="W_skip x.*hf_deepsae.splice"):
        to_hooked_sae(sae, MLP_INPUT_HOOK, hook_name_out=SAE_HOOK)
