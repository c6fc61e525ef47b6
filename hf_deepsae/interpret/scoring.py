"""Auto-interpretability: explain each latent from its top examples, then test the explanation.

A judge (`judges.py`) writes the explanation from the top examples, then two scorers (delphi's
definitions) test it on held-out contexts. Positives are the quantile examples (every activation
strength, never the top examples the explanation was written from); negatives are neighbour
non-activating contexts, topped up with random ones to as many as positives.

- **Detection**: the judge sees plain texts and says which contain the latent.
- **Fuzzing**: the judge sees texts with tokens marked `<<like this>>` and says whether the marks
  are correct: positives marked where the latent fires (≥ `highlight_threshold` of the window's
  max), negatives with as many random tokens marked as positives have active tokens on average
  (rounded up). It asks whether the explanation pins down *which tokens*, not only which texts.

Per scorer and latent (`ClassificationScores`): recall (true-positive rate), overall and per
quantile bin; specificity (true-negative rate); balanced accuracy `(recall + specificity) / 2`,
also per quantile bin (how the score falls off from the strongest activations to the weakest);
and the accuracy at the latent's true firing rate `p`, `p·recall + (1 − p)·specificity`, what the
explanation is worth on real text. Quantile agreement: explanations written from the upper and
the lower half of the quantile bins, judged on the same contexts; the fraction of verdicts shared.

`summarize` averages over latents, plainly and weighted by firing rate, with the fraction of
perfect scores and the drop-off from the top quantile bin to the bottom one. Dead and unscorable
latents get a `status` and are counted, never dropped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .judges import Detector, Explainer, Fuzzer
from .sampling import Example, LatentExamples, token_strings
from .statistics import LatentStatistics


def _marked(example: Example, tokenizer: PreTrainedTokenizerBase, marks: Sequence[bool]) -> str:
    """The window's text with each run of marked tokens in `<<...>>`."""
    pieces, inside = [], False
    for text, marked in zip(token_strings(tokenizer, example.tokens), marks, strict=True):
        if marked != inside:
            pieces.append("<<" if marked else ">>")
            inside = marked
        pieces.append(text)
    return "".join(pieces + ([">>"] if inside else []))


def highlighted_text(example: Example, tokenizer: PreTrainedTokenizerBase,
                     threshold: float = 0.3) -> str:
    """The window's text with runs of tokens at ≥ `threshold`·(its max activation) in `<<...>>`."""
    cutoff = threshold * example.max_activation
    return _marked(example, tokenizer, [example.max_activation > 0 and activation >= cutoff
                                        for activation in example.activations])


def plain_text(example: Example, tokenizer: PreTrainedTokenizerBase) -> str:
    return "".join(token_strings(tokenizer, example.tokens))


@dataclass
class ScoringConfig:
    """How explanations are made and tested."""

    negatives: str = field(default="neighbour", metadata={
        "help": "'neighbour' (random ones fill up) or 'random' non-activating contexts"})
    highlight_threshold: float = field(default=0.3, metadata={
        "help": "mark tokens at >= this fraction of the example's max activation"})
    fuzzing: bool = field(default=True, metadata={
        "help": "also score by fuzzing, when the judge can (has a fuzz method)"})
    quantile_agreement: bool = field(default=True, metadata={
        "help": "also explain from the upper/lower quantile halves and measure agreement"})
    shuffle_seed: int = field(default=0, metadata={
        "help": "seed of the order contexts are judged in and of the fuzzing marks"})

    def __post_init__(self) -> None:
        if self.negatives not in ("neighbour", "random"):
            raise ValueError(f"negatives must be 'neighbour' or 'random', got {self.negatives!r}")
        if not 0 <= self.highlight_threshold <= 1:
            raise ValueError(f"highlight_threshold={self.highlight_threshold!r} must be a "
                             f"fraction in [0, 1] of the example's max activation")


