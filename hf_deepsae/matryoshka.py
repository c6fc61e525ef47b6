"""Matryoshka SAEs (Bussmann et al. 2025; Nabeshima 2025): nested prefixes of the latents, each
trained to reconstruct on its own.

A prefix p is the latents with global id < p (stage 0's ids first, see `DeepSAEConfig`), and its
reconstruction is the SAE's output with every later latent switched off: the kept latents go
through the full decoder (a deep decoder's MLP included) with the decoder bias and a skip
transcoder's `W_skip x`, i.e. `decode(*encode(x, prefix=p), x=x)`. The latents are those the full
SAE selects (top-k over all latents, then truncated), as in the reference implementations, so a
prefix is used exactly as it was trained. On a stacked SAE a prefix keeps whole the stages it
passes and truncates the one it ends in; the later stages, all latents off, add only their
decoders' constant output (`decode` of zero latents), as they do in `decode`.

This file is copied next to every saved checkpoint with `modeling_deepsae.py` (`auto_map`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .configuration_deepsae import DeepSAEConfig
    from .modeling_deepsae import SparseStage, _StageResult


def stage_end(prefix: int, stage_index: int, n_latents: int) -> int:
    """How many of its own latents stage `stage_index` keeps under global `prefix` (0: none;
    `n_latents`: all)."""
    return min(max(prefix - stage_index * n_latents, 0), n_latents)


def prefix_reconstructions(stages: list[SparseStage], results: list[_StageResult],
                           prefixes: list[int], n_latents: int) -> list[torch.Tensor]:
    """`[B, d_out]` reconstructions (without a skip term) of each global prefix in `prefixes`.

    Each stage decodes each of its truncation points once (a stage kept whole reuses its full
    reconstruction from `results`), so the cost is one decoder pass per distinct truncation.
    """
    decoded: list[dict[int, torch.Tensor]] = []
    for index, (stage, result) in enumerate(zip(stages, results, strict=True)):
        ends = sorted({stage_end(prefix, index, n_latents) for prefix in prefixes} - {n_latents})
        partial = stage.decode_prefixes(result.latent_acts, result.latent_indices, ends)
        decoded.append({**dict(zip(ends, partial, strict=True)),
                        n_latents: result.reconstruction})
    return [sum(by_end[stage_end(prefix, index, n_latents)] for index, by_end in enumerate(decoded))
            for prefix in prefixes]


def matryoshka_loss(prefix_fvus: torch.Tensor, config: DeepSAEConfig) -> torch.Tensor:
    """The weighted mean of the prefixes' FVUs (`config.matryoshka_weights`, equal by default):
    the reconstruction term of the loss, on the scale of a single FVU."""
    weights = config.matryoshka_weights or [1.0] * len(prefix_fvus)
    weights = prefix_fvus.new_tensor(weights)
    return (weights * prefix_fvus).sum() / weights.sum()


def truncate_latents(latent_acts: torch.Tensor, latent_indices: torch.Tensor | None,
                     prefix: int) -> torch.Tensor:
    """`latent_acts` with the latents of global id >= `prefix` set to 0 (shapes unchanged).

    Sparse latents keep their ids, so `decode` and `densify` take the result as it is; a zero
    value marks an inactive latent, as for a top-k value a ReLU zeroed."""
    if latent_indices is None:
        kept = torch.arange(latent_acts.shape[-1], device=latent_acts.device) < prefix
    else:
        kept = latent_indices < prefix
    return latent_acts * kept
