"""Reading latents: activation cache (delphi layout), examples, statistics, browser, auto-interp.

The pipeline, each step usable alone:

`build_latent_cache` (where each latent fired over a corpus; `LatentCache.save` writes delphi's
layout) → `compute_statistics` (firing rate, activations, top tokens, single-token flag) →
`decoder_directions` + `nearest_latents` (neighbours) → `ContextWindows` + `sample_examples`
(top, quantile, random / neighbour / same-token negatives) → `score_latents` (detection and
fuzzing) with any `Explainer`/`Detector`/`Fuzzer` (`judges`: `TransformersJudge`, `ChatJudge`;
`http_judge`: `OpenAICompatibleChat` for any OpenAI-compatible server) → `summarize` →
`render_browser`.
`examples/interpret.py` runs it all for a trained SAE.
"""

from .browser import render_browser
from .cache import LatentCache, build_latent_cache, build_latent_caches, split_ranges
from .http_judge import JudgeUsage, OpenAICompatibleChat, ResponseCache
from .judges import (
    ChatJudge,
    Detector,
    Explainer,
    Fuzzer,
    JudgeConfig,
    TransformersJudge,
    load_judge,
)
from .sampling import (
    ContextWindows,
    Example,
    LatentExamples,
    SamplingConfig,
    decoder_directions,
    nearest_latents,
    quantile_bins,
    sample_examples,
    token_strings,
)
from .scoring import (
    ClassificationScores,
    LatentScore,
    ScoringConfig,
    classification_scores,
    highlighted_text,
    plain_text,
    score_latent,
    score_latents,
    summarize,
)
from .statistics import LatentStatistics, compute_statistics

__all__ = [
    "ChatJudge",
    "ClassificationScores",
    "Fuzzer",
    "JudgeConfig",
    "JudgeUsage",
    "OpenAICompatibleChat",
    "ResponseCache",
    "classification_scores",
    "ContextWindows",
    "Detector",
    "Example",
    "Explainer",
    "LatentCache",
    "LatentExamples",
    "LatentScore",
    "LatentStatistics",
    "SamplingConfig",
    "ScoringConfig",
    "TransformersJudge",
    "build_latent_cache",
    "build_latent_caches",
    "compute_statistics",
    "decoder_directions",
    "highlighted_text",
    "load_judge",
    "nearest_latents",
    "plain_text",
    "quantile_bins",
    "render_browser",
    "sample_examples",
    "score_latent",
    "score_latents",
    "split_ranges",
    "summarize",
    "token_strings",
]
