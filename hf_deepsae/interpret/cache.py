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
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..files import (
    FileFormatError,
    atomic_write_text,
    check_tensor,
    chmod_as_new_file,
    load_safetensors,
    read_json,
)
from ..modeling_deepsae import DeepSAEModel, SparseLatents
from ..sites import check_token_batch
from ..splice import capture_activations, sae_sites

CONFIG_NAME = "config.json"
SHARD_NAME = re.compile(r"^(\d+)_(\d+)\.safetensors$")
REBUILD = "rebuild the cache (build_latent_cache(...).save) or copy it again"


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
        if isinstance(self.n_latents, bool) or not isinstance(self.n_latents, int) \
                or self.n_latents <= 0:
            raise ValueError(f"n_latents={self.n_latents!r} must be a positive int")
        for name in ("tokens", "locations"):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.is_floating_point() or value.is_complex():
                raise ValueError(f"{name} must be an integer tensor, got "
                                 f"{getattr(value, 'dtype', type(value))}")
        if self.tokens.dim() != 2 or self.tokens.numel() == 0:
            raise ValueError(f"tokens must be a non-empty [n_sequences, ctx_len], got "
                             f"{tuple(self.tokens.shape)}")
        if not isinstance(self.activations, Tensor) or not self.activations.is_floating_point() \
                or not torch.isfinite(self.activations).all():
            raise ValueError("activations must be a float tensor without NaN or inf")
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
        if isinstance(n_splits, bool) or not isinstance(n_splits, int) \
                or not 1 <= n_splits <= self.n_latents:
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
        atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=4) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> LatentCache:
        """Read a cache written by `save` or by delphi (its latent count is the last shard end).

        Every problem (unreadable config or shard, a missing tensor, shards that disagree on the
        corpus or hold latents outside their range) raises `FileFormatError` naming the file.
        """
        directory = Path(directory)
        shards = sorted((tuple(map(int, match.groups())), path)
                        for path in directory.glob("*_*.safetensors")
                        if (match := SHARD_NAME.match(path.name)))
        if not shards or not (directory / CONFIG_NAME).is_file():
            raise ValueError(f"{directory} holds no latent cache (<start>_<end>.safetensors shards "
                             f"and {CONFIG_NAME}); write one with LatentCache.save")
        config = read_json(directory / CONFIG_NAME, fix=REBUILD)
        locations, activations, tokens = [], [], None
        for (start, end), path in shards:
            shard_locations, shard_activations, shard_tokens = _read_shard(path, start, end)
            if tokens is not None and not torch.equal(tokens, shard_tokens):
                raise FileFormatError(path, f"its tokens differ from {shards[0][1].name}'s: the "
                                      "shards come from different corpora", REBUILD)
            locations.append(shard_locations)
            activations.append(shard_activations)
            tokens = shard_tokens
        n_latents = config.pop("n_latents", shards[-1][0][1] + 1)
        for derived in ("cache_ctx_len", "n_tokens", "n_splits"):
            config.pop(derived, None)
        try:
            return cls(tokens, torch.cat(locations), torch.cat(activations), n_latents, config)
        except ValueError as error:
            raise FileFormatError(directory, f"the cache is inconsistent ({error})",
                                  REBUILD) from None


def _read_shard(path: Path, start: int, end: int) -> tuple[Tensor, Tensor, Tensor]:
    """`(locations [N, 3] with global latent ids, activations [N], tokens)` of one shard."""
    data = load_safetensors(path, fix=REBUILD, required=("locations", "activations", "tokens"))
    locations, tokens = (_ids(path, name, data[name]) for name in ("locations", "tokens"))
    activations = check_tensor(path, "activations", data["activations"], fix=REBUILD,
                               ndim=1).float()
    if locations.shape[1:] != (3,) or len(activations) != len(locations):
        raise FileFormatError(path, f"locations {tuple(locations.shape)} and activations "
                              f"{tuple(activations.shape)} must be [N, 3] and [N]", REBUILD)
    if locations.numel() and (locations.min() < 0 or locations[:, 2].max() > end - start):
        raise FileFormatError(path, f"it holds latents outside its range {start}..{end}", REBUILD)
    locations[:, 2] += start
    return locations, activations, tokens


def _ids(path: Path, name: str, tensor: Tensor) -> Tensor:
    """A 2-D integer tensor of a shard, as int64."""
    check_tensor(path, name, tensor, fix=REBUILD, ndim=2, floating=False)
    if tensor.is_floating_point() or tensor.dtype == torch.bool:
        raise FileFormatError(path, f"tensor {name!r} has dtype {tensor.dtype}, expected an "
                              "integer dtype", REBUILD)
    return tensor.long()


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
    check_token_batch(input_ids)
    if not saes:
        raise ValueError("no SAEs given: pass {name: sae}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
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
