"""Auto-interpretability: explain each latent from its top examples, then test the explanation.

Detection scoring (as in delphi): a judge reads the explanation and says, for each held-out
context, whether the latent fires in it. Positives are the quantile examples (every activation
strength, never the top examples the explanation was written from); negatives are neighbour
non-activating contexts, topped up with random ones to as many as positives. Per latent this gives

- recall (true-positive rate), overall and per quantile bin — where explanations fail;
- specificity (true-negative rate);
- balanced accuracy, `(recall + specificity) / 2`;
- accuracy at the latent's true firing rate `p` (fraction of contexts where it fires):
  `p·recall + (1 − p)·specificity`, what the explanation is worth on real text;
- quantile agreement: explanations written from the upper and the lower half of the quantile bins,
  judged on the same contexts (top examples and negatives); the fraction of verdicts they share.

`summarize` averages over latents, plainly and weighted by firing rate, and reports the fraction of
perfect scores. Dead and unscorable latents get a `status` and are counted, never dropped.

The judge is pluggable: anything with `explain(texts) -> str` (an `Explainer`) and
`detect(explanation, texts) -> list[bool]` (a `Detector`). `ChatJudge` wraps any chat function
(an API client); `TransformersJudge` runs a local causal LM (offline default:
SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .sampling import Example, LatentExamples, token_strings
from .statistics import LatentStatistics

ChatFunction = Callable[[list[dict[str, str]]], str]
"""A chat model: messages (`{"role", "content"}` dicts) in, the assistant's reply out."""

EXPLAIN_PROMPT = (
    "You are a meticulous interpretability researcher. Below are text excerpts in which one "
    "feature of a language model fires; the tokens where it fires most are marked <<like this>>. "
    "Describe in one short phrase (at most 15 words) what the feature detects: the marked tokens "
    "and the context they need. Reply with the phrase only."
)
DETECT_PROMPT = (
    "You check texts against a description of a language-model feature. Say whether the feature, "
    "as described, is present in the text."
)


class Explainer(Protocol):
    def explain(self, examples: Sequence[str]) -> str:
        """One explanation from excerpts whose activating tokens are marked `<<...>>`."""
        ...


class Detector(Protocol):
    def detect(self, explanation: str, texts: Sequence[str]) -> list[bool]:
        """For each text, whether the latent `explanation` describes fires in it."""
        ...


def explanation_messages(examples: Sequence[str]) -> list[dict[str, str]]:
    listing = "\n".join(f"{i}. {text}" for i, text in enumerate(examples, 1))
    return [{"role": "system", "content": EXPLAIN_PROMPT},
            {"role": "user", "content": f"Excerpts:\n{listing}\n\nWhat does the feature detect?"}]


def detection_messages(explanation: str, texts: Sequence[str]) -> list[dict[str, str]]:
    if len(texts) == 1:
        question = (f"Feature: {explanation}\nText: {texts[0]}\n\n"
                    "Is the feature present in this text? Answer Yes or No.")
    else:
        listing = "\n".join(f"{i}. {text}" for i, text in enumerate(texts, 1))
        question = (f"Feature: {explanation}\nTexts:\n{listing}\n\nFor each text, is the feature "
                    "present? Reply with one line per text, like '1: yes' or '2: no'.")
    return [{"role": "system", "content": DETECT_PROMPT}, {"role": "user", "content": question}]


def _first_line(reply: str) -> str:
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    return lines[0].strip("\"' ") if lines else ""


class ChatJudge:
    """`Explainer` and `Detector` over any chat function, e.g. an API model's client.

    Detection asks about `batch_size` numbered texts per request and reads `'<n>: yes|no'` lines;
    a text without a readable verdict counts as "no".
    """

    def __init__(self, chat: ChatFunction, batch_size: int = 10) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive int")
        self.chat, self.batch_size = chat, batch_size

    def explain(self, examples: Sequence[str]) -> str:
        return _first_line(self.chat(explanation_messages(examples)))

    def detect(self, explanation: str, texts: Sequence[str]) -> list[bool]:
        verdicts = []
        for first in range(0, len(texts), self.batch_size):
            batch = texts[first:first + self.batch_size]
            reply = self.chat(detection_messages(explanation, batch)).lower()
            found = {int(n): answer == "yes"
                     for n, answer in re.findall(r"(\d+)\s*[:.)\-]\s*(yes|no)", reply)}
            verdicts += [found.get(i, False) for i in range(1, len(batch) + 1)]
        return verdicts


