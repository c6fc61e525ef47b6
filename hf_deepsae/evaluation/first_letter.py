"""The first-letter task of the absorption benchmark: which letter does a vocabulary token start
with?

Built from the base model's own vocabulary, as in Chanin et al. (2024, "A is for Absorption") and
SAEBench's `absorption`: every token made of ASCII letters only (after an optional leading space)
is a word, labelled by its first letter. The model reads each word at the end of an in-context
prompt of other words of the same split,

    <w1> has the first letter: <W1>\\n ... <wn> has the first letter: <Wn>\\n<word>

assembled from token ids, so the word stays the single vocabulary token it is. The activation at
the word is what gets classified; the rest of SAEBench's template (` has the first letter:`
after the word) cannot change it in a causal model, so it is not run.

**MLP-output hookpoints.** SAEBench reads the residual stream, which carries a token's spelling
from the embedding on. An MLP's output only holds what that layer writes, so the letter may be
there weakly or not at all. The ground-truth probe is therefore trained on the SAE's own site
(its write site: the MLP output for SAEs and transcoders at `mlp_out`, the residual stream for
`hook_site="resid"`), so it measures what the SAE could represent there; letters the site does
not encode linearly (probe F1 below `AbsorptionConfig.min_probe_f1`) are reported as such and
left out of the means, never scored.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ..sites import Site, capture_activations
from .probes import LinearProbe, binary_scores, fit_logistic_regression

LETTERS = string.ascii_lowercase


@dataclass
class AbsorptionConfig:
    """Settings of the first-letter task and of the absorption metrics (SAEBench's defaults where
    they exist; `n_words` and `n_icl_examples` are smaller so the task runs on a CPU)."""

    n_words: int = field(default=5000, metadata={
        "help": "words drawn from the vocabulary (0: all of them; SAEBench uses all)"})
    n_icl_examples: int = field(default=4, metadata={
        "help": "in-context examples before each word (SAEBench: 10)"})
    prompt_template: str = field(default="{word} has the first letter:", metadata={
        "help": "in-context template; {word} is the word, the answer follows as ' X'"})
    test_fraction: float = field(default=0.2, metadata={"help": "words held out for testing"})
    min_words_per_letter: int = field(default=10, metadata={
        "help": "letters with fewer words are left out of the task"})
    probe_l2: float = field(default=0.1, metadata={
        "help": "L2 penalty of the ground-truth letter probes (standardised activations); "
                "0.1 gave the best held-out F1 on SmolLM2-135M's layer-6 MLP output"})
    min_probe_f1: float = field(default=0.6, metadata={
        "help": "letters whose probe reaches a lower test F1 are not evaluated"})
    max_k: int = field(default=10, metadata={"help": "largest k of the k-sparse latent probes"})
    sparse_probe_l1: float = field(default=0.01, metadata={
        "help": "L1 penalty of the probe over all latents that ranks them for k-sparse probing"})
    f1_jump_threshold: float = field(default=0.03, metadata={
        "help": "F1 gain that makes the k+1-th latent part of a letter's main latents (splitting)"})
    full_absorption_cos_threshold: float = field(default=0.025, metadata={
        "help": "cosine with the probe the absorbing latent needs (full absorption)"})
    absorption_fraction_cos_threshold: float = field(default=0.1, metadata={
        "help": "cosine with the probe a latent needs to count as absorbing (absorption fraction)"})
    projection_proportion_threshold: float = field(default=0.4, metadata={
        "help": "share of the activation's probe projection the absorbing latents must supply"})
    max_absorbing_latents: int = field(default=3, metadata={
        "help": "absorbing latents that may share a word's projection (absorption fraction)"})
    lm_batch_size: int = field(default=64, metadata={"help": "prompts per forward pass"})
    seed: int = field(default=42, metadata={"help": "seed of the word sample, split and prompts"})

    def __post_init__(self) -> None:
        if "{word}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain '{{word}}', got "
                             f"{self.prompt_template!r}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must lie in (0, 1), got {self.test_fraction}")
        if self.max_k < 1:
            raise ValueError(f"max_k must be at least 1, got {self.max_k}")


@dataclass
class FirstLetterData:
    """Activations of the first-letter task at one (read, write) pair of sites.

    Args:
        words: the decoded vocabulary tokens, `[n]`.
        token_ids: `[n]` their ids.
        letters: `[n]` index of the first letter in `letters_used`.
        letters_used: the letters of the task (those with `min_words_per_letter` words).
        is_test: `[n]` bool, held-out words.
        inputs: `[n, d_in]` activations at the read site (what an SAE encodes).
        targets: `[n, d_out]` activations at the write site (what it reconstructs; the same
            tensor unless the sites differ, as for transcoders).
        sites: the (read, write) sites.
        probe: one-vs-rest letter probes on `targets`, `[len(letters_used), d_out]`.
        probe_f1: `[len(letters_used)]` test F1 of each probe (threshold 0).
    """

    words: list[str]
    token_ids: Tensor
    letters: Tensor
    letters_used: str
    is_test: Tensor
    inputs: Tensor
    targets: Tensor
    sites: tuple[Site, Site]
    probe: LinearProbe
    probe_f1: Tensor

    @property
    def one_hot(self) -> Tensor:
        """`[n, len(letters_used)]` bool: each word's letter."""
        return torch.nn.functional.one_hot(self.letters, len(self.letters_used)).bool()