@dataclass
class ClassificationScores:
    """One scorer's verdicts on one latent's held-out contexts (see the module docstring).

    `*_per_quantile[q]` is over the positives of bin q (weakest first; None if it has none).
    """

    n_positives: int
    n_negatives: int
    recall: float
    specificity: float
    balanced_accuracy: float
    accuracy: float
    recall_per_quantile: list[float | None]
    balanced_accuracy_per_quantile: list[float | None]


@dataclass
class LatentScore:
    """Scores of one latent; `status` is `"scored"`, `"dead"` (never fired), `"too_few_examples"`
    (no held-out activating context) or `"no_negatives"` (fires everywhere).

    The detection scores are the flat fields (as `ClassificationScores` names them); `fuzzing`
    holds the fuzzing scores when the judge could fuzz.
    """

    latent: int
    status: str
    firing_rate: float
    window_firing_rate: float
    explanation: str | None = None
    n_positives: int = 0
    n_neighbour_negatives: int = 0
    n_random_negatives: int = 0
    recall: float | None = None
    specificity: float | None = None
    balanced_accuracy: float | None = None
    accuracy: float | None = None
    recall_per_quantile: list[float | None] = field(default_factory=list)
    balanced_accuracy_per_quantile: list[float | None] = field(default_factory=list)
    fuzzing: ClassificationScores | None = None
    quantile_explanations: dict[str, str] | None = None
    quantile_agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _shuffled_verdicts(judge: Any, explanation: str, texts: list[str],
                       generator: torch.Generator) -> list[bool]:
    """`judge(explanation, texts)` in the order of `texts`, asked in a seeded shuffled order (no
    position bias)."""
    order = torch.randperm(len(texts), generator=generator).tolist()
    shuffled = list(judge(explanation, [texts[i] for i in order]))
    if len(shuffled) != len(texts):
        raise ValueError(f"{getattr(judge, '__qualname__', type(judge).__name__)} returned "
                         f"{len(shuffled)} verdicts for {len(texts)} texts; a judge must return "
                         f"one bool per text")
    verdicts = [False] * len(texts)
    for position, verdict in zip(order, shuffled, strict=True):
        verdicts[position] = bool(verdict)
    return verdicts


def classification_scores(positives: Sequence[Example], verdicts: Sequence[bool], n_quantiles: int,
                          window_firing_rate: float) -> ClassificationScores:
    """Scores of `verdicts` on `positives` followed by negatives (true = "the latent is here")."""
    hits = list(verdicts[:len(positives)])
    rejections = [not verdict for verdict in verdicts[len(positives):]]
    recall, specificity = _mean(hits), _mean(rejections)
    per_quantile = [_mean([hit for hit, example in zip(hits, positives, strict=True)
                           if example.quantile == q]) for q in range(n_quantiles)]
    return ClassificationScores(
        n_positives=len(hits), n_negatives=len(rejections), recall=recall,
        specificity=specificity, balanced_accuracy=(recall + specificity) / 2,
        accuracy=window_firing_rate * recall + (1 - window_firing_rate) * specificity,
        recall_per_quantile=per_quantile,
        balanced_accuracy_per_quantile=[None if r is None else (r + specificity) / 2
                                        for r in per_quantile])


def _fuzzing_texts(positives: list[Example], negatives: list[Example],
                   tokenizer: PreTrainedTokenizerBase, config: ScoringConfig,
                   generator: torch.Generator) -> list[str]:
    """Positives marked where the latent fires; negatives with random tokens marked, as many as
    positives have active tokens on average (rounded up, delphi's rule)."""
    n_marked = math.ceil(_mean([sum(a > 0 for a in example.activations)
                                for example in positives]))
    texts = [highlighted_text(example, tokenizer, config.highlight_threshold)
             for example in positives]
    for example in negatives:
        chosen = torch.randperm(len(example.tokens), generator=generator)[:n_marked].tolist()
        texts.append(_marked(example, tokenizer, [i in chosen for i in range(len(example.tokens))]))
    return texts


