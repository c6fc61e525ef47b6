"""Where every latent fired over a token corpus, stored sparsely, in EleutherAI delphi's layout.

A `LatentCache` holds the corpus `tokens` `[n_sequences, ctx_len]` and one row per firing:
`locations[i] = (sequence, position, latent)` with `activations[i]` its value. Rows are kept sorted
by latent, so one latent's firings are a contiguous slice (`latent_slice`): everything downstream
(statistics, example sampling, scoring) works latent by latent.

On disk it is exactly what delphi's `LatentCache.save_splits` + `save_config` write, so a cache
made here goes through delphi unchanged: put the folder at `<run>/latents/<hookpoint>/`. The folder
holds `config.json` (delphi's `CacheConfig` fields plus `model_name`) and one
`<start>_<end>.safetensors` per slice of the latent range (inclusive ends, `torch.linspace`
boundaries, as delphi splits) with `locations` `[N, 3]` (uint16, or uint32 when an index does not
fit; the latent column relative to `start`), `activations` `[N]` and the whole corpus `tokens`
(delphi reads them from whichever shard it opens first). Activations are float32 by default, so a
round trip is exact; `activation_dtype=torch.float16` halves the size as delphi does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..files import chmod_as_new_file
from ..modeling_deepsae import DeepSAEModel, SparseLatents
from ..splice import capture_activations, sae_sites

CONFIG_NAME = "config.json"


@dataclass
class LatentCache:
    """Sparse latent activations of one SAE over a token corpus.

    Args:
        tokens: `[n_sequences, ctx_len]` token ids the latents were computed on.
        locations: `[N, 3]` `(sequence, position, latent)` of every non-zero activation.
        activations: `[N]` the activation values.
        n_latents: latents of the SAE (`config.n_total_latents`), so dead latents stay visible.
        config: provenance written to `config.json`: delphi's `CacheConfig` fields
            (`dataset_repo`, `dataset_split`, `dataset_name`, `dataset_column`, `batch_size`,
            `n_splits`), `model_name` (delphi loads the tokenizer from it) and anything else
            JSON-serialisable (e.g. `hookpoint`, `sae_name_or_path`).
    """

    tokens: Tensor
    locations: Tensor
    activations: Tensor
    n_latents: int
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2:
            raise ValueError(f"tokens must be [n_sequences, ctx_len], got "
                             f"{tuple(self.tokens.shape)}")
        if self.locations.dim() != 2 or self.locations.shape[1] != 3:
            raise ValueError(f"locations must be [N, 3] (sequence, position, latent), got "
                             f"{tuple(self.locations.shape)}")
        if self.activations.shape != self.locations.shape[:1]:
            raise ValueError(f"activations {tuple(self.activations.shape)} must be [N] with N = "
                             f"{self.locations.shape[0]} locations")
        self.tokens = self.tokens.long()
        locations, activations = self.locations.long(), self.activations.float()
        if locations.numel() and (locations.min() < 0 or (locations.max(0).values >= torch.tensor(
                [*self.tokens.shape, self.n_latents])).any()):
            raise ValueError(f"locations fall outside tokens {tuple(self.tokens.shape)} x "
                             f"{self.n_latents} latents")
        ctx_len = self.tokens.shape[1]
        order = torch.argsort(
            (locations[:, 2] * self.tokens.shape[0] + locations[:, 0]) * ctx_len + locations[:, 1])
        self.locations, self.activations = locations[order], activations[order]
        self.offsets = torch.searchsorted(self.locations[:, 2].contiguous(),
                                          torch.arange(self.n_latents + 1))

    @property
    def n_tokens(self) -> int:
        return self.tokens.numel()

    def latent_slice(self, latent: int) -> slice:
        """The rows of `locations`/`activations` that belong to `latent`."""
        if not 0 <= latent < self.n_latents:
            raise ValueError(f"latent {latent} is out of range [0, {self.n_latents})")
        return slice(int(self.offsets[latent]), int(self.offsets[latent + 1]))

    def firing_counts(self) -> Tensor:
        """`[n_latents]` how many tokens each latent fired on (0 = dead on this corpus)."""
        return self.offsets.diff()

    def save(self, directory: str | Path, n_splits: int = 5,
             activation_dtype: torch.dtype = torch.float32) -> None:
        """Write the delphi layout (see the module docstring) into `directory`."""
        if n_splits < 1 or n_splits > self.n_latents:
            raise ValueError(f"n_splits={n_splits} must be in [1, n_latents={self.n_latents}]")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*_*.safetensors"):
            stale.unlink()
        tokens = self.tokens.numpy()
        for start, end in split_ranges(self.n_latents, n_splits):
            rows = self.latent_slice(start).start, self.latent_slice(end).stop
            locations = self.locations[rows[0]:rows[1]].clone()
            locations[:, 2] -= start
            fits_16 = locations.numel() == 0 or bool((locations.max(0).values < 2**16).all())
            save_file({
                "locations": locations.numpy().astype(np.uint16 if fits_16 else np.uint32),
                "activations": self.activations[rows[0]:rows[1]].to(activation_dtype).numpy(),
                "tokens": tokens,
            }, str(directory / f"{start}_{end}.safetensors"))
            chmod_as_new_file(directory / f"{start}_{end}.safetensors")
        config = {**self.config, "cache_ctx_len": self.tokens.shape[1], "n_tokens": self.n_tokens,
                  "n_splits": n_splits, "n_latents": self.n_latents}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=4) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> LatentCache:
        """Read a cache written by `save` or by delphi (its latent count is the last shard end)."""
        directory = Path(directory)
        shards = sorted((tuple(map(int, path.stem.split("_"))), path)
                        for path in directory.glob("*_*.safetensors"))
        if not shards or not (directory / CONFIG_NAME).is_file():
            raise ValueError(f"{directory} holds no latent cache (<start>_<end>.safetensors shards "
                             f"and {CONFIG_NAME}); write one with LatentCache.save")
        config = json.loads((directory / CONFIG_NAME).read_text())
        locations, activations, tokens = [], [], None
        for (start, _), path in shards:
            data = load_file(str(path))
            shard_locations = torch.from_numpy(data["locations"].astype(np.int64))
            shard_locations[:, 2] += start
            locations.append(shard_locations)
            activations.append(torch.from_numpy(data["activations"].astype(np.float32)))
            tokens = torch.from_numpy(data["tokens"].astype(np.int64))
        n_latents = config.pop("n_latents", shards[-1][0][1] + 1)
        for derived in ("cache_ctx_len", "n_tokens", "n_splits"):
            config.pop(derived, None)
        return cls(tokens, torch.cat(locations), torch.cat(activations), n_latents, config)


def split_ranges(n_latents: int, n_splits: int) -> list[tuple[int, int]]:
    """Inclusive `(start, end)` latent ranges of the shards as delphi splits them."""
    boundaries = torch.linspace(0, n_latents, steps=n_splits + 1).long().tolist()
    return [(start, end - 1) for start, end in zip(boundaries[:-1], boundaries[1:], strict=True)]


def _firings(latents: SparseLatents) -> tuple[Tensor, Tensor]:
    """`(locations [N, 3], activations [N])` of the non-zero latents of a `[batch, seq]` batch."""
    acts, indices = latents
    if indices is None:
        locations = acts.nonzero()
        return locations, acts[acts != 0]
    active = acts != 0
    positions = active.nonzero()[:, :2]
    return torch.cat([positions, indices[active].unsqueeze(1)], dim=1), acts[active]


@torch.inference_mode()
def build_latent_caches(model: nn.Module, saes: Mapping[str, DeepSAEModel], input_ids: Tensor,
                        batch_size: int = 8, config: Mapping[str, Any] | None = None
                        ) -> dict[str, LatentCache]:
    """Run `model` over `input_ids` `[n_sequences, ctx_len]` once and cache each SAE's latents.

    Each SAE reads the site its config names (`hookpoint`/`layer`, the MLP input for
    transcoders); the forward pass stops after the last one. `config` (delphi's `CacheConfig`
    fields such as `dataset_repo`) is recorded in every cache, with `model_name`, `hookpoint` and
    `batch_size` filled in.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [n_sequences, ctx_len], got {tuple(input_ids.shape)}")
    device = next(model.parameters()).device
    sites = {name: sae_sites(model, sae.config)[0] for name, sae in saes.items()}
    found: dict[str, tuple[list[Tensor], list[Tensor]]] = {name: ([], []) for name in saes}
    progress = tqdm(total=input_ids.numel(), desc="Caching latents", unit="tok", unit_scale=True)
    for first, batch in zip(range(0, len(input_ids), batch_size), input_ids.split(batch_size),
                            strict=True):
        captured = capture_activations(model, batch.to(device), sites.values())
        for name, sae in saes.items():
            inputs = captured[sites[name]].to(sae.device, sae.dtype)
            locations, activations = _firings(sae.encode(inputs))
            locations[:, 0] += first
            found[name][0].append(locations.cpu())
            found[name][1].append(activations.float().cpu())
        progress.update(batch.numel())
    progress.close()
    model_name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return {
        name: LatentCache(
            input_ids.cpu(), torch.cat(found[name][0]), torch.cat(found[name][1]),
            sae.config.n_total_latents,
            {"model_name": sae.config.base_model_name_or_path or model_name,
             "hookpoint": sites[name].path, "batch_size": batch_size, **(config or {})},
        )
        for name, sae in saes.items()
    }


def build_latent_cache(model: nn.Module, sae: DeepSAEModel, input_ids: Tensor,
                       batch_size: int = 8, config: Mapping[str, Any] | None = None
                       ) -> LatentCache:
    """`build_latent_caches` for a single SAE."""
    return build_latent_caches(model, {"sae": sae}, input_ids, batch_size, config)["sae"]
