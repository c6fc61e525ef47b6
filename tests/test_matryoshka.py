"""Matryoshka SAEs: nested latent prefixes, each trained to reconstruct on its own."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_modeling import D_IN, FLOAT32_EPS, inputs_for, make_sae, sparse_dataset, train_adam
from transformers import AutoModel

from hf_deepsae import DeepSAEConfig

N_LATENTS = 128  # make_sae's
PREFIXES = {  # global latent ids: the stacked SAE's 3 × 128 latents nest stage by stage
    "topk": [8, 32],
    "batchtopk": [8, 32],
    "mlp-encoder": [8, 32],
    "deep": [8, 32],
    "stacked": [8, 128, 200],
    "transcoder": [8, 32],
}
TOLERANCE = {"rtol": N_LATENTS * FLOAT32_EPS, "atol": N_LATENTS * FLOAT32_EPS}
"""Two fp32 evaluations of the same reconstruction that sum up to `N_LATENTS` decoder rows in
another order."""


def make_matryoshka(name: str, **overrides):
    """`make_sae(name)` with `PREFIXES[name]` and unequal weights, every parameter perturbed (so
    biases, a deep decoder's MLP and a transcoder's skip all matter)."""
    prefixes = PREFIXES[name]
    settings = {"matryoshka_prefixes": prefixes,
                "matryoshka_weights": [float(i + 1) for i in range(len(prefixes) + 1)]}
    if name == "transcoder":
        settings["skip_connection"] = True
    sae = make_sae(name, **settings | overrides)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return sae


def fvu(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (reconstruction - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum()


def weighted_mean(values: torch.Tensor, weights: list[float]) -> torch.Tensor:
    weights = torch.tensor(weights)
    return (weights * values).sum() / weights.sum()


@pytest.mark.parametrize("name", PREFIXES)
def test_each_prefix_fvu_is_that_of_decoding_only_its_latents(name):
    sae = make_matryoshka(name)
    inputs = inputs_for(sae, 24)
    x, target = inputs["x"], inputs.get("target", inputs["x"])
    out = sae(**inputs)  # batchtopk: training mode, the same batch selects the same latents
    dense = sae.encode_dense(x)
    expected = torch.stack([
        fvu(sae.decode(dense * (torch.arange(dense.shape[-1]) < prefix), x=x), target)
        for prefix in sae.config.matryoshka_prefixes])
    torch.testing.assert_close(out.matryoshka_fvu, expected, **TOLERANCE)
    assert torch.equal(out.matryoshka_fvu[-1], out.fvu)
    torch.testing.assert_close(
        out.loss, weighted_mean(expected, sae.config.matryoshka_weights), **TOLERANCE)


def dense_matryoshka_loss(sae, x: torch.Tensor) -> torch.Tensor:
    """The Matryoshka loss of a single-stage top-k SAE with plain autograd through dense latents:
    each prefix decodes `z[:, :p] @ W_dec[:p]` through the decoder."""
    stage, config = sae.stages[0], sae.config
    pre_acts = stage.encoder(stage.encoder_mlp(x - stage.b_dec))
    values, indices = pre_acts.topk(config.k)
    z = torch.zeros_like(pre_acts).scatter(-1, indices, F.relu(values))
    fvus = []
    for prefix in config.matryoshka_prefixes:
        first_layer = z[:, :prefix] @ stage.W_dec[:prefix]
        decoded = first_layer if stage.decoder_mlp is None else stage.decoder_mlp(first_layer)
        fvus.append(fvu(decoded + stage.b_dec, x))
    return weighted_mean(torch.stack(fvus), config.matryoshka_weights)


@pytest.mark.parametrize("name", ["topk", "deep"])
def test_loss_and_gradients_equal_a_direct_dense_computation(name):
    sae = make_matryoshka(name)
    x = torch.randn(16, D_IN)
    sae(x).loss.backward()
    sparse_grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    reference = dense_matryoshka_loss(sae, x)
    reference.backward()
    torch.testing.assert_close(sae(x).loss, reference, **TOLERANCE)
    for param_name, param in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[param_name], param.grad, rtol=1e-4, atol=1e-5,
                                   msg=f"gradient of {param_name} differs")


@pytest.mark.parametrize("name", ["topk", "batchtopk", "deep", "stacked"])
def test_prefix_fvu_falls_as_the_prefix_grows_after_training(name):
    sae = make_sae(name, matryoshka_prefixes=PREFIXES[name])
    data = sparse_dataset()
    sae.initialize_from_activations(data)
    train_adam(sae, data)
    with torch.no_grad():
        prefix_fvus = sae(data).matryoshka_fvu
    assert (prefix_fvus.diff() < 0).all(), prefix_fvus
    assert prefix_fvus[-1] < 0.35, prefix_fvus


def zipf_dataset(n_rows: int = 2048, n_features: int = 96, active: int = 3) -> torch.Tensor:
    """Rows that are sums of `active` of `n_features` random unit directions, feature i drawn
    with probability ∝ 1/(i+1): a few general features and a long tail, as in language models."""
    generator = torch.Generator().manual_seed(0)
    dictionary = F.normalize(torch.randn(n_features, D_IN, generator=generator), dim=-1)
    frequency = 1.0 / torch.arange(1, n_features + 1)
    indices = torch.multinomial(frequency.expand(n_rows, -1), active, generator=generator)
    coefficients = torch.rand(n_rows, active, generator=generator) + 0.5
    return (coefficients.unsqueeze(-1) * dictionary[indices]).sum(1)


def test_the_first_latents_of_a_matryoshka_sae_learn_the_frequent_features():
    data = zipf_dataset()
    first_8_fvu = {}
    for prefixes in ((8, 32), None):
        sae = make_sae("topk", matryoshka_prefixes=prefixes)
        sae.initialize_from_activations(data)
        train_adam(sae, data)
        with torch.no_grad():
            first_8_fvu[prefixes] = float(fvu(sae.decode(*sae.encode(data, prefix=8)), data))
    assert first_8_fvu[(8, 32)] < 0.8 * first_8_fvu[None], first_8_fvu


@pytest.mark.parametrize("name", ["topk", "batchtopk", "stacked"])
def test_encode_with_a_prefix_truncates_the_full_selection(name):
    sae = make_matryoshka(name).eval()
    x = torch.randn(10, D_IN)
    full_acts, full_indices = sae.encode(x)
    full_dense = sae.encode_dense(x)
    for prefix in sae.config.matryoshka_prefixes:
        acts, indices = sae.encode(x, prefix=prefix)
        if full_indices is not None:  # top-k: the same ids, the values of those >= prefix zeroed
            assert torch.equal(indices, full_indices)
            assert torch.equal(acts, full_acts * (full_indices < prefix))
        dense = sae.encode_dense(x, prefix=prefix)
        assert torch.equal(dense[:, :prefix], full_dense[:, :prefix])
        assert not dense[:, prefix:].any()


@pytest.mark.parametrize("prefix", [0, N_LATENTS + 1, 2.5, True])
def test_encode_refuses_a_prefix_outside_the_latents(prefix):
    with pytest.raises(ValueError, match=rf"prefix={prefix!r} must be a number of latents in "
                                         rf"\[1, {N_LATENTS}\]"):
        make_matryoshka("topk").encode(torch.randn(2, D_IN), prefix=prefix)


@pytest.mark.parametrize("name", ["topk", "deep", "stacked"])
def test_save_and_load_keep_the_prefixes_the_latent_order_and_the_outputs(name, tmp_path):
    sae = make_matryoshka(name)
    sae.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["matryoshka_prefixes"] == sae.config.matryoshka_prefixes
    loaded = AutoModel.from_pretrained(tmp_path)
    assert loaded.config.matryoshka_prefixes == sae.config.matryoshka_prefixes
    assert loaded.config.matryoshka_weights == sae.config.matryoshka_weights
    for key, value in sae.state_dict().items():  # W_dec / encoder rows in the same order
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(12, D_IN)
    assert torch.equal(loaded(x).matryoshka_fvu, sae(x).matryoshka_fvu)
    for prefix in sae.config.matryoshka_prefixes:
        assert torch.equal(loaded.encode_dense(x, prefix=prefix),
                           sae.encode_dense(x, prefix=prefix))


def test_the_full_width_is_the_last_prefix_whether_given_or_not():
    settings = {"d_in": 16, "n_latents": 64, "k": 4}
    assert DeepSAEConfig(**settings, matryoshka_prefixes=[8, 32]).matryoshka_prefixes == [8, 32, 64]
    assert DeepSAEConfig(**settings, matryoshka_prefixes=[8, 64]).matryoshka_prefixes == [8, 64]
    stacked = DeepSAEConfig(**settings, n_stacked=2, matryoshka_prefixes=(8, 100))
    assert stacked.matryoshka_prefixes == [8, 100, 128]


def test_the_config_round_trips_through_a_folder(tmp_path):
    config = DeepSAEConfig(d_in=16, n_latents=64, k=4, matryoshka_prefixes=[8, 32],
                           matryoshka_weights=[1.0, 2.0, 1.0])
    config.save_pretrained(tmp_path)
    assert DeepSAEConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"matryoshka_prefixes": [32, 8]}, r"strictly increase, smallest first: use \[8, 32\]"),
        ({"matryoshka_prefixes": [8, 8, 32]}, r"must strictly increase.*use \[8, 32\]"),
        ({"matryoshka_prefixes": [8, 65]}, r"at most n_total_latents=64 .*drop \[65\]"),
        ({"matryoshka_prefixes": [0, 8]}, r"invalid matryoshka_prefixes=\[0, 8\]; give positive"),
        ({"matryoshka_prefixes": [-4]}, "give positive latent counts"),
        ({"matryoshka_prefixes": [8.5]}, "give positive latent counts"),
        ({"matryoshka_prefixes": []}, "or None for an ordinary SAE"),
        ({"matryoshka_prefixes": 16}, r"invalid matryoshka_prefixes=16; give a list"),
        ({"matryoshka_weights": [1.0, 1.0]}, "set those too, or drop the weights"),
        ({"matryoshka_prefixes": [8], "matryoshka_weights": [1.0]},
         r"one weight per prefix of \[8, 64\] .*2 weights, not 1"),
        ({"matryoshka_prefixes": [8], "matryoshka_weights": [1.0, -1.0]}, ">= 0 and not all 0"),
        ({"matryoshka_prefixes": [8], "matryoshka_weights": [0, 0]}, ">= 0 and not all 0"),
        ({"matryoshka_prefixes": [8], "matryoshka_weights": [1.0, float("nan")]}, "finite"),
    ],
)
def test_invalid_prefixes_and_weights_raise_with_field_and_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeepSAEConfig(d_in=16, n_latents=64, k=4, **kwargs)