def score_latent(examples: LatentExamples, explainer: Explainer, detector: Detector,
                 tokenizer: PreTrainedTokenizerBase, firing_rate: float,
                 config: ScoringConfig | None = None, fuzzer: Fuzzer | None = None
                 ) -> LatentScore:
    """Explain one latent from its top examples and score the explanation (module docstring).

    Fuzzing uses `fuzzer`, else the detector when it can fuzz (`config.fuzzing` turns it off).
    """
    config = config or ScoringConfig()
    score = LatentScore(examples.latent, "scored", firing_rate, examples.window_firing_rate)
    positives = [example for bin_ in examples.quantiles for example in bin_]
    neighbours = examples.neighbour_negatives if config.negatives == "neighbour" else []
    randoms = examples.random_negatives[:max(len(positives) - len(neighbours), 0)]
    if examples.n_activating_windows == 0:
        score.status = "dead"
    elif not examples.top or not positives:
        score.status = "too_few_examples"
    elif not neighbours and not randoms:
        score.status = "no_negatives"
    if score.status != "scored":
        return score

    def explain(source: list[Example]) -> str:
        explanation = explainer.explain([highlighted_text(example, tokenizer,
                                                          config.highlight_threshold)
                                         for example in source])
        if not isinstance(explanation, str):
            raise TypeError(f"{type(explainer).__name__}.explain must return a str, got "
                            f"{type(explanation).__name__}")
        return explanation

    generator = torch.Generator().manual_seed(config.shuffle_seed * 1_000_003 + examples.latent)
    negatives = neighbours + randoms
    n_quantiles, rate = len(examples.quantiles), examples.window_firing_rate
    score.explanation = explain(examples.top)
    verdicts = _shuffled_verdicts(detector.detect, score.explanation,
                                  [plain_text(example, tokenizer)
                                   for example in positives + negatives], generator)
    detection = classification_scores(positives, verdicts, n_quantiles, rate)
    score.n_positives = len(positives)
    score.n_neighbour_negatives, score.n_random_negatives = len(neighbours), len(randoms)
    for name in ("recall", "specificity", "balanced_accuracy", "accuracy", "recall_per_quantile",
                 "balanced_accuracy_per_quantile"):
        setattr(score, name, getattr(detection, name))
    fuzzer = fuzzer or (detector if hasattr(detector, "fuzz") else None)
    if config.fuzzing and fuzzer is not None:
        texts = _fuzzing_texts(positives, negatives, tokenizer, config, generator)
        verdicts = _shuffled_verdicts(fuzzer.fuzz, score.explanation, texts, generator)
        score.fuzzing = classification_scores(positives, verdicts, n_quantiles, rate)
    half = n_quantiles // 2
    low = [example for bin_ in examples.quantiles[:half] for example in bin_]
    high = [example for bin_ in examples.quantiles[half:] for example in bin_]
    if config.quantile_agreement and low and high:
        score.quantile_explanations = {"high": explain(high), "low": explain(low)}
        shared = [plain_text(example, tokenizer) for example in examples.top + negatives]
        high_verdicts, low_verdicts = (_shuffled_verdicts(detector.detect, text, shared, generator)
                                       for text in score.quantile_explanations.values())
        score.quantile_agreement = _mean([a == b for a, b in zip(high_verdicts, low_verdicts,
                                                                  strict=True)])
    return score


