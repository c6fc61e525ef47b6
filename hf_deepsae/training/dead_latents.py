"""Counting dead latents: tokens since each latent last fired, agreed on by every process."""

from __future__ import annotations

from collections.abc import Callable

import torch


class DeadLatentCounter:
    """Per-latent count of tokens since it last fired; a latent is dead past `threshold` tokens.

    `update` takes an optional `reduce` (e.g. `accelerator.reduce`) that sums the local "fired"
    indicators over processes, so every process holds the same counts and the same `dead_mask`
    (which the AuxK loss needs identical on all ranks). The counts are checkpointed through
    `state_dict` (by `training.checkpointing`, as safetensors).
    """

    def __init__(self, n_latents: int, threshold: int, device: str | torch.device = "cpu") -> None:
        self.threshold = threshold
        self.tokens_since_fired = torch.zeros(n_latents, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, latent_acts: torch.Tensor, latent_indices: torch.Tensor | None,
               n_tokens: int, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
               ) -> None:
        """Add a batch: `latent_acts` `[rows, k]` with `latent_indices`, or dense `[rows, n]`.

        `n_tokens` is the number of tokens this update stands for over all processes.
        """
        counts = self.tokens_since_fired
        if latent_indices is None:
            fired = (latent_acts != 0).reshape(-1, counts.numel()).any(0).to(torch.int32)
        else:
            fired = torch.zeros(counts.numel(), dtype=torch.int32, device=counts.device)
            fired[latent_indices[latent_acts != 0].to(counts.device)] = 1
        if reduce is not None:
            fired = reduce(fired)
        counts += n_tokens
        counts[fired > 0] = 0

    @property
    def dead_mask(self) -> torch.Tensor:
        """`[n_latents]` bool: latents silent for at least `threshold` tokens."""
        return self.tokens_since_fired >= self.threshold

    def dead_fraction(self) -> float:
        return self.dead_mask.float().mean().item()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"tokens_since_fired": self.tokens_since_fired.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
