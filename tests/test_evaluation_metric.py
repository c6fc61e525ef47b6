"""The shipped `evaluate` metric loads from its path offline and equals the Python API."""

from pathlib import Path

import evaluate
import pytest
import torch

from hf_deepsae.evaluation import ActivationMetrics

METRIC_PATH = str(Path(__file__).parents[1] / "metrics" / "sae_metrics")


def sparse_batches(n_latents=12, k=3, d=5):
    generator = torch.Generator().manual_seed(0)
    for n_tokens in (4, 9):
        target = torch.randn(n_tokens, d, generator=generator)
        reconstruction = target + 0.5 * torch.randn(n_tokens, d, generator=generator)
        latent_acts, latent_indices = torch.rand(n_tokens, n_latents, generator=generator).topk(k)
        yield target, reconstruction, latent_acts, latent_indices


def test_sparse_latents_config_matches_activation_metrics():
    expected = ActivationMetrics(n_latents=12)
    metric = evaluate.load(METRIC_PATH, "sparse_latents")
    for target, reconstruction, latent_acts, latent_indices in sparse_batches():
        expected.update(target, reconstruction, latent_acts, latent_indices)
        metric.add_batch(
            predictions=reconstruction.tolist(),
            references=target.tolist(),
            latent_acts=latent_acts.tolist(),
            latent_indices=latent_indices.tolist(),
        )
    result = metric.compute(n_latents=12, return_distributions=True)
    expected = expected.compute()
    assert result.pop("feature_density") == expected.feature_density.tolist()
    assert result.pop("l0_histogram") == expected.l0_histogram.tolist()
    assert result == pytest.approx(expected.scalars(), rel=1e-6)


def test_default_config_needs_only_predictions_and_references():
    result = evaluate.load(METRIC_PATH).compute(
        predictions=[[1.0, 1.0], [3.0, 0.0]], references=[[1.0, 0.0], [3.0, 0.0]]
    )
    assert result["fvu"] == pytest.approx(0.5)
    assert "l0" not in result


def test_dense_latents_config_counts_nonzero_latents():
    result = evaluate.load(METRIC_PATH, "dense_latents").compute(
        predictions=[[1.0, 1.0], [3.0, 0.0]],
        references=[[1.0, 0.0], [3.0, 0.0]],
        latent_acts=[[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]],
    )
    assert result["l0"] == 1.0
    assert result["dead_fraction"] == pytest.approx(1 / 3)


def test_unknown_config_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown config 'bogus'"):
        evaluate.load(METRIC_PATH, "bogus")