def score_latents(examples: Iterable[LatentExamples], explainer: Explainer, detector: Detector,
                  tokenizer: PreTrainedTokenizerBase, statistics: LatentStatistics,
                  config: ScoringConfig | None = None, fuzzer: Fuzzer | None = None,
                  max_workers: int = 1) -> list[LatentScore]:
    """`score_latent` for each latent, with its firing rate from `statistics`, in order.

    `max_workers > 1` scores that many latents at once in threads: worth it for a judge behind
    an HTTP server (`OpenAICompatibleChat`), which then has that many requests in flight.
    """
    examples = list(examples)
    outside = [item.latent for item in examples if not 0 <= item.latent < statistics.n_latents]
    if outside:
        raise ValueError(f"latents {outside[:8]} are outside the {statistics.n_latents} latents of "
                         f"statistics: examples and statistics come from different SAEs")

    def score(latent_examples: LatentExamples) -> LatentScore:
        return score_latent(latent_examples, explainer, detector, tokenizer,
                            float(statistics.firing_rate[latent_examples.latent]), config, fuzzer)

    if max_workers <= 1:
        return [score(latent_examples) for latent_examples in examples]
    with ThreadPoolExecutor(max_workers) as pool:
        return list(pool.map(score, examples))


def _weighted(values: Sequence[float], weights: Sequence[float]) -> float | None:
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / total if total else None


def _per_quantile_means(rows: list[list[float | None]]) -> list[float | None]:
    """Mean of each quantile bin over latents that have positives there."""
    width = max((len(row) for row in rows), default=0)
    return [_mean([row[q] for row in rows if q < len(row) and row[q] is not None])
            for q in range(width)]


def _scorer_summary(scores: Sequence[ClassificationScores], rates: Sequence[float],
                    prefix: str = "") -> dict[str, Any]:
    balanced = [s.balanced_accuracy for s in scores]
    accuracy = [s.accuracy for s in scores]
    per_quantile = _per_quantile_means([s.balanced_accuracy_per_quantile for s in scores])
    known = [value for value in per_quantile if value is not None]
    return {
        f"{prefix}mean_balanced_accuracy": _mean(balanced),
        f"{prefix}mean_accuracy": _mean(accuracy),
        f"{prefix}firing_rate_weighted_balanced_accuracy": _weighted(balanced, rates),
        f"{prefix}firing_rate_weighted_accuracy": _weighted(accuracy, rates),
        f"{prefix}perfect_fraction": _mean([b == 1.0 for b in balanced]),
        f"{prefix}mean_balanced_accuracy_per_quantile": per_quantile,
        f"{prefix}quantile_drop_off": known[-1] - known[0] if len(known) > 1 else None,
    }


def summarize(scores: Sequence[LatentScore], statistics: LatentStatistics | None = None
              ) -> dict[str, Any]:
    """Means over scored latents (plain and firing-rate weighted), the fraction with a perfect
    balanced accuracy, the per-quantile means and their drop-off (top bin minus bottom bin), for
    detection and (`fuzzing_*`) fuzzing, and counts by status; with `statistics`, dead latents of
    the whole SAE."""
    scored = [score for score in scores if score.status == "scored"]
    detection = [ClassificationScores(
        s.n_positives, s.n_neighbour_negatives + s.n_random_negatives, s.recall, s.specificity,
        s.balanced_accuracy, s.accuracy, s.recall_per_quantile, s.balanced_accuracy_per_quantile)
        for s in scored]
    fuzzed = [s for s in scored if s.fuzzing is not None]
    agreement = [s.quantile_agreement for s in scored if s.quantile_agreement is not None]
    statuses = [score.status for score in scores]
    summary: dict[str, Any] = {
        "n_latents_selected": len(scores),
        "n_scored": len(scored),
        **{f"n_{status}": statuses.count(status)
           for status in ("dead", "too_few_examples", "no_negatives")},
        **_scorer_summary(detection, [s.firing_rate for s in scored]),
        "n_fuzzed": len(fuzzed),
        **_scorer_summary([s.fuzzing for s in fuzzed], [s.firing_rate for s in fuzzed],
                          "fuzzing_"),
        "mean_quantile_agreement": _mean(agreement),
    }
    if statistics is not None:
        summary["n_dead_in_sae"] = int(statistics.dead.sum())
        summary["n_latents_in_sae"] = statistics.n_latents
    return summary
