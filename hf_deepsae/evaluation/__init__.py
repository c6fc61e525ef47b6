"""How good is an SAE? The numbers the field compares SAEs by, computed over streams of tokens.

- `metrics`: the streaming accumulators, on tensors alone — `ActivationMetrics` (FVU, explained
  variance, MSE, cosine similarity, L0, L1, feature density, dead/dense fractions, relative
  reconstruction bias, L2 ratio) and `LanguageModelMetrics` (CE clean/spliced/ablated, CE-loss
  score, KL and its score).
- `evaluator`: `SAEEvaluator` / `evaluate_saes` feed both from token batches through `splice`.
- `plots`: `plot_feature_density` (one SAE, or several overlaid) and `plot_fvu_vs_l0`, as PNGs.

Benchmark families, each a function returning a result dataclass with `scalars()` (the
model-card numbers) and `to_dict()` (everything, JSON-ready):

- `absorption` (`first_letter`): feature absorption and first-letter F1 (Chanin et al. 2024,
  SAEBench): `first_letter_data` once per site, `evaluate_absorption` per SAE.
- `sparse_probing` (`probing_tasks`): k-sparse probes over latents against probes on the raw
  activations (Gurnee et al. 2023, SAEBench): `probing_activations` once per task and site,
  `evaluate_sparse_probing` per SAE.
- `autointerp`: explanations and detection/fuzzing scores of sampled latents by a judge
  (import it from `hf_deepsae.evaluation.autointerp`: it builds on `hf_deepsae.interpret`).
- `suite`: `BenchmarkSuite` runs any of them on many SAEs, building each one's data once.
- `probes` (logistic regression, k-sparse selection, F1) and `latent_effects` (latents and
  what each contributes to the reconstruction, for every decoder) are their shared parts.

`metrics/sae_metrics` (at the repository root) wraps `ActivationMetrics` as an `evaluate` metric,
and `examples/evaluate.py` is the command line.
"""

from .absorption import AbsorptionResult, LetterAbsorption, absorption, evaluate_absorption
from .evaluator import (
    JOINT,
    SAEEvaluationMetrics,
    SAEEvaluationResult,
    SAEEvaluator,
    evaluate_saes,
    zero_ablate,
)
from .first_letter import (
    AbsorptionConfig,
    FirstLetterData,
    first_letter_data,
    fit_first_letter_probes,
)
from .metrics import (
    DENSE_DENSITY_THRESHOLD,
    ActivationMetrics,
    ActivationMetricsResult,
    LanguageModelMetrics,
    LanguageModelMetricsResult,
)
from .plots import plot_feature_density, plot_fvu_vs_l0
from .probes import BinaryScores, LinearProbe, binary_scores, fit_logistic_regression
from .probing_tasks import (
    TextClassificationTask,
    default_probing_tasks,
    load_classification_task,
)
from .sparse_probing import (
    ProbingActivations,
    ProbingTaskResult,
    SparseProbingConfig,
    SparseProbingResult,
    evaluate_sparse_probing,
    probing_activations,
)
from .suite import BENCHMARKS, BenchmarkSuite, benchmark_scalars

__all__ = [
    "BENCHMARKS",
    "BenchmarkSuite",
    "benchmark_scalars",
    "AbsorptionConfig",
    "AbsorptionResult",
    "BinaryScores",
    "FirstLetterData",
    "LetterAbsorption",
    "LinearProbe",
    "ProbingActivations",
    "ProbingTaskResult",
    "SparseProbingConfig",
    "SparseProbingResult",
    "TextClassificationTask",
    "absorption",
    "binary_scores",
    "default_probing_tasks",
    "evaluate_absorption",
    "evaluate_sparse_probing",
    "first_letter_data",
    "fit_first_letter_probes",
    "fit_logistic_regression",
    "load_classification_task",
    "probing_activations",
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
