"""circuit-tracer transcoder sets: written and read by hf_deepsae and by circuit-tracer itself."""

from __future__ import annotations

import pytest
import torch

from hf_deepsae import DeepSAEConfig, DeepSAEModel
from hf_deepsae.interop import from_circuit_tracer, load_circuit_tracer_set, to_circuit_tracer

D_MODEL, N_LATENTS, K = 16, 48, 4
KINDS = {
    "relu": {"sparsity": "relu"},
    "jumprelu": {"sparsity": "jumprelu"},
    "batchtopk": {"sparsity": "batchtopk"},
    "skip-relu": {"sparsity": "relu", "skip_connection": True},
    "skip-jumprelu-normalized": {"sparsity": "jumprelu", "skip_connection": True,
                                 "normalize_input": True},
}
PEERS = "install the test-only peers extra: pip install -e '.[peers]' (see .ci/run)"


def transcoder(kind: str, layer: int, d_model: int = D_MODEL, **overrides) -> DeepSAEModel:
    """A transcoder with every parameter random, thresholds included (negative ones too)."""
    torch.manual_seed(layer)
    settings = {"d_in": d_model, "n_latents": N_LATENTS, "k": K, "transcoder": True,
                "layer": layer} | (KINDS | {"topk": {}})[kind] | overrides
    sae = DeepSAEModel(DeepSAEConfig(**settings)).eval()
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        if sae.config.sparsity in ("jumprelu", "batchtopk"):
            sae.stages[0].sparsity.threshold.uniform_(-0.05, 0.3)
    if sae.config.normalize_input:
        sae.initialize_from_activations(3 * torch.randn(64, d_model), torch.randn(64, d_model))
    return sae


def transcoder_set(kind: str, n_layers: int = 2, **overrides) -> dict[int, DeepSAEModel]:
    return {layer: transcoder(kind, layer, **overrides) for layer in range(n_layers)}


def predict(sae: DeepSAEModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return sae(x, target=x).reconstruction


def mlp_inputs() -> torch.Tensor:
    torch.manual_seed(9)
    return 2 * torch.randn(12, D_MODEL)


@pytest.mark.parametrize("kind", [*KINDS, "topk"])
def test_transcoder_sets_round_trip(tmp_path, kind):
    saes = transcoder_set(kind)
    loaded = from_circuit_tracer(to_circuit_tracer(saes, tmp_path, allow_topk=kind == "topk"))
    assert sorted(loaded) == [0, 1]
    for layer, sae in saes.items():
        assert (loaded[layer].config.layer, loaded[layer].config.skip_connection) == (
            layer, sae.config.skip_connection)
        torch.testing.assert_close(predict(loaded[layer], mlp_inputs()),
                                   predict(sae, mlp_inputs()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("saes", "message"), [
    (lambda: {0: transcoder("relu", 0), 2: transcoder("relu", 2)}, r"every layer 0..L-1"),
    (lambda: {0: transcoder("topk", 0)}, "allow_topk=True"),
    (lambda: {0: transcoder("relu", 0, encoder_hidden=[8])}, "linear encoder and decoder"),
    (lambda: {0: transcoder("relu", 0, d_out=8)}, r"d_out == d_in"),
    (lambda: {0: DeepSAEModel(DeepSAEConfig(d_in=D_MODEL, n_latents=N_LATENTS))}, "an SAE"),
])
def test_what_circuit_tracer_cannot_hold_is_refused(tmp_path, saes, message):
    with pytest.raises(ValueError, match=message):
        to_circuit_tracer(saes(), tmp_path)
    assert not any(tmp_path.iterdir())


# -- circuit-tracer itself ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def circuit_tracer():
    return pytest.importorskip("circuit_tracer.transcoder", reason=PEERS)


@pytest.mark.parametrize("kind", [*KINDS, "topk"])
def test_circuit_tracers_loader_reproduces_exported_sets(tmp_path, circuit_tracer, kind):
    saes = transcoder_set(kind)
    loaded = load_circuit_tracer_set(to_circuit_tracer(saes, tmp_path,
                                                       allow_topk=kind == "topk"))
    assert isinstance(loaded, circuit_tracer.TranscoderSet)
    assert loaded.skip_connection is saes[0].config.skip_connection
    for layer, sae in saes.items():
        with torch.no_grad():
            expected = loaded[layer](mlp_inputs())
        torch.testing.assert_close(predict(sae, mlp_inputs()), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_sets_saved_by_circuit_tracer_load_with_identical_outputs(tmp_path, circuit_tracer,
                                                                  activation, skip):
    from circuit_tracer.transcoder.activation_functions import JumpReLU

    torch.manual_seed(5)
    layers = {}
    for layer in range(2):
        function = (JumpReLU(torch.rand(N_LATENTS) * 0.3, 0.1) if activation == "jumprelu"
                    else torch.relu)
        layers[layer] = circuit_tracer.SingleLayerTranscoder(
            D_MODEL, N_LATENTS, function, layer, skip_connection=skip, device=torch.device("cpu"),
            dtype=torch.float32)
        with torch.no_grad():
            for name, parameter in layers[layer].named_parameters():
                if "threshold" not in name:
                    parameter.normal_(0, 0.3)
    reference = circuit_tracer.TranscoderSet(layers, "mlp.hook_in", "mlp.hook_out")
    reference.to_safetensors(str(tmp_path))
    loaded = from_circuit_tracer(tmp_path)
    for layer in range(2):
        with torch.no_grad():
            expected = reference[layer](mlp_inputs())
        torch.testing.assert_close(predict(loaded[layer], mlp_inputs()), expected,
                                   rtol=1e-5, atol=1e-5)
        assert loaded[layer].config.sparsity == activation


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # circuit-tracer's own hooks
def test_attribution_graph_runs_on_an_exported_set(tmp_path, circuit_tracer):
    """circuit-tracer's replacement model on a tiny TransformerLens model computes our latents."""
    import huggingface_hub.constants

    # circuit-tracer 0.5 imports a constant that huggingface_hub 1.x removed (it is only read when
    # downloading); give it the old default so its replacement model imports offline.
    huggingface_hub.constants.HF_HUB_ENABLE_HF_TRANSFER = getattr(
        huggingface_hub.constants, "HF_HUB_ENABLE_HF_TRANSFER", False)
    from circuit_tracer import attribute
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from tiny_models import judge_tokenizer
    from transformer_lens import HookedTransformerConfig

    config = HookedTransformerConfig(n_layers=2, d_model=D_MODEL, n_ctx=16, d_head=4, n_heads=4,
                                     d_mlp=32, d_vocab=100, act_fn="gelu", model_name="tiny",
                                     normalization_type="LN", device="cpu", seed=0)
    saes = transcoder_set("skip-relu")
    model = TransformerLensReplacementModel.from_config(
        config, load_circuit_tracer_set(to_circuit_tracer(saes, tmp_path)),
        tokenizer=judge_tokenizer())
    tokens = torch.tensor([1, 5, 7, 9, 11, 13])
    _, cache = model.run_with_cache(tokens)
    _, activations = model.get_activations(tokens)
    for layer, sae in saes.items():
        with torch.no_grad():
            expected = sae.encode_dense(cache[f"blocks.{layer}.mlp.hook_in"][0])
        # circuit-tracer zeroes the first (BOS) position's features by design
        torch.testing.assert_close(activations[layer][1:], expected[1:], rtol=1e-5, atol=1e-5)
    graph = attribute(tokens, model, max_n_logits=3, batch_size=16, verbose=False)
    assert graph.active_features.shape[1] == 3 and len(graph.active_features) > 0
