"""The k schedule: more active latents early in training, annealed down to the SAE's own k.

Starting a top-k SAE with a larger k lets many more latents receive gradient before the code
becomes sparse (the aim AuxK pursues for dead latents, here for every latent from the start; its
effect on dead latents and FVU is not measured in this repository yet); the k falls linearly to
the target over the first `k_anneal_steps` optimizer steps and stays there.
The k at a step depends on the step alone, so a resumed run continues the schedule exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from ..configuration_deepsae import DeepSAEConfig
from .config import TrainingConfig


@dataclass(frozen=True)
class KSchedule:
    """k falls linearly from `start_k` at step 0 to `k` at step `anneal_steps`, then stays."""

    start_k: int
    k: int
    anneal_steps: int

    @classmethod
    def of(cls, config: TrainingConfig, sae_config: DeepSAEConfig) -> KSchedule:
        """The schedule `config` asks for the SAE of `sae_config` (a constant k unless
        `k_anneal_steps`; the trainer refuses annealing for SAEs without a k)."""
        if not config.k_anneal_steps:
            return cls(sae_config.k, sae_config.k, 0)
        return cls(config.resolved_k_anneal_start(sae_config.k, sae_config.n_latents),
                   sae_config.k, config.k_anneal_steps)

    def at(self, step: int) -> int:
        """The k of optimizer step `step` (0-based), rounded to the nearest integer."""
        if step >= self.anneal_steps:
            return self.k
        return round(self.start_k + (self.k - self.start_k) * step / self.anneal_steps)


@contextlib.contextmanager
def active_k(config: DeepSAEConfig, k: int) -> Iterator[None]:
    """Within the block the SAE of `config` selects `k` latents; its own k comes back after.

    The sparsity rules read `config.k` at every call (`sparsity.TopK`), the same object in every
    stage and latent shard, so setting it here reaches every architecture without another
    forward argument; the `finally` guarantees the saved SAE (and any exception) sees its k.
    """
    own_k = config.k
    config.k = k
    try:
        yield
    finally:
        config.k = own_k
