"""SAE activation-level metrics as a 🤗 `evaluate` metric (FVU, L0, dead/dense latents, ...).

Hub metrics are unreachable offline, so this module ships in the repository; load it by path:

    metric = evaluate.load("metrics/sae_metrics")                    # reconstructions only
    metric = evaluate.load("metrics/sae_metrics", "sparse_latents")  # + top-k values and indices
    metric = evaluate.load("metrics/sae_metrics", "dense_latents")   # + dense latents

The numbers come from `hf_deepsae.evaluation.ActivationMetrics`, so they equal the Python API's.
"""

import datasets
import evaluate
import torch

from hf_deepsae.evaluation import DENSE_DENSITY_THRESHOLD, ActivationMetrics

_DESCRIPTION = """
Reconstruction and sparsity metrics of a sparse autoencoder (SAE) or transcoder: FVU (squared error
over the total variance of the references), explained variance, MSE, cosine similarity, relative
reconstruction bias, L2 ratio and, when latents are given, L0 (mean, std), L1, dead fraction (never
fired) and dense fraction (fired on more than `dense_threshold` of the tokens).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: SAE reconstructions, one `d`-vector per token.
    references: the activations the SAE should reproduce, one `d`-vector per token.
    latent_acts: ("sparse_latents") the k active values per token; ("dense_latents") all latents.
    latent_indices: ("sparse_latents") the k latent ids of `latent_acts` per token.
    n_latents: number of latents; required for "sparse_latents" (dead latents are never seen).
    dense_threshold: firing density above which a latent counts as dense (default 0.1).
    min_tokens: raise `ValueError` below this many tokens (default 2).
    return_distributions: also return `feature_density` (per latent) and `l0_histogram` lists.
Returns:
    dict with `n_tokens`, `fvu`, `explained_variance`, `mse`, `cosine_similarity`,
    `relative_reconstruction_bias`, `l2_ratio` and with latents `l0`, `l0_std`, `l1`,
    `dead_fraction`, `dense_fraction`.
Examples:
    >>> metric = evaluate.load("metrics/sae_metrics")
    >>> result = metric.compute(predictions=[[1.0, 1.0], [3.0, 0.0]],
    ...                         references=[[1.0, 0.0], [3.0, 0.0]])
    >>> result["fvu"]
    0.5
"""

_VECTOR = datasets.Sequence(datasets.Value("float32"))
_FEATURES = {
    "default": {"predictions": _VECTOR, "references": _VECTOR},
    "sparse_latents": {
        "predictions": _VECTOR,
        "references": _VECTOR,
        "latent_acts": _VECTOR,
        "latent_indices": datasets.Sequence(datasets.Value("int64")),
    },
    "dense_latents": {"predictions": _VECTOR, "references": _VECTOR, "latent_acts": _VECTOR},
}
_CHUNK_TOKENS = 8192


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SAEMetrics(evaluate.Metric):
    """`evaluate` front end of `hf_deepsae.evaluation.ActivationMetrics`."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in _FEATURES:
            raise ValueError(
                f"unknown config {self.config_name!r}; choose one of {sorted(_FEATURES)}"
            )
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(_FEATURES[self.config_name]),
        )

    def _compute(
        self,
        predictions: list[list[float]],
        references: list[list[float]],
        latent_acts: list[list[float]] | None = None,
        latent_indices: list[list[int]] | None = None,
        n_latents: int | None = None,
        dense_threshold: float = DENSE_DENSITY_THRESHOLD,
        min_tokens: int = 2,
        return_distributions: bool = False,
    ) -> dict:
        metrics = ActivationMetrics(n_latents=n_latents, dense_threshold=dense_threshold)
        for start in range(0, len(references), _CHUNK_TOKENS):
            rows = slice(start, start + _CHUNK_TOKENS)
            metrics.update(
                torch.tensor(references[rows]),
                torch.tensor(predictions[rows]),
                None if latent_acts is None else torch.tensor(latent_acts[rows]),
                None if latent_indices is None else torch.tensor(latent_indices[rows]),
            )
        result = metrics.compute(min_tokens=min_tokens)
        return result.to_dict() if return_distributions else result.scalars()
