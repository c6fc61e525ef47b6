"""The std of the encoder pre-activations: the penalty against dead latents, and its logged value.

Deep SAEs lose latents when pre-activations spread out early in training; a small penalty on
`mean over rows of std across latents` holds them together. It is also logged every step, so
both ways of computing it must cost far less than the encoder matmul they describe:

- `gram_pre_act_std` differentiates it for top-k SAEs, whose `[B, n]` pre-activations carry no
  gradient (the k selected values do, through `sparsity.gather_linear`): the row moments follow
  from the encoder's second moments `WᵀW`, O(n·d²) instead of a dense backward through `[B, n]`.
- `mean_row_std` is the value alone, read from the pre-activations in two vectorised reductions.

This file is copied next to every saved checkpoint with `modeling_deepsae.py` (`auto_map`).
"""

from __future__ import annotations

import torch
from torch import nn

ROWS_PER_BLOCK = 128
"""Rows upcast to fp32 at a time: a `[128, n]` block stays in cache between its two reductions."""
MAX_MEAN_TO_VARIANCE = 1e3
"""Raw moments lose ~`eps·mean²/variance` to cancellation; beyond this ratio use torch.std."""


@torch.no_grad()
def mean_row_std(values: torch.Tensor) -> torch.Tensor:
    """`values.float().std(-1).mean()` (fp32, no gradient) at ~1/10 of torch.std's CPU cost.

    torch.std's Welford pass over a `[4096, 9216]` batch costs a third of the encoder matmul on
    CPU. Row sums and row norms are two vectorised reductions, taken over blocks of rows that stay
    in cache while upcast to fp32. They cancel when a row's mean dwarfs its spread; such batches
    (unlike SAE pre-activations, whose |mean| is of the order of their std) go to torch.std.
    """
    n = values.shape[-1]
    rows = values.reshape(-1, n)
    sums, squares = [], []
    for block in rows.split(ROWS_PER_BLOCK):
        block = block.float()
        sums.append(block.sum(-1))
        squares.append(torch.linalg.vector_norm(block, dim=-1).square())
    mean = torch.cat(sums) / n
    variance = (torch.cat(squares) - n * mean.square()) / (n - 1)
    if (mean.square() > MAX_MEAN_TO_VARIANCE * variance).any():
        return rows.float().std(-1).mean()
    return variance.clamp_min(0).sqrt().mean()


def gram_pre_act_std(hidden: torch.Tensor, encoder: nn.Linear) -> torch.Tensor:
    """Differentiable `encoder(hidden).std(-1).mean()` without forming `encoder(hidden)`."""
    return std_from_row_moments(gram_row_moments(hidden, encoder), encoder.weight.shape[0])


def gram_row_moments(hidden: torch.Tensor, encoder: nn.Linear) -> torch.Tensor:
    """`[2, B]`: each row's sum and sum of squares of `encoder(hidden)` over the latents (fp32).

    With `W` `[n, d]` and `b` `[n]`, a row's sum is `h·Σ_i W_i + Σ_i b_i` and its sum of squares
    `hᵀ(WᵀW)h + 2h·(Wᵀb) + b·b`; gradients reach `W`, `b` and `h` through these in
    O(n·d² + B·d²). Sums over latents, so the moments of latent blocks (shards) add up.
    """
    weight, bias = encoder.weight.float(), encoder.bias.float()
    hidden = hidden.float()
    sums = hidden @ weight.sum(0) + bias.sum()
    squares = (((hidden @ (weight.T @ weight)) * hidden).sum(-1)
               + 2 * hidden @ (weight.T @ bias) + bias.dot(bias))
    return torch.stack([sums, squares])


def std_from_row_moments(moments: torch.Tensor, n: int) -> torch.Tensor:
    """Mean over rows of the std across `n` latents, from `gram_row_moments`' `[2, B]`."""
    mean = moments[0] / n
    variance = (moments[1] - n * mean.pow(2)).clamp_min(0) / (n - 1)
    return variance.add(1e-12).sqrt().mean()
