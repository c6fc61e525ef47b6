"""What a run trains: one SAE per hookpoint (`Target`), its config, and `SAERun`, the SAE with
everything that steps with it (optimizers, schedules, dead-latent counter)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..configuration_deepsae import DeepSAEConfig
from ..sites import Site, capture_activations, find_mlp_sites, resolve_sites
from .config import TrainingConfig
from .dead_latents import DeadLatentCounter


class Target(NamedTuple):
    """Where one SAE sits: its hookpoint (the module path it reconstructs the output of), the
    layer index when known, the site it reads and the site it reconstructs (the same for SAEs,
    MLP input and output for transcoders)."""

    hookpoint: str
    layer: int | None
    read: Site
    write: Site

    @property
    def log_prefix(self) -> str:
        return f"layer_{self.layer}" if self.layer is not None else self.hookpoint


@dataclass
class SAERun:
    """One SAE being trained (on this process: whole, or its latent shard), with everything that
    steps with it."""

    target: Target
    sae: Any
    optimizers: list
    schedulers: list
    dead: DeadLatentCounter
    index: int = 0
    """Position among the run's targets."""

    @property
    def name(self) -> str:
        return self.target.hookpoint

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(SAE input, transcoder target or None) from a batch keyed by `site_name`."""
        read, write = self.target.read, self.target.write
        return batch[site_name(read)], None if write == read else batch[site_name(write)]


def site_name(site: Site) -> str:
    """A string key for a `Site` (safetensors keys and logs need strings)."""
    return f"{site.path}:{site.side}"


def capture_sites(targets: list[Target]) -> dict[str, Site]:
    """Every site the targets read or reconstruct, keyed by `site_name`."""
    return {site_name(site): site for target in targets for site in (target.read, target.write)}


def resolve_targets(model: Any, config: TrainingConfig, transcoder: bool) -> list[Target]:
    """One `Target` per entry of `--hookpoints` (or else `--layers`); raises on bad ones."""
    keys: list[int | str] = list(config.hookpoints or config.layers)
    try:
        layer_of = {path: layer for layer, path in find_mlp_sites(model).items()}
    except ValueError:  # an unknown architecture: explicit hookpoints still work
        layer_of = {}
    targets = []
    for key in keys:
        read, write = resolve_sites(model, key, transcoder=transcoder)
        targets.append(Target(write.path, layer_of.get(write.path), read, write))
    if len({target.hookpoint for target in targets}) != len(targets):
        raise ValueError(f"--layers/--hookpoints name the same site twice: {keys}")
    return targets


def sae_configs(model: Any, tokenizer: Any, targets: list[Target], sae_kwargs: dict[str, Any]
                ) -> list[DeepSAEConfig]:
    """The config of each target's SAE, its widths read from one tiny forward of `model`."""
    probe = torch.full((1, 2), tokenizer.eos_token_id, device=model.device)
    widths = {name: activations.shape[-1] for name, activations in capture_activations(
        model, probe, list(capture_sites(targets).values())).items()}
    return [DeepSAEConfig(
        **sae_kwargs, d_in=widths[target.read],
        d_out=widths[target.write] if sae_kwargs["transcoder"] else None,
        base_model_name_or_path=model.name_or_path, hookpoint=target.hookpoint,
        layer=target.layer) for target in targets]