class TransformersJudge(ChatJudge):
    """A local `transformers` causal LM as judge.

    Explanations are greedy generations of an answer that starts with `explanation_prefix` (small
    models otherwise open with filler such as "The feature detects the following:"). Detection asks
    about one text at a time and compares the next-token logits of "Yes" and "No": deterministic,
    one forward pass per text, nothing to parse (small models rarely keep to an answer format).

    The offline default SmolLM2-135M-Instruct runs the whole pipeline anywhere, but it is too small
    to judge: its Yes/No margin barely depends on the text, so detection scores stay near chance.
    Use a larger model (or an API model through `ChatJudge`) for scores worth reading.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 max_new_tokens: int = 40, batch_size: int = 8,
                 explanation_prefix: str = "The feature fires on") -> None:
        super().__init__(self._generate, batch_size)
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.explanation_prefix = explanation_prefix
        self.answer_ids = [
            sorted({tokenizer.encode(variant, add_special_tokens=False)[0]
                    for variant in (word, " " + word)})
            for word in ("Yes", "No")
        ]

    def _prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if self.tokenizer.chat_template is None:
            text = "\n\n".join(message["content"] for message in messages) + "\nAnswer:"
            return self.tokenizer.encode(text)
        return list(self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])

    def explain(self, examples: Sequence[str]) -> str:
        prefix = self.explanation_prefix
        return _first_line(prefix + self._generate(explanation_messages(examples), prefix))

    @torch.inference_mode()
    def _generate(self, messages: list[dict[str, str]], answer_prefix: str = "") -> str:
        """The reply to `messages`, continuing `answer_prefix` (which is not repeated)."""
        prefix_ids = self.tokenizer.encode(answer_prefix, add_special_tokens=False)
        input_ids = torch.tensor([self._prompt_ids(messages) + prefix_ids],
                                 device=self.model.device)
        pad_id = self.tokenizer.pad_token_id
        output = self.model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=pad_id if pad_id is not None else self.tokenizer.eos_token_id)
        return self.tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)

    @torch.inference_mode()
    def detect(self, explanation: str, texts: Sequence[str]) -> list[bool]:
        prompts = [self._prompt_ids(detection_messages(explanation, [text])) for text in texts]
        verdicts = []
        for first in range(0, len(prompts), self.batch_size):
            batch = prompts[first:first + self.batch_size]
            lengths = torch.tensor([len(ids) for ids in batch])
            width = int(lengths.max())
            input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids in batch])
            mask = torch.arange(width) < lengths.unsqueeze(1)  # right padding keeps positions
            logits = self.model(input_ids=input_ids.to(self.model.device),
                                attention_mask=mask.long().to(self.model.device)).logits
            last = logits[torch.arange(len(batch)), lengths - 1].float()
            yes, no = (last[:, ids].logsumexp(-1) for ids in self.answer_ids)
            verdicts += (yes > no).tolist()
        return verdicts


def highlighted_text(example: Example, tokenizer: PreTrainedTokenizerBase,
                     threshold: float = 0.3) -> str:
    """The window's text with runs of tokens at ≥ `threshold`·(its max activation) in `<<...>>`."""
    cutoff = threshold * example.max_activation
    pieces, inside = [], False
    for text, activation in zip(token_strings(tokenizer, example.tokens), example.activations,
                                strict=True):
        marked = example.max_activation > 0 and activation >= cutoff
        if marked != inside:
            pieces.append("<<" if marked else ">>")
            inside = marked
        pieces.append(text)
    return "".join(pieces + ([">>"] if inside else []))


def plain_text(example: Example, tokenizer: PreTrainedTokenizerBase) -> str:
    return "".join(token_strings(tokenizer, example.tokens))


@dataclass
class ScoringConfig:
    """How explanations are made and tested."""

    negatives: str = field(default="neighbour", metadata={
        "help": "'neighbour' (random ones fill up) or 'random' non-activating contexts"})
    highlight_threshold: float = field(default=0.3, metadata={
        "help": "mark tokens at >= this fraction of the example's max activation"})
    quantile_agreement: bool = field(default=True, metadata={
        "help": "also explain from the upper/lower quantile halves and measure agreement"})
    shuffle_seed: int = field(default=0, metadata={
        "help": "seed of the order contexts are judged in"})

    def __post_init__(self) -> None:
        if self.negatives not in ("neighbour", "random"):
            raise ValueError(f"negatives must be 'neighbour' or 'random', got {self.negatives!r}")
        if not 0 <= self.highlight_threshold <= 1:
            raise ValueError(f"highlight_threshold={self.highlight_threshold!r} must be a "
                             f"fraction in [0, 1] of the example's max activation")


