"""Auto-interpretability as a benchmark: explanations and detection/fuzzing scores of latents.

The `hf_deepsae.interpret` pipeline end to end for one SAE: cache its latents over a corpus,
compute their statistics, sample `n_latents` latents uniformly among *all* of them (dead ones are
drawn as often as any and counted, never dropped; the judge is not asked about them), draw
examples with neighbours by effective decoder direction (taken at each latent's mean activation,
so deep decoders are read where they work), and score with any judge (`interpret.load_judge`: a
server through `OpenAICompatibleChat`, or a local causal LM). The result keeps every latent's
explanation and scores, the summary of `interpret.summarize`, and the judge's usage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ..interpret import (
    ContextWindows,
    LatentScore,
    SamplingConfig,
    ScoringConfig,
    build_latent_cache,
    compute_statistics,
    decoder_directions,
    nearest_latents,
    sample_examples,
    score_latents,
    summarize,
)
from ..interpret.judges import ChatJudge
from ..modeling_deepsae import DeepSAEModel


@dataclass
class AutoInterpConfig:
    """How much of the corpus to read and how many latents to explain."""

    n_latents: int = field(default=50, metadata={
        "help": "latents drawn uniformly among all (dead ones included) to explain and score"})
    n_tokens: int = field(default=65_536, metadata={"help": "corpus tokens to cache latents on"})
    context_length: int = field(default=256, metadata={
        "help": "tokens per cached sequence (a multiple of the example window, 32)"})
    lm_batch_size: int = field(default=8, metadata={"help": "sequences per forward pass"})
    seed: int = field(default=0, metadata={"help": "seed of the latent sample"})


@dataclass
class AutoInterpResult:
    """Explanations and scores of the sampled latents (`interpret.LatentScore`), their summary
    (`interpret.summarize`, with the SAE's dead latents), the judge and what it cost."""

    judge: str
    n_tokens: int
    summary: dict[str, Any]
    latents: list[LatentScore]
    usage: dict[str, float] | None = None

    def scalars(self) -> dict[str, float]:
        """The headline numbers under model-card names (`hf_deepsae.model_card.METRICS`)."""
        names = {"mean_balanced_accuracy": "autointerp_detection_balanced_accuracy",
                 "fuzzing_mean_balanced_accuracy": "autointerp_fuzzing_balanced_accuracy",
                 "firing_rate_weighted_accuracy": "autointerp_detection_accuracy_weighted",
                 "perfect_fraction": "autointerp_detection_perfect_fraction",
                 "mean_quantile_agreement": "autointerp_quantile_agreement"}
        return {name: self.summary[key] for key, name in names.items()
                if self.summary.get(key) is not None}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "latents": [score.to_dict() for score in self.latents]}


def sample_latents(n_total: int, n: int, seed: int) -> list[int]:
    """`n` distinct latents of `n_total`, uniformly (seeded), in increasing order."""
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_total, generator=generator)[:n].tolist())


def evaluate_autointerp(model: nn.Module, tokenizer: PreTrainedTokenizerBase, sae: DeepSAEModel,
                        input_ids: Tensor, judge: ChatJudge, judge_name: str,
                        config: AutoInterpConfig | None = None,
                        sampling: SamplingConfig | None = None,
                        scoring: ScoringConfig | None = None, max_workers: int = 1
                        ) -> AutoInterpResult:
    """Explain and score `config.n_latents` latents of `sae` on `input_ids` `[n, ctx]`.

    `judge` explains, detects and (if it can) fuzzes; `max_workers` latents are judged at once
    (for a server judge).
    """
    config, sampling = config or AutoInterpConfig(), sampling or SamplingConfig()
    cache = build_latent_cache(model, sae, input_ids, config.lm_batch_size)
    statistics = compute_statistics(cache)
    directions = decoder_directions(sae, statistics.mean_activation)
    neighbours = nearest_latents(directions, sampling.n_neighbours, candidates=~statistics.dead)
    windows = ContextWindows(cache, sampling.example_ctx_len)
    examples = [sample_examples(windows, latent, sampling, statistics.top_tokens_of(latent),
                                neighbours)
                for latent in sample_latents(statistics.n_latents, config.n_latents, config.seed)]
    scores = score_latents(examples, judge, judge, tokenizer, statistics, scoring,
                           max_workers=max_workers)
    usage = getattr(judge.chat, "usage", None)
    return AutoInterpResult(judge=judge_name, n_tokens=cache.n_tokens,
                            summary=summarize(scores, statistics), latents=scores,
                            usage=None if usage is None else usage.to_dict())
