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

    def update(self, latent_acts: torch.Tensor, latent_indices: torch.Tensor | None,
               n_tokens: int, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
               ) -> None:
        """Add a batch: `latent_acts` `[rows, k]` with `latent_indices`, or dense `[rows, n]`.

        `n_tokens` is the number of tokens this update stands for over all processes.
        """
        fired = self.fired(latent_acts, latent_indices)
        self.advance(fired if reduce is None else reduce(fired), n_tokens)

    @torch.no_grad()
    def fired(self, latent_acts: torch.Tensor, latent_indices: torch.Tensor | None
              ) -> torch.Tensor:
        """`[n_latents]` int32: 1 where a latent is active in the batch (summable over batches)."""
        n_latents = self.tokens_since_fired.numel()
        device = self.tokens_since_fired.device
        if latent_indices is None:
            return (latent_acts != 0).reshape(-1, n_latents).any(0).to(device, torch.int32)
        fired = torch.zeros(n_latents, dtype=torch.int32, device=device)
        fired[latent_indices[latent_acts != 0].to(device)] = 1
        return fired

    @torch.no_grad()
    def advance(self, fired: torch.Tensor, n_tokens: int) -> None:
        """Count `n_tokens` more tokens; latents with `fired > 0` restart from zero."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired > 0] = 0

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