@dataclass
class LatentScore:
    """Detection scores of one latent; `status` is `"scored"`, `"dead"` (never fired),
    `"too_few_examples"` (no held-out activating context) or `"no_negatives"` (fires everywhere)."""

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
    quantile_explanations: dict[str, str] | None = None
    quantile_agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: Sequence[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def _judge(detector: Detector, explanation: str, texts: list[str],
           generator: torch.Generator) -> list[bool]:
    """Verdicts in the order of `texts`, asked in a seeded shuffled order (no position bias)."""
    order = torch.randperm(len(texts), generator=generator).tolist()
    shuffled = list(detector.detect(explanation, [texts[i] for i in order]))
    if len(shuffled) != len(texts):
        raise ValueError(f"{type(detector).__name__}.detect returned {len(shuffled)} verdicts for "
                         f"{len(texts)} texts; a Detector must return one bool per text")
    verdicts = [False] * len(texts)
    for position, verdict in zip(order, shuffled, strict=True):
        verdicts[position] = bool(verdict)
    return verdicts


def score_latent(examples: LatentExamples, explainer: Explainer, detector: Detector,
                 tokenizer: PreTrainedTokenizerBase, firing_rate: float,
                 config: ScoringConfig | None = None) -> LatentScore:
    """Explain one latent from its top examples and score the explanation (see module docstring)."""
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
    score.explanation = explain(examples.top)
    verdicts = _judge(detector, score.explanation,
                      [plain_text(example, tokenizer) for example in positives + negatives],
                      generator)
    hits, rejections = verdicts[:len(positives)], [not v for v in verdicts[len(positives):]]
    score.n_positives = len(positives)
    score.n_neighbour_negatives, score.n_random_negatives = len(neighbours), len(randoms)
    score.recall, score.specificity = _mean(hits), _mean(rejections)
    score.balanced_accuracy = (score.recall + score.specificity) / 2
    rate = examples.window_firing_rate
    score.accuracy = rate * score.recall + (1 - rate) * score.specificity
    score.recall_per_quantile = [
        _mean([hit for hit, example in zip(hits, positives, strict=True) if example.quantile == q])
        for q in range(len(examples.quantiles))
    ]
    half = len(examples.quantiles) // 2
    low = [example for bin_ in examples.quantiles[:half] for example in bin_]
    high = [example for bin_ in examples.quantiles[half:] for example in bin_]
    if config.quantile_agreement and low and high:
        score.quantile_explanations = {"high": explain(high), "low": explain(low)}
        shared = [plain_text(example, tokenizer) for example in examples.top + negatives]
        high_verdicts, low_verdicts = (_judge(detector, text, shared, generator)
                                       for text in score.quantile_explanations.values())
        score.quantile_agreement = _mean([a == b for a, b in zip(high_verdicts, low_verdicts,
                                                                  strict=True)])
    return score


def score_latents(examples: Iterable[LatentExamples], explainer: Explainer, detector: Detector,
                  tokenizer: PreTrainedTokenizerBase, statistics: LatentStatistics,
                  config: ScoringConfig | None = None) -> list[LatentScore]:
    """`score_latent` for each latent, with its firing rate from `statistics`."""
    examples = list(examples)
    outside = [item.latent for item in examples if not 0 <= item.latent < statistics.n_latents]
    if outside:
        raise ValueError(f"latents {outside[:8]} are outside the {statistics.n_latents} latents of "
                         f"statistics: examples and statistics come from different SAEs")
    return [score_latent(latent_examples, explainer, detector, tokenizer,
                         float(statistics.firing_rate[latent_examples.latent]), config)
            for latent_examples in examples]


def _weighted(values: Sequence[float], weights: Sequence[float]) -> float | None:
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / total if total else None


def summarize(scores: Sequence[LatentScore], statistics: LatentStatistics | None = None
              ) -> dict[str, Any]:
    """Means over scored latents (plain and firing-rate weighted), the fraction with a perfect
    balanced accuracy, and counts by status; with `statistics`, dead latents of the whole SAE."""
    scored = [score for score in scores if score.status == "scored"]
    balanced = [score.balanced_accuracy for score in scored]
    accuracy = [score.accuracy for score in scored]
    rates = [score.firing_rate for score in scored]
    agreement = [s.quantile_agreement for s in scored if s.quantile_agreement is not None]
    statuses = [score.status for score in scores]
    summary: dict[str, Any] = {
        "n_latents_selected": len(scores),
        "n_scored": len(scored),
        **{f"n_{status}": statuses.count(status)
           for status in ("dead", "too_few_examples", "no_negatives")},
        "mean_balanced_accuracy": sum(balanced) / len(scored) if scored else None,
        "mean_accuracy": sum(accuracy) / len(scored) if scored else None,
        "firing_rate_weighted_balanced_accuracy": _weighted(balanced, rates),
        "firing_rate_weighted_accuracy": _weighted(accuracy, rates),
        "perfect_fraction": sum(b == 1.0 for b in balanced) / len(scored) if scored else None,
        "mean_quantile_agreement": sum(agreement) / len(agreement) if agreement else None,
    }
    if statistics is not None:
        summary["n_dead_in_sae"] = int(statistics.dead.sum())
        summary["n_latents_in_sae"] = statistics.n_latents
    return summary
