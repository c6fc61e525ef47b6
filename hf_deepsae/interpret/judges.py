"""Judges: the language models that explain latents and test explanations, and their prompts.

A judge is anything with some of

- `explain(examples) -> str` (an `Explainer`): one explanation from excerpts whose activating
  tokens are marked `<<like this>>`;
- `detect(explanation, texts) -> list[bool]` (a `Detector`): per plain text, whether the latent
  the explanation describes fires in it (detection scoring);
- `fuzz(explanation, texts) -> list[bool]` (a `Fuzzer`): per text with marked tokens, whether the
  marks sit where that latent fires (fuzzing scoring, delphi's definition).

`ChatJudge` does all three over any chat function (messages in, reply out), asking about
`batch_size` numbered texts per request; `OpenAICompatibleChat` (`http_judge.py`) is such a function
for any OpenAI-compatible server. `TransformersJudge` runs a local causal LM and reads verdicts
from its Yes/No logits (offline default: SmolLM2-135M-Instruct, which is too small to judge).
`JudgeConfig` (the `--judge_*` flags of the examples) and `load_judge` pick one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

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
FUZZ_PROMPT = (
    "You check highlighted texts against a description of a language-model feature. Some tokens "
    "of each text are marked <<like this>>. Say whether every marked token is one where the "
    "feature, as described, is present: the marking is correct only if all marked tokens fit."
)


class Explainer(Protocol):
    def explain(self, examples: Sequence[str]) -> str:
        """One explanation from excerpts whose activating tokens are marked `<<...>>`."""
        ...


class Detector(Protocol):
    def detect(self, explanation: str, texts: Sequence[str]) -> list[bool]:
        """For each text, whether the latent `explanation` describes fires in it."""
        ...


class Fuzzer(Protocol):
    def fuzz(self, explanation: str, texts: Sequence[str]) -> list[bool]:
        """For each text with marked tokens, whether the marks are correct for `explanation`."""
        ...


def explanation_messages(examples: Sequence[str]) -> list[dict[str, str]]:
    listing = "\n".join(f"{i}. {text}" for i, text in enumerate(examples, 1))
    return [{"role": "system", "content": EXPLAIN_PROMPT},
            {"role": "user", "content": f"Excerpts:\n{listing}\n\nWhat does the feature detect?"}]


def _verdict_messages(system: str, question: str, explanation: str,
                      texts: Sequence[str]) -> list[dict[str, str]]:
    if len(texts) == 1:
        content = (f"Feature: {explanation}\nText: {texts[0]}\n\n{question} in this text? "
                   "Answer Yes or No.")
    else:
        listing = "\n".join(f"{i}. {text}" for i, text in enumerate(texts, 1))
        content = (f"Feature: {explanation}\nTexts:\n{listing}\n\nFor each text: {question}? "
                   "Reply with one line per text, like '1: yes' or '2: no'.")
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


def detection_messages(explanation: str, texts: Sequence[str]) -> list[dict[str, str]]:
    return _verdict_messages(DETECT_PROMPT, "is the feature present", explanation, texts)


def fuzzing_messages(explanation: str, texts: Sequence[str]) -> list[dict[str, str]]:
    return _verdict_messages(FUZZ_PROMPT, "are the marked tokens correct", explanation, texts)


VerdictMessages = Callable[[str, Sequence[str]], list[dict[str, str]]]


def _first_line(reply: str) -> str:
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    return lines[0].strip("\"' ") if lines else ""


def read_verdicts(reply: str, n_texts: int) -> list[bool]:
    """Verdicts `'<n>: yes|no'` of texts 1..n_texts in a reply; a text without one is "no"."""
    found = {int(n): answer == "yes"
             for n, answer in re.findall(r"(\d+)\s*[:.)\-]\s*(yes|no)", reply.lower())}
    if n_texts == 1 and not found:
        return [reply.strip().lower().startswith("yes")]
    return [found.get(i, False) for i in range(1, n_texts + 1)]


class ChatJudge:
    """`Explainer`, `Detector` and `Fuzzer` over any chat function, e.g. an API model's client.

    Detection and fuzzing ask about `batch_size` numbered texts per request and read
    `'<n>: yes|no'` lines; a text without a readable verdict counts as "no".
    """

    def __init__(self, chat: ChatFunction, batch_size: int = 10) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive int")
        self.chat, self.batch_size = chat, batch_size

    def explain(self, examples: Sequence[str]) -> str:
        return _first_line(self.chat(explanation_messages(examples)))

    def detect(self, explanation: str, texts: Sequence[str]) -> list[bool]:
        return self._verdicts(detection_messages, explanation, texts)

    def fuzz(self, explanation: str, texts: Sequence[str]) -> list[bool]:
        return self._verdicts(fuzzing_messages, explanation, texts)

    def _verdicts(self, messages: VerdictMessages, explanation: str,
                  texts: Sequence[str]) -> list[bool]:
        verdicts = []
        for first in range(0, len(texts), self.batch_size):
            batch = texts[first:first + self.batch_size]
            verdicts += read_verdicts(self.chat(messages(explanation, batch)), len(batch))
        return verdicts


class TransformersJudge(ChatJudge):
    """A local `transformers` causal LM as judge.

    Explanations are greedy generations of an answer that starts with `explanation_prefix` (small
    models otherwise open with filler such as "The feature detects the following:"). Detection and
    fuzzing ask about one text at a time and compare the next-token logits of "Yes" and "No":
    deterministic, one forward pass per text, nothing to parse (small models rarely keep to an
    answer format).

    The offline default SmolLM2-135M-Instruct runs the whole pipeline anywhere, but it is too small
    to judge: its Yes/No margin barely depends on the text, so scores stay near chance. Use a
    larger model (or an API model through `ChatJudge`/`OpenAICompatibleChat`) for scores worth
    reading.
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
    def _verdicts(self, messages: VerdictMessages, explanation: str,
                  texts: Sequence[str]) -> list[bool]:
        prompts = [self._prompt_ids(messages(explanation, [text])) for text in texts]
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


