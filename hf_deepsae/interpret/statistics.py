"""Per-latent statistics of a `LatentCache`: how often, how strongly, and on which tokens it fires.

Dead latents (no firing on the corpus) keep their row: zero counts, zero activations, no top
tokens; `summary()` counts them. A latent is *single-token* when one token carries at least
`single_token_threshold` of its `n_strongest` strongest firings — such latents look perfectly
interpretable to token-matching explanations, so scores should be read with this flag beside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from ..evaluation import DENSE_DENSITY_THRESHOLD
from .cache import LatentCache
from .sampling import token_strings


@dataclass
class LatentStatistics:
    """Statistics of every latent (`[n_latents]` tensors unless noted).

    Args:
        n_tokens: tokens in the corpus.
        firing_counts: tokens each latent fired on.
        mean_activation: mean activation over the tokens it fired on (0 if dead).
        max_activation: largest activation (0 if dead).
        top_tokens: `[n_latents, n_top_tokens]` the token ids it fires on most often, `-1` padded.
        top_token_counts: `[n_latents, n_top_tokens]` how often it fired on each of them.
        top_token_share: share of its `n_strongest` strongest firings on a single token.
        single_token_threshold: `top_token_share` from which a latent counts as single-token.
    """

    n_tokens: int
    firing_counts: Tensor
    mean_activation: Tensor
    max_activation: Tensor
    top_tokens: Tensor
    top_token_counts: Tensor
    top_token_share: Tensor
    single_token_threshold: float

    @property
    def n_latents(self) -> int:
        return len(self.firing_counts)

    @property
    def firing_rate(self) -> Tensor:
        """Fraction of corpus tokens each latent fired on."""
        return self.firing_counts / self.n_tokens

    @property
    def dead(self) -> Tensor:
        return self.firing_counts == 0

    @property
    def single_token(self) -> Tensor:
        return ~self.dead & (self.top_token_share >= self.single_token_threshold)

    def top_tokens_of(self, latent: int) -> list[int]:
        """The token ids `latent` fires on most often, most frequent first."""
        return [token for token in self.top_tokens[latent].tolist() if token >= 0]

    def latent_record(self, latent: int, tokenizer: PreTrainedTokenizerBase | None = None
                      ) -> dict[str, Any]:
        """One latent's statistics as JSON-ready values (token texts if a tokenizer is given)."""
        tokens = self.top_tokens_of(latent)
        texts = token_strings(tokenizer, tokens) if tokenizer is not None else [None] * len(tokens)
        return {
            "latent": latent,
            "dead": bool(self.dead[latent]),
            "firing_count": int(self.firing_counts[latent]),
            "firing_rate": float(self.firing_rate[latent]),
            "mean_activation": float(self.mean_activation[latent]),
            "max_activation": float(self.max_activation[latent]),
            "top_tokens": [{"id": token, "text": text, "count": int(count)} for token, text, count
                           in zip(tokens, texts, self.top_token_counts[latent].tolist(),
                                  strict=False)],
            "top_token_share": float(self.top_token_share[latent]),
            "single_token": bool(self.single_token[latent]),
        }

    def summary(self) -> dict[str, Any]:
        """Counts over all latents; fractions of single-token latents are among live ones."""
        n_alive = int((~self.dead).sum())
        return {
            "n_latents": self.n_latents,
            "n_tokens": self.n_tokens,
            "n_dead": self.n_latents - n_alive,
            "dead_fraction": 1 - n_alive / self.n_latents,
            "n_dense": int((self.firing_rate > DENSE_DENSITY_THRESHOLD).sum()),
            "n_single_token": int(self.single_token.sum()),
            "single_token_fraction_of_alive": int(self.single_token.sum()) / max(n_alive, 1),
            "mean_firing_rate": float(self.firing_rate.mean()),
        }

    def columns(self) -> dict[str, list]:
        """Per-latent values as columns (compact JSON for many latents)."""
        return {
            "firing_count": self.firing_counts.tolist(),
            "mean_activation": self.mean_activation.tolist(),
            "max_activation": self.max_activation.tolist(),
            "top_tokens": self.top_tokens.tolist(),
            "top_token_share": self.top_token_share.tolist(),
            "single_token": self.single_token.tolist(),
        }


def _top_per_group(groups: Tensor, keys: Tensor, values: Tensor, n_groups: int, n: int,
                   fill: int) -> Tensor:
    """`[n_groups, n]`: per group, the `values` of its `n` largest `keys` (ties: earlier first)."""
    order = keys.argsort(descending=True, stable=True)
    order = order[groups[order].argsort(stable=True)]
    grouped = groups[order]
    rank = torch.arange(len(order)) - torch.searchsorted(grouped, grouped)
    keep = rank < n
    table = torch.full((n_groups, n), fill, dtype=values.dtype)
    table[grouped[keep], rank[keep]] = values[order][keep]
    return table


def _token_counts(latents: Tensor, tokens: Tensor, vocab: int) -> tuple[Tensor, Tensor, Tensor]:
    """`(latent, token, count)` of every distinct pair."""
    pairs, counts = (latents * vocab + tokens).unique(return_counts=True)
    return pairs // vocab, pairs % vocab, counts


def compute_statistics(cache: LatentCache, n_top_tokens: int = 5, n_strongest: int = 50,
                       single_token_threshold: float = 0.9) -> LatentStatistics:
    """Statistics of every latent of `cache`, vectorised over all firings at once."""
    for name, value in (("n_top_tokens", n_top_tokens), ("n_strongest", n_strongest)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    if not 0 < single_token_threshold <= 1:
        raise ValueError(f"single_token_threshold={single_token_threshold!r} must be a share in "
                         f"(0, 1]")
    n_latents = cache.n_latents
    latents, activations = cache.locations[:, 2], cache.activations
    tokens = cache.tokens[cache.locations[:, 0], cache.locations[:, 1]]
    vocab = int(cache.tokens.max()) + 1
    counts = cache.firing_counts()
    sums = torch.zeros(n_latents).index_add_(0, latents, activations)
    maxima = torch.zeros(n_latents).scatter_reduce(0, latents, activations, "amax",
                                                   include_self=False)
    pair_latents, pair_tokens, pair_counts = _token_counts(latents, tokens, vocab)
    top_tokens = _top_per_group(pair_latents, pair_counts, pair_tokens, n_latents, n_top_tokens, -1)
    top_counts = _top_per_group(pair_latents, pair_counts, pair_counts, n_latents, n_top_tokens, 0)

    strongest = _top_per_group(latents, activations, tokens, n_latents, n_strongest, -1)
    rows = torch.arange(n_latents).unsqueeze(1).expand_as(strongest)
    present = strongest >= 0
    strong_latents, _, strong_counts = _token_counts(rows[present], strongest[present], vocab)
    most_common = torch.zeros(n_latents, dtype=torch.long).scatter_reduce(
        0, strong_latents, strong_counts, "amax", include_self=False)
    share = most_common / present.sum(1).clamp_min(1)
    return LatentStatistics(
        n_tokens=cache.n_tokens,
        firing_counts=counts,
        mean_activation=sums / counts.clamp_min(1),
        max_activation=maxima,
        top_tokens=top_tokens,
        top_token_counts=top_counts,
        top_token_share=share,
        single_token_threshold=single_token_threshold,
    )
