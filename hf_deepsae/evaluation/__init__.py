"""How good is an SAE? The numbers the field compares SAEs by, computed over streams of tokens.

- `metrics`: the streaming accumulators, on tensors alone — `ActivationMetrics` (FVU, explained
  variance, MSE, cosine similarity, L0, L1, feature density, dead/dense fractions, relative
  reconstruction bias, L2 ratio) and `LanguageModelMetrics` (CE clean/spliced/ablated, CE-loss
  score, KL and its score).
- `evaluator`: `SAEEvaluator` / `evaluate_saes` feed both from token batches through `splice`.
- `plots`: `plot_feature_density` (one SAE, or several overlaid) and `plot_fvu_vs_l0`, as PNGs.

`metrics/sae_metrics` (at the repository root) wraps `ActivationMetrics` as an `evaluate` metric,
and `examples/evaluate.py` is the command line.
"""

from .evaluator import (
    JOINT,
    SAEEvaluationMetrics,
    SAEEvaluationResult,
    SAEEvaluator,
    evaluate_saes,
    zero_ablate,
)
from .metrics import (
    DENSE_DENSITY_THRESHOLD,
    ActivationMetrics,
    ActivationMetricsResult,
    LanguageModelMetrics,
    LanguageModelMetricsResult,
)
from .plots import plot_feature_density, plot_fvu_vs_l0

__all__ = [
    "DENSE_DENSITY_THRESHOLD",
    "JOINT",
    "ActivationMetrics",
    "ActivationMetricsResult",
    "LanguageModelMetrics",
    "LanguageModelMetricsResult",
    "SAEEvaluationMetrics",
    "SAEEvaluationResult",
    "SAEEvaluator",
    "evaluate_saes",
    "plot_feature_density",
    "plot_fvu_vs_l0",
    "zero_ablate",
]
