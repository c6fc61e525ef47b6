"""Which contexts to show for a latent: top, per activation quantile, and hard non-activating ones.

Examples are windows: the corpus cut into non-overlapping `example_ctx_len`-token windows (as delphi
does), so "the latent is silent here" has one meaning: zero at every token of the window. Negatives
come in three kinds, from easy to hard:

- random: any window where the latent is silent;
- neighbour: windows where latents with a similar decoder direction fire but this one doesn't, so
  an explanation must tell the latent from its neighbours (random negatives let a token-in-context
  latent pass as a token latent);
- same-token: windows holding a token the latent fires on most, yet where it stays silent.

A latent's decoder direction is `decode(s·e_i) − decode(0)`: the row of `W_dec` for linear
decoders, and the effective direction of the latent for nonlinear (deep) decoders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain, zip_longest

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from ..modeling_deepsae import DeepSAEModel
from .cache import LatentCache


@dataclass
class SamplingConfig:
    """How many examples of each kind to draw per latent."""

    example_ctx_len: int = field(default=32, metadata={"help": "tokens per example window"})
    n_top: int = field(default=10, metadata={"help": "highest-activating windows"})
    n_quantiles: int = field(default=10, metadata={"help": "equal-count activation bins"})
    n_per_quantile: int = field(default=4, metadata={"help": "windows drawn from each bin"})
    n_random: int = field(default=10, metadata={"help": "random non-activating windows"})
    n_neighbour: int = field(default=10, metadata={"help": "neighbour non-activating windows"})
    n_same_token: int = field(default=5, metadata={"help": "same-token non-activating windows"})
    n_neighbours: int = field(default=10, metadata={"help": "neighbour latents per latent"})
    seed: int = field(default=0, metadata={"help": "seed of every random draw"})

    def __post_init__(self) -> None:
        """Counts are ints >= 0 (a negative one would slice from the end); windows and bins >= 1."""
        for name in ("example_ctx_len", "n_quantiles", "n_top", "n_per_quantile", "n_random",
                     "n_neighbour", "n_same_token", "n_neighbours", "seed"):
            value = getattr(self, name)
            least = 1 if name in ("example_ctx_len", "n_quantiles") else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"SamplingConfig.{name}={value!r} must be an int >= {least}")


@dataclass
class Example:
    """One window of the corpus with one latent's activation at each of its tokens.

    `quantile` is the bin it was drawn from (quantile examples); `neighbour` and `similarity` name
    the neighbouring latent that fires in it (neighbour negatives).
    """

    window: int
    tokens: list[int]
    activations: list[float]
    quantile: int | None = None
    neighbour: int | None = None
    similarity: float | None = None

    @property
    def max_activation(self) -> float:
        return max(self.activations)


def token_strings(tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int]) -> list[str]:
    """Each token decoded alone, spaces kept, so the pieces of a window join back into its text."""
    return tokenizer.batch_decode([[token] for token in token_ids],
                                  clean_up_tokenization_spaces=False)


@dataclass
class LatentExamples:
    """Everything `sample_examples` draws for one latent.

    `quantile_ranges[q]` is the (smallest, largest) max activation of the activating windows in
    bin `q` (see `quantile_bins`); bin 0 holds the weakest. Quantile examples never repeat `top`
    windows.
    """

    latent: int
    n_activating_windows: int
    window_firing_rate: float
    top: list[Example]
    quantile_ranges: list[tuple[float, float] | None]
    quantiles: list[list[Example]]
    random_negatives: list[Example]
    neighbour_negatives: list[Example]
    same_token_negatives: list[Example]


@torch.no_grad()
def decoder_directions(sae: DeepSAEModel, activation_scale: float | Tensor = 1.0,
                       batch_size: int = 1024) -> Tensor:
    """`[n_total_latents, d_out]`: `decode(s_i·e_i) − decode(0)` for every latent `i`.

    `s_i` times `DeepSAEModel.latent_directions` at activation `s_i`: for a linear decoder
    `s_i·W_dec[i]`; for a nonlinear one it depends on `s_i`, the activation at which to probe the
    latent (e.g. its mean activation), 1 by default. A latent probed at 0 gets a zero direction.
    """
    n_latents = sae.config.n_total_latents
    scale = torch.as_tensor(activation_scale, dtype=torch.float32).reshape(-1)
    if not (torch.isfinite(scale) & (scale >= 0)).all():
        raise ValueError("activation_scale must be finite and >= 0 for every latent (the "
                         "activation each latent's direction is probed at; 0 for a dead latent)")
    scale = scale.expand(n_latents)
    probe_at = torch.where(scale == 0, torch.ones_like(scale), scale)
    directions = sae.latent_directions(activation=probe_at.to(sae.device), block_size=batch_size)
    return directions.float().cpu() * scale.unsqueeze(1)


def nearest_latents(directions: Tensor, n_neighbours: int, candidates: Tensor | None = None,
                    batch_size: int = 4096) -> tuple[Tensor, Tensor]:
    """`(indices, similarities)` `[n_latents, n_neighbours]` by cosine similarity, self excluded.

    `candidates` (bool `[n_latents]`, e.g. the latents that fired) restricts who can be a
    neighbour; non-candidate slots are filled with `-1` and similarity `-inf`.
    """
    if directions.dim() != 2 or not torch.isfinite(directions).all():
        raise ValueError(f"directions must be a finite [n_latents, d] tensor, got shape "
                         f"{tuple(directions.shape)}")
    if isinstance(n_neighbours, bool) or not isinstance(n_neighbours, int) or n_neighbours < 0:
        raise ValueError(f"n_neighbours={n_neighbours!r} must be an int >= 0")
    n_latents = directions.shape[0]
    if candidates is not None and (candidates.dtype != torch.bool
                                   or candidates.shape != (n_latents,)):
        raise ValueError(f"candidates must be a bool tensor of shape [{n_latents}]")
    n_neighbours = min(n_neighbours, n_latents - 1)
    unit = directions.float() / directions.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    excluded = torch.zeros(n_latents, dtype=torch.bool) if candidates is None else ~candidates
    indices, similarities = [], []
    for ids in torch.arange(n_latents).split(batch_size):
        similarity = unit[ids] @ unit.T
        similarity[:, excluded] = -torch.inf
        similarity[torch.arange(len(ids)), ids] = -torch.inf
        values, neighbours = similarity.topk(n_neighbours, dim=1)
        indices.append(neighbours.masked_fill(values == -torch.inf, -1))
        similarities.append(values)
    return torch.cat(indices), torch.cat(similarities)


class ContextWindows:
    """The corpus of a `LatentCache` as windows of `example_ctx_len` tokens, indexed per latent."""

    def __init__(self, cache: LatentCache, example_ctx_len: int) -> None:
        ctx_len = cache.tokens.shape[1]
        if example_ctx_len < 1 or ctx_len % example_ctx_len:
            raise ValueError(f"example_ctx_len={example_ctx_len} must divide the cache's context "
                             f"length {ctx_len}")
        self.cache, self.width = cache, example_ctx_len
        self.tokens = cache.tokens.reshape(-1, example_ctx_len)
        self.n_windows = self.tokens.shape[0]
        windows_per_sequence = ctx_len // example_ctx_len
        locations = cache.locations
        self.window_of = locations[:, 0] * windows_per_sequence + locations[:, 1] // example_ctx_len
        self.offset_in_window = locations[:, 1] % example_ctx_len

    def activating(self, latent: int) -> tuple[Tensor, Tensor]:
        """`(windows, max activations)` where `latent` fires, strongest first (stable ties)."""
        rows = self.cache.latent_slice(latent)
        windows, inverse = self.window_of[rows].unique(return_inverse=True)
        maxima = torch.zeros(len(windows)).scatter_reduce(
            0, inverse, self.cache.activations[rows], "amax", include_self=False)
        order = maxima.argsort(descending=True, stable=True)
        return windows[order], maxima[order]

    def example(self, latent: int, window: int, **labels: int | float | None) -> Example:
        rows = self.cache.latent_slice(latent)
        here = self.window_of[rows] == window
        activations = torch.zeros(self.width).index_put_(
            (self.offset_in_window[rows][here],), self.cache.activations[rows][here])
        return Example(window, self.tokens[window].tolist(), activations.tolist(), **labels)

    def silent(self, latent: int, windows: Tensor) -> Tensor:
        """`windows` where `latent` is zero throughout, in the given order."""
        return windows[~torch.isin(windows, self.window_of[self.cache.latent_slice(latent)])]


def _draw(items: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """Up to `n` of `items` uniformly without replacement, in their original order."""
    if len(items) <= n:
        return items
    return items[torch.randperm(len(items), generator=generator)[:n].sort().values]


def quantile_bins(maxima: Tensor, n_quantiles: int
                  ) -> tuple[list[Tensor], list[tuple[float, float] | None]]:
    """Equal-count bins of activating windows by max activation: `(positions, ranges)` per bin.

    `maxima` is sorted strongest first (as `ContextWindows.activating` returns); bin 0 holds the
    weakest windows. A bin's range is the (smallest, largest) max activation in it, `None` if the
    bin is empty (fewer activating windows than bins).
    """
    if isinstance(n_quantiles, bool) or not isinstance(n_quantiles, int) or n_quantiles < 1:
        raise ValueError(f"n_quantiles={n_quantiles!r} must be an int >= 1")
    n = len(maxima)
    ascending = torch.arange(n - 1, -1, -1)
    bounds = [q * n // n_quantiles for q in range(n_quantiles + 1)]
    bins = [ascending[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    ranges = [(float(maxima[b[0]]), float(maxima[b[-1]])) if len(b) else None for b in bins]
    return bins, ranges


def sample_examples(windows: ContextWindows, latent: int, config: SamplingConfig,
                    top_tokens: list[int], neighbours: tuple[Tensor, Tensor] | None = None
                    ) -> LatentExamples:
    """Draw top, quantile and non-activating examples of `latent` (seeded by `config.seed`).

    Args:
        top_tokens: the tokens the latent fires on most (`LatentStatistics.top_tokens`), for the
            same-token negatives.
        neighbours: `nearest_latents(...)` for the neighbour negatives (none without it).
    """
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + latent)
    activating, maxima = windows.activating(latent)
    top = [windows.example(latent, int(w)) for w in activating[:config.n_top]]
    bins, ranges = quantile_bins(maxima, config.n_quantiles)
    quantiles = [
        [windows.example(latent, int(activating[i]), quantile=q)
         for i in _draw(positions[positions >= config.n_top], config.n_per_quantile, generator)]
        for q, positions in enumerate(bins)
    ]
    random_windows = _draw(windows.silent(latent, torch.arange(windows.n_windows)),
                           config.n_random, generator)
    holding = torch.isin(windows.tokens, torch.tensor(top_tokens, dtype=torch.long)).any(1)
    same_token = _draw(windows.silent(latent, holding.nonzero()[:, 0]), config.n_same_token,
                       generator)
    return LatentExamples(
        latent=latent,
        n_activating_windows=len(activating),
        window_firing_rate=len(activating) / windows.n_windows,
        top=top,
        quantile_ranges=ranges,
        quantiles=quantiles,
        random_negatives=[windows.example(latent, int(w)) for w in random_windows],
        neighbour_negatives=_neighbour_negatives(windows, latent, config.n_neighbour, neighbours),
        same_token_negatives=[windows.example(latent, int(w)) for w in same_token],
    )


def _neighbour_negatives(windows: ContextWindows, latent: int, n: int,
                         neighbours: tuple[Tensor, Tensor] | None) -> list[Example]:
    """The strongest windows of each neighbour where `latent` is silent, taken round-robin over
    neighbours (most similar first) so that no single neighbour supplies them all."""
    if neighbours is None or n == 0:
        return []
    per_neighbour = []
    for neighbour, similarity in zip(neighbours[0][latent].tolist(),
                                     neighbours[1][latent].tolist(), strict=True):
        if neighbour < 0:
            continue
        silent = windows.silent(latent, windows.activating(neighbour)[0])[:n]
        per_neighbour.append([(int(w), neighbour, similarity) for w in silent])
    chosen: dict[int, tuple[int, float]] = {}
    for item in chain.from_iterable(zip_longest(*per_neighbour)):
        if item is not None and item[0] not in chosen:
            chosen[item[0]] = item[1:]
        if len(chosen) == n:
            break
    return [windows.example(latent, w, neighbour=nb, similarity=s) for w, (nb, s) in chosen.items()]