def alphabetic_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[str]]:
    """`(ids, words)` of the vocabulary tokens made of ASCII letters after an optional space."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    kept = [(i, text) for i, text in zip(ids, texts, strict=True)
            if (bare := text.removeprefix(" ")) and bare.isascii() and bare.isalpha()]
    return [i for i, _ in kept], [text for _, text in kept]


def _leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before a text (e.g. BOS), none after."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    with_specials = tokenizer.encode("a")
    starts = [i for i in range(len(with_specials) - len(plain) + 1)
              if with_specials[i:i + len(plain)] == plain]
    return list(with_specials[:starts[0]]) if starts else []


class _PromptBuilder:
    """Token ids of the in-context prompts, built piece by piece so every word is one token."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str) -> None:
        before, after = template.split("{word}", 1)
        self.tokenizer = tokenizer
        self.leading = _leading_special_ids(tokenizer)
        self.before = tokenizer.encode(before, add_special_tokens=False) if before else []
        self.after = tokenizer.encode(after, add_special_tokens=False)
        self.newline = tokenizer.encode("\n", add_special_tokens=False)
        self.answers = {letter: tokenizer.encode(f" {letter.upper()}", add_special_tokens=False)
                        for letter in LETTERS}

    def prompt(self, word_id: int, examples: list[tuple[int, str]]) -> list[int]:
        ids = list(self.leading)
        for example_id, letter in examples:
            ids += self.before + [example_id] + self.after + self.answers[letter] + self.newline
        return ids + self.before + [word_id]


@torch.no_grad()
def _word_activations(model: nn.Module, prompts: list[list[int]], sites: tuple[Site, Site],
                      batch_size: int) -> tuple[Tensor, Tensor]:
    """Activations at the last token of each prompt, at the read and the write site."""
    device = next(model.parameters()).device
    pad_id = 0
    inputs, targets = [], []
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first:first + batch_size]
        lengths = torch.tensor([len(ids) for ids in batch])
        width = int(lengths.max())
        input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids in batch])
        mask = (torch.arange(width) < lengths.unsqueeze(1)).long()
        captured = capture_activations(model, input_ids.to(device), sites, mask.to(device))
        rows = torch.arange(len(batch))
        inputs.append(captured[sites[0]][rows, lengths - 1].float().cpu())
        if sites[1] != sites[0]:
            targets.append(captured[sites[1]][rows, lengths - 1].float().cpu())
    inputs_tensor = torch.cat(inputs)
    return inputs_tensor, torch.cat(targets) if targets else inputs_tensor


def first_letter_data(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                      sites: tuple[Site, Site], config: AbsorptionConfig | None = None
                      ) -> FirstLetterData:
    """Build the task at `sites` (`sae_sites(model, sae.config)`) and fit its letter probes.

    One forward pass per `lm_batch_size` prompts; the result serves every SAE at these sites.
    """
    config = config or AbsorptionConfig()
    ids, words = alphabetic_tokens(tokenizer)
    rng = random.Random(config.seed)
    order = list(range(len(ids)))
    rng.shuffle(order)
    if config.n_words:
        order = order[:config.n_words]
    first_letters = [words[i].lstrip(" ")[0].lower() for i in order]
    counts = {letter: first_letters.count(letter) for letter in LETTERS}
    letters_used = "".join(letter for letter in LETTERS
                           if counts[letter] >= config.min_words_per_letter)
    if len(letters_used) < 2:
        raise ValueError(f"the tokenizer's vocabulary has {len(ids)} alphabetic tokens, and only "
                         f"{len(letters_used)} letters with {config.min_words_per_letter}+ of the "
                         f"{len(order)} drawn; raise n_words or lower min_words_per_letter")
    kept = [(i, letter) for i, letter in zip(order, first_letters, strict=True)
            if letter in letters_used]
    n_test = max(1, round(config.test_fraction * len(kept)))
    is_test = torch.zeros(len(kept), dtype=torch.bool)
    is_test[-n_test:] = True
    builder = _PromptBuilder(tokenizer, config.prompt_template)
    splits = {split: [(ids[i], letter) for (i, letter), test in zip(kept, is_test.tolist(),
                                                                      strict=True) if test == split]
              for split in (False, True)}
    prompts = []
    for (i, _), test in zip(kept, is_test.tolist(), strict=True):
        pool = splits[test]
        drawn = rng.sample(pool, min(config.n_icl_examples + 1, len(pool)))
        examples = [example for example in drawn if example[0] != ids[i]]
        prompts.append(builder.prompt(ids[i], examples[:config.n_icl_examples]))
    inputs, targets = _word_activations(model, prompts, sites, config.lm_batch_size)
    return fit_first_letter_probes(
        [words[i] for i, _ in kept], torch.tensor([ids[i] for i, _ in kept]),
        torch.tensor([letters_used.index(letter) for _, letter in kept]), letters_used, is_test,
        inputs, targets, sites, config)


def fit_first_letter_probes(words: list[str], token_ids: Tensor, letters: Tensor,
                            letters_used: str, is_test: Tensor, inputs: Tensor, targets: Tensor,
                            sites: tuple[Site, Site], config: AbsorptionConfig | None = None
                            ) -> FirstLetterData:
    """`FirstLetterData` from activations gathered any way (see its fields): fits the
    ground-truth letter probes on the training words' targets and scores them on the test ones."""
    config = config or AbsorptionConfig()
    one_hot = torch.nn.functional.one_hot(letters, len(letters_used)).bool()
    probe = fit_logistic_regression(targets[~is_test], one_hot[~is_test], l2=config.probe_l2)
    predicted = probe.predict(targets[is_test])
    probe_f1 = torch.tensor([binary_scores(predicted[:, j], one_hot[is_test][:, j]).f1
                             for j in range(len(letters_used))])
    return FirstLetterData(words, token_ids, letters, letters_used, is_test, inputs, targets,
                           sites, probe, probe_f1)
