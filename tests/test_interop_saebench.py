"""`SAEBenchAdapter` passes SAEBench's own custom-SAE checks for every architecture.

SAEBench's evals download their model and datasets at run time, so offline only its interface
checks run: `check_decoder_norms`, `BaseSAE.test_sae` (on a tiny TransformerLens model standing in
for the download) and `load_and_format_sae`, which every eval calls on a custom SAE first.
"""

from __future__ import annotations

import pytest
import torch

from hf_deepsae import DeepSAEConfig, DeepSAEModel

PEERS = "install the test-only peers extra: pip install -e '.[peers]' (see .ci/run)"
D_MODEL, LAYER = 16, 1
ARCHITECTURES = {
    "topk": {},
    "normalized-relu": {"sparsity": "relu", "normalize_input": True},
    "mlp-encoder": {"encoder_hidden": [32]},
    "deep": {"encoder_hidden": [32], "decoder_hidden": [32], "layer_norm": True},
    "stacked": {"n_stacked": 2},
}


@pytest.fixture(scope="module")
def sae_bench():
    return pytest.importorskip("sae_bench.custom_saes.base_sae", reason=PEERS)


@pytest.fixture(scope="module")
def tiny_hooked_transformer(sae_bench):
    from tiny_models import judge_tokenizer
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    config = HookedTransformerConfig(n_layers=2, d_model=D_MODEL, n_ctx=64, d_head=4, n_heads=4,
                                     d_mlp=32, d_vocab=100, act_fn="gelu", model_name="tiny",
                                     normalization_type="LN", device="cpu", seed=0)
    return HookedTransformer(config, tokenizer=judge_tokenizer())


def adapter(name: str):
    from hf_deepsae.interop import SAEBenchAdapter

    torch.manual_seed(0)
    sae = DeepSAEModel(DeepSAEConfig(d_in=D_MODEL, n_latents=64, k=4, layer=LAYER,
                                     base_model_name_or_path="tiny", **ARCHITECTURES[name]))
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    if sae.config.normalize_input:
        sae.initialize_from_activations(5 * torch.randn(128, D_MODEL))
    return SAEBenchAdapter(sae), sae


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_adapter_passes_saebenchs_interface_checks(monkeypatch, sae_bench,
                                                   tiny_hooked_transformer, name):
    from sae_bench.sae_bench_utils.general_utils import load_and_format_sae

    wrapped, _ = adapter(name)
    assert wrapped.check_decoder_norms()
    monkeypatch.setattr(sae_bench.HookedTransformer, "from_pretrained",
                        lambda *args, **kwargs: tiny_hooked_transformer)
    wrapped.test_sae("tiny")
    sae_id, loaded, _ = load_and_format_sae("hf_deepsae", wrapped, "cpu")
    assert loaded is wrapped and wrapped.cfg.hook_name == f"blocks.{LAYER}.hook_mlp_out"


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_adapter_reconstructs_exactly_what_the_sae_does(sae_bench, name):
    wrapped, sae = adapter(name)
    x = 3 * torch.randn(10, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), sae(x).reconstruction, rtol=1e-5, atol=1e-5)
        active = wrapped.encode(x) != 0
        torch.testing.assert_close(active, sae.encode_dense(x) != 0, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["topk", "normalized-relu", "mlp-encoder", "stacked"])
def test_linear_decoders_decode_as_latents_times_w_dec(sae_bench, name):
    wrapped, _ = adapter(name)
    x = 3 * torch.randn(10, D_MODEL)
    with torch.no_grad():
        latents = wrapped.encode(x)
        torch.testing.assert_close(latents @ wrapped.W_dec + wrapped.b_dec, wrapped.decode(latents),
                                   rtol=1e-5, atol=1e-5)
    assert wrapped.linear_decoder is (name != "stacked")


def test_deep_decoders_expose_normalised_effective_directions(sae_bench):
    wrapped, sae = adapter("deep")
    with torch.no_grad():
        directions = sae.latent_directions()
    torch.testing.assert_close(wrapped.W_dec, directions / directions.norm(dim=-1, keepdim=True))
    assert not wrapped.linear_decoder and not wrapped.linear_encoder
    assert torch.isnan(wrapped.W_enc).all()


@pytest.mark.parametrize("name", ["topk", "normalized-relu"])
def test_linear_encoders_expose_their_pre_activations(sae_bench, name):
    wrapped, sae = adapter(name)
    x = 3 * torch.randn(10, D_MODEL)
    with torch.no_grad():
        pre_acts = x @ wrapped.W_enc + wrapped.b_enc
        active = wrapped.encode(x) != 0
        torch.testing.assert_close(wrapped.encode(x)[active], pre_acts[active],
                                   rtol=1e-5, atol=1e-5)


def test_transcoders_are_refused(sae_bench):
    from hf_deepsae.interop import SAEBenchAdapter

    sae = DeepSAEModel(DeepSAEConfig(d_in=D_MODEL, transcoder=True, layer=0,
                                     base_model_name_or_path="tiny"))
    with pytest.raises(ValueError, match="transcoder"):
        SAEBenchAdapter(sae)
