"""What latents contribute, for linear, deep and stacked decoders: isolated effects and shares."""

import pytest
import torch

from hf_deepsae import DeepSAEConfig, DeepSAEModel
from hf_deepsae.evaluation.latent_effects import (
    additivity_error,
    compact_latents,
    decoder_offset,
    latent_contributions,
    probe_attributions,
    sparse_latents,
)

ARCHITECTURES = {
    "shallow": {},
    "deep": {"encoder_hidden": [24], "decoder_hidden": [24], "layer_norm": True},
    "stacked": {"n_stacked": 2},
    "batchtopk": {"sparsity": "batchtopk"},
}


def random_sae(name: str) -> DeepSAEModel:
    torch.manual_seed(0)
    sae = DeepSAEModel(DeepSAEConfig(d_in=12, n_latents=20, k=3, **ARCHITECTURES[name])).eval()
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_(std=0.5)
        sae.output_scale.fill_(1.5)
    return sae


def latents_of(sae: DeepSAEModel):
    inputs = torch.randn(6, 12, generator=torch.Generator().manual_seed(1))
    values, ids = sparse_latents(sae, inputs)
    return values.abs() + (values != 0) * 0.5, ids  # positive activations of the chosen latents


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_shares_add_up_to_the_reconstruction_along_each_direction(name):
    sae = random_sae(name)
    values, ids = latents_of(sae)
    directions = torch.randn(3, 12)
    shares = probe_attributions(sae, values, ids, directions, steps=256)
    with torch.no_grad():
        whole = (sae.decode(values, ids) - decoder_offset(sae)) @ directions.T
    torch.testing.assert_close(shares.sum(1), whole, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["shallow", "stacked"])
def test_linear_decoders_share_exactly_each_latents_row(name):
    sae = random_sae(name)
    values, ids = latents_of(sae)
    direction = torch.randn(1, 12)
    rows = torch.cat([stage.W_dec.detach() for stage in sae.stages])[ids]
    expected = (values.unsqueeze(-1) * rows / 1.5) @ direction.T
    torch.testing.assert_close(probe_attributions(sae, values, ids, direction), expected)
    contributions = latent_contributions(sae, values, ids)
    torch.testing.assert_close(contributions @ direction.T, expected, rtol=1e-5, atol=1e-5)
    assert additivity_error(sae, values, ids, contributions).max() < 1e-5


def test_a_lone_latents_share_is_its_isolated_effect_in_a_deep_decoder():
    sae = random_sae("deep")
    values, ids = torch.tensor([[1.7, 0.0]]), torch.tensor([[4, 0]])
    direction = torch.randn(1, 12)
    share = probe_attributions(sae, values, ids, direction, steps=256)[0, 0, 0]
    alone = latent_contributions(sae, values, ids)[0, 0] @ direction[0]
    assert share == pytest.approx(float(alone), rel=1e-3)


def test_a_deep_decoders_isolated_effects_do_not_add_up():
    sae = random_sae("deep")
    values, ids = latents_of(sae)
    gap = additivity_error(sae, values, ids, latent_contributions(sae, values, ids))
    assert gap.median() > 0.1


def test_compact_latents_keep_only_latents_that_fired_and_sum_groups():
    values = torch.tensor([[2.0, 0.0], [1.0, 3.0], [0.5, 0.0]])
    ids = torch.tensor([[7, 0], [7, 2], [9, 4]])
    dense, columns = compact_latents(values, ids)
    assert columns.tolist() == [2, 7, 9]
    assert dense.tolist() == [[0, 2, 0], [3, 1, 0], [0, 0, 0.5]]
    sums, _ = compact_latents(values, ids, torch.tensor([0, 0, 1]), 2)
    assert sums.tolist() == [[3, 3, 0], [0, 0, 0.5]]