@dataclass
class JudgeConfig:
    """Which judge explains and scores latents: a server, or a local causal LM (the default)."""

    judge_model: str | None = field(default=None, metadata={
        "help": "The judge: the model name on --judge_base_url's server, else a causal LM to "
                "load (default: the offline SmolLM2-135M-Instruct, too small to judge well)"})
    judge_base_url: str | None = field(default=None, metadata={
        "help": "OpenAI-compatible server of the judge, e.g. http://localhost:8000/v1 (vLLM, "
                "TGI, llama.cpp, `transformers serve`, hosted APIs)"})
    judge_api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "environment variable holding the server's API key (unset: no key)"})
    judge_cache: str | None = field(default=None, metadata={
        "help": "SQLite file caching the server's replies, so reruns cost nothing"})
    judge_max_workers: int = field(default=8, metadata={
        "help": "latents judged at once (server judges; a local judge runs one at a time)"})
    judge_batch_size: int = field(default=10, metadata={
        "help": "texts per detection/fuzzing request to a server judge"})
    judge_max_new_tokens: int = field(default=40, metadata={
        "help": "longest explanation the judge may generate, in tokens"})
    judge_price_per_million_prompt_tokens: float = field(default=0.0, metadata={
        "help": "for the cost estimate of a server judge"})
    judge_price_per_million_completion_tokens: float = field(default=0.0, metadata={
        "help": "for the cost estimate of a server judge"})

    def __post_init__(self) -> None:
        if self.judge_base_url is not None and not self.judge_model:
            raise ValueError("--judge_base_url needs --judge_model: the model name the server "
                             "serves (see its /v1/models)")

    @property
    def max_workers(self) -> int:
        return self.judge_max_workers if self.judge_base_url is not None else 1


def load_judge(config: JudgeConfig, model: PreTrainedModel | None = None,
               tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[ChatJudge, str]:
    """The judge `config` names and a description of it: a `ChatJudge` over an
    `OpenAICompatibleChat` for a server, else a `TransformersJudge` on `judge_model` (loaded
    offline-first by `load_language_model`), or on `model` when it is that model already."""
    if config.judge_base_url is not None:
        from .http_judge import OpenAICompatibleChat

        chat = OpenAICompatibleChat(
            config.judge_base_url, config.judge_model,
            api_key=os.environ.get(config.judge_api_key_env),
            max_tokens=max(config.judge_max_new_tokens, 8 * config.judge_batch_size),
            cache_path=config.judge_cache,
            price_per_million_prompt_tokens=config.judge_price_per_million_prompt_tokens,
            price_per_million_completion_tokens=config.judge_price_per_million_completion_tokens)
        return (ChatJudge(chat, config.judge_batch_size),
                f"{config.judge_model} at {config.judge_base_url}")
    from ..activations import EMBEDDED_MODEL_NAME, load_language_model

    name = config.judge_model or EMBEDDED_MODEL_NAME
    if model is None or getattr(model, "name_or_path", None) != name:
        device = None if model is None else model.device
        model, tokenizer = load_language_model(name, device=device, verbose=True)
    return TransformersJudge(model, tokenizer, config.judge_max_new_tokens), f"{name} (local)"
