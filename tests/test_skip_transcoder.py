"""Skip transcoders: `skip_connection=True` adds `W_skip x` to any transcoder architecture."""

from __future__ import annotations

import pytest
import torch
from tiny_models import HIDDEN_SIZE, tiny_input_ids, tiny_model
from transformers import AutoModel

from hf_deepsae import DeepSAEConfig, DeepSAEModel, splice

D_IN, D_OUT, N_LATENTS, K = 8, 6, 32, 4
ARCHITECTURES = {
    "shallow": {},
    "mlp-encoder": {"encoder_hidden": [16]},
    "deep": {"encoder_hidden": [16], "decoder_hidden": [16], "layer_norm": True},
    "jumprelu": {"sparsity": "jumprelu"},
}


def skip_transcoder(name: str, d_in: int = D_IN, d_out: int = D_OUT, **overrides) -> DeepSAEModel:
    """A skip transcoder with every parameter random (W_skip included)."""
    torch.manual_seed(0)
    config = DeepSAEConfig(d_in=d_in, d_out=d_out, n_latents=N_LATENTS, k=K, transcoder=True,
                           skip_connection=True, **ARCHITECTURES[name] | overrides)
    sae = DeepSAEModel(config).eval()
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return sae


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_skip_starts_at_zero_so_a_new_skip_transcoder_is_a_plain_one(name):
    torch.manual_seed(0)
    with_skip = DeepSAEModel(DeepSAEConfig(d_in=D_IN, d_out=D_OUT, n_latents=N_LATENTS, k=K,
                                           transcoder=True, skip_connection=True,
                                           **ARCHITECTURES[name]))
    assert with_skip.W_skip.shape == (D_OUT, D_IN) and not with_skip.W_skip.any()
    without = DeepSAEModel(DeepSAEConfig(**with_skip.config.to_diff_dict() | {
        "skip_connection": False}))
    without.load_state_dict({key: value for key, value in with_skip.state_dict().items()
                             if key != "W_skip"})
    x, y = torch.randn(5, D_IN), torch.randn(5, D_OUT)
    torch.testing.assert_close(with_skip(x, target=y).reconstruction,
                               without(x, target=y).reconstruction, rtol=0, atol=0)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_output_is_the_latents_decoding_plus_w_skip_x(name):
    sae = skip_transcoder(name, normalize_input=True)
    sae.initialize_from_activations(3 * torch.randn(64, D_IN), torch.randn(64, D_OUT))
    x, y = torch.randn(2, 5, D_IN), torch.randn(2, 5, D_OUT)
    with torch.no_grad():
        latents = sae.encode(x)
        expected = sae.decode(*latents) + x @ (sae.W_skip * sae.input_scale / sae.output_scale).T
        torch.testing.assert_close(sae(x, target=y).reconstruction, expected)
        torch.testing.assert_close(sae.decode(*latents, x=x), expected)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_skip_transcoders_save_and_load_through_automodel(tmp_path, name):
    sae = skip_transcoder(name)
    sae.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert loaded.config.skip_connection is True
    x, y = torch.randn(4, D_IN), torch.randn(4, D_OUT)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, target=y).reconstruction,
                                   sae(x, target=y).reconstruction, rtol=0, atol=0)


def test_skip_connection_needs_a_transcoder():
    with pytest.raises(ValueError, match="skip_connection=True.*set transcoder=True"):
        DeepSAEConfig(d_in=D_IN, skip_connection=True)


def test_splice_feeds_the_skip_term_downstream():
    model = tiny_model("llama")
    sae = skip_transcoder("shallow", d_in=HIDDEN_SIZE, d_out=HIDDEN_SIZE)
    written = {}
    with splice(model, {1: sae}) as handle:
        write_site = handle.sites[1][1]
        recorder = model.get_submodule(write_site.path).register_forward_hook(
            lambda module, args, output: written.setdefault("output", output))
        model(tiny_input_ids())
        recorder.remove()
        mlp_input = handle.activations[1]
    with torch.no_grad():
        reconstruction = sae.decode(*sae.encode(mlp_input), x=mlp_input)
    torch.testing.assert_close(written["output"], reconstruction)
    assert sae.W_skip.abs().sum() > 0 and not torch.allclose(
        reconstruction, sae.decode(*sae.encode(mlp_input)))
