"""Activation-level metrics: hand-computed values on tiny cases; streaming equals one-shot."""

import math

import pytest
import torch

from hf_deepsae import DeepSAEConfig, DeepSAEModel
from hf_deepsae.evaluation import ActivationMetrics


def compute(target, reconstruction, latent_acts=None, latent_indices=None, n_latents=None):
    metrics = ActivationMetrics(n_latents=n_latents)
    metrics.update(target, reconstruction, latent_acts, latent_indices)
    return metrics.compute()


def test_perfect_reconstruction_scores_perfectly():
    target = torch.randn(16, 8)
    result = compute(target, target.clone())
    assert result.fvu == 0.0
    assert result.explained_variance == 1.0
    assert result.mse == 0.0
    assert result.cosine_similarity == pytest.approx(1.0)
    assert result.relative_reconstruction_bias == pytest.approx(1.0)
    assert result.l2_ratio == pytest.approx(1.0)


def test_reconstruction_metrics_match_hand_computed_values():
    # mean [2, 0]; total variance (1-2)^2 + (3-2)^2 = 2; squared error 1.
    target = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    reconstruction = torch.tensor([[1.0, 1.0], [3.0, 0.0]])
    result = compute(target, reconstruction)
    assert result.n_tokens == 2
    assert result.fvu == pytest.approx(0.5)
    assert result.explained_variance == pytest.approx(0.5)
    assert result.mse == pytest.approx(1 / 4)
    assert result.cosine_similarity == pytest.approx((1 / math.sqrt(2) + 1) / 2)
    # E||x_hat||^2 / E[x_hat . x] = (2 + 9) / (1 + 9)
    assert result.relative_reconstruction_bias == pytest.approx(1.1)
    assert result.l2_ratio == pytest.approx((math.sqrt(2) + 1) / 2)


def test_zero_reconstruction_explains_no_variance_around_zero_mean():
    target = torch.tensor([[1.0, -2.0], [-1.0, 2.0]])
    result = compute(target, torch.zeros_like(target))
    assert result.fvu == pytest.approx(1.0)
    assert result.cosine_similarity == 0.0
    assert result.l2_ratio == 0.0


SPARSE_ACTS = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
SPARSE_INDICES = torch.tensor([[0, 1], [2, 0]])


def test_sparsity_metrics_from_sparse_latents():
    target = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    result = compute(target, target, SPARSE_ACTS, SPARSE_INDICES, n_latents=4)
    # token 0 fires latent 0 (latent 1's value is 0: not active); token 1 fires latents 2 and 0.
    assert result.l0 == pytest.approx(1.5)
    assert result.l0_std == pytest.approx(0.5)
    assert result.l1 == pytest.approx(3.0)
    assert result.feature_density.tolist() == [1.0, 0.0, 0.5, 0.0]
    assert result.l0_histogram.tolist() == [0, 1, 1, 0, 0]
    assert result.dead_fraction == pytest.approx(0.5)
    assert result.dense_fraction == pytest.approx(0.5)


def test_dense_latents_give_the_same_sparsity_metrics_as_sparse_ones():
    target = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    dense = torch.zeros(2, 4).scatter_add(1, SPARSE_INDICES, SPARSE_ACTS)
    sparse = compute(target, target, SPARSE_ACTS, SPARSE_INDICES, n_latents=4)
    assert compute(target, target, dense).to_dict() == sparse.to_dict()


def random_batch(n_tokens, generator, d=6, n_latents=10, k=3):
    # A large mean makes E[x^2] - E[x]^2 cancel badly; the streaming merge must not care.
    target = 1e3 + torch.randn(n_tokens, d, generator=generator)
    reconstruction = target + 0.3 * torch.randn(n_tokens, d, generator=generator)
    scores = torch.rand(n_tokens, n_latents, generator=generator)
    latent_acts, latent_indices = scores.topk(k, dim=-1)
    return target, reconstruction, latent_acts, latent_indices


def test_streaming_over_uneven_batches_equals_one_shot():
    generator = torch.Generator().manual_seed(0)
    batches = [random_batch(n, generator) for n in (1, 7, 30, 2)]
    streamed = ActivationMetrics(n_latents=10)
    for batch in batches:
        streamed.update(*batch)
    whole = compute(*(torch.cat(parts) for parts in zip(*batches, strict=True)), n_latents=10)
    for name, value in streamed.compute().scalars().items():
        assert value == pytest.approx(whole.scalars()[name], rel=1e-9), name


def test_fvu_matches_the_direct_definition():
    target, reconstruction, *_ = random_batch(40, torch.Generator().manual_seed(1))
    target, reconstruction = target.double(), reconstruction.double()
    expected = (target - reconstruction).pow(2).sum() / (target - target.mean(0)).pow(2).sum()
    assert compute(target, reconstruction).fvu == pytest.approx(expected.item(), rel=1e-9)


def test_merged_workers_equal_one_accumulator():
    generator = torch.Generator().manual_seed(2)
    batches = [random_batch(n, generator) for n in (5, 11, 3)]
    single, merged = ActivationMetrics(n_latents=10), ActivationMetrics(n_latents=10)
    for batch in batches:
        single.update(*batch)
        worker = ActivationMetrics(n_latents=10)
        worker.update(*batch)
        merged.merge(worker)
    assert merged.compute().scalars() == pytest.approx(single.compute().scalars(), rel=1e-9)


@pytest.mark.parametrize(
    ("n_tokens", "message"), [(0, "no tokens were evaluated"), (1, "only 1 tokens")]
)
def test_too_few_tokens_is_a_clear_error(n_tokens, message):
    metrics = ActivationMetrics()
    metrics.update(torch.ones(n_tokens, 4), torch.ones(n_tokens, 4))
    with pytest.raises(ValueError, match=message):
        metrics.compute()


def test_min_tokens_is_enforced():
    metrics = ActivationMetrics()
    metrics.update(torch.randn(8, 4), torch.randn(8, 4))
    with pytest.raises(ValueError, match="fewer than the 100 needed"):
        metrics.compute(min_tokens=100)


def test_mismatched_inputs_are_clear_errors():
    metrics = ActivationMetrics()
    with pytest.raises(ValueError, match="same shape"):
        metrics.update(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="need n_latents"):
        metrics.update(torch.zeros(2, 4), torch.zeros(2, 4), SPARSE_ACTS, SPARSE_INDICES)
    with pytest.raises(ValueError, match="beyond n_latents=2"):
        ActivationMetrics(n_latents=2).update(
            torch.zeros(2, 4), torch.zeros(2, 4), SPARSE_ACTS, SPARSE_INDICES
        )


@pytest.mark.parametrize(
    ("sparsity", "n_stacked"), [("topk", 1), ("topk", 2), ("batchtopk", 1), ("jumprelu", 1)]
)
def test_fvu_and_l0_agree_with_the_sae_forward(sparsity, n_stacked):
    torch.manual_seed(0)
    config = DeepSAEConfig(d_in=8, expansion_factor=4, k=3, sparsity=sparsity, n_stacked=n_stacked)
    sae = DeepSAEModel(config)
    activations = 3 + torch.randn(2, 10, 8)
    output = sae(activations)
    result = compute(
        activations,
        output.reconstruction,
        output.latent_acts,
        output.latent_indices,
        n_latents=config.n_total_latents,
    )
    assert result.fvu == pytest.approx(output.fvu.item(), rel=1e-5)
    expected_l0 = (sae.densify(output.latent_acts, output.latent_indices) != 0).sum(-1)
    assert result.l0 == pytest.approx(expected_l0.double().mean().item())
