"""On-disk activation cache: one forward pass of the language model feeds many SAE runs.

A cache is a folder of safetensors shards `{site: [rows, width]}` (in the model's dtype, in
reading order; `ActivationStream` shuffles later) plus `cache_info.json`, written last, which marks
it complete and records what it was built from. Under a cache root, each combination of model,
data and sites gets its own folder (named by a hash of them), so a run never reads activations of
other settings and changing settings never needs a manual clean-up.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..activations import EpochOrder, ModelActivations

CACHE_INFO_FILE = "cache_info.json"


def write_activation_cache(
    source: ModelActivations,
    directory: str | Path,
    *,
    max_rows: int,
    rows_per_shard: int,
    shard_prefix: str = "shard",
) -> tuple[int, bool]:
    """Write one pass over `source` (at most `max_rows` rows) as safetensors shards.

    Returns the rows written and whether they are the source's whole epoch (not cut at max_rows).
    Each shard holds `{site: [rows, width]}` in the model's dtype, in reading order (the stream
    shuffles later). Shards are written atomically; processes use distinct `shard_prefix`es. Call
    `finish_activation_cache` once all writers are done.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    written, shard_index, pending = 0, 0, []
    start_epoch = source.epoch
    while written < max_rows and source.epoch == start_epoch:
        pending.append(source.next_block())
        pending_rows = sum(block[source.sites[0]].shape[0] for block in pending)
        is_last = written + pending_rows >= max_rows or source.epoch != start_epoch
        if pending_rows >= rows_per_shard or is_last:
            shard = {site: torch.cat([block[site] for block in pending])[: max_rows - written]
                     for site in source.sites}
            path = folder / f"{shard_prefix}-{shard_index:06d}.safetensors"
            save_file({site: rows.contiguous().cpu() for site, rows in shard.items()},
                      str(path) + ".tmp")
            os.replace(str(path) + ".tmp", path)
            written += shard[source.sites[0]].shape[0]
            shard_index, pending = shard_index + 1, []
    return written, source.epoch != start_epoch


def finish_activation_cache(directory: str | Path, metadata: dict[str, Any]) -> None:
    """Mark a cache complete by writing its `cache_info.json` (what it was built from)."""
    path = Path(directory) / CACHE_INFO_FILE
    path.with_suffix(".tmp").write_text(json.dumps(metadata, indent=2, sort_keys=True))
    os.replace(path.with_suffix(".tmp"), path)


def read_cache_info(directory: str | Path) -> dict[str, Any] | None:
    """The metadata of a complete cache in `directory`, or None if there is none (yet)."""
    path = Path(directory) / CACHE_INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class CachedActivations:
    """Blocks of a cache written by `write_activation_cache`: one shard per block.

    Shard `i` belongs to process `i % world_size`, so a cache written by any number of processes
    feeds any other number; each process reads its shards in a new seeded order every epoch.
    """

    def __init__(self, directory: str | Path, sites: list[str], *, rank: int = 0,
                 world_size: int = 1, seed: int = 0) -> None:
        shards = sorted(Path(directory).glob("*.safetensors"))
        self.shards = shards[rank::world_size]
        if not self.shards:
            raise ValueError(f"activation cache {directory} has {len(shards)} shards, fewer than "
                             f"the {world_size} processes reading it; rebuild it with more data")
        self.sites = list(sites)
        self.order = EpochOrder(len(self.shards), seed)

    @property
    def epoch(self) -> int:
        return self.order.epoch

    def next_block(self) -> dict[str, torch.Tensor]:
        shard = load_file(str(self.shards[self.order.take(1)[0]]))
        missing = [site for site in self.sites if site not in shard]
        if missing:
            raise ValueError(f"the activation cache lacks sites {missing}; it holds {list(shard)}")
        return {site: shard[site] for site in self.sites}

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state)




def cache_folder(root: str | Path, metadata: dict[str, Any]) -> Path:
    """`root/<model>-<hash of metadata>`: one folder per combination of model, data and sites."""
    digest = hashlib.sha1(json.dumps(metadata, sort_keys=True).encode()).hexdigest()[:12]
    model = str(metadata.get("model_name_or_path", "activations")).rstrip("/").split("/")[-1]
    return Path(root) / f"{model}-{digest}"


def open_or_build_cache(source: ModelActivations, root: str | Path, metadata: dict[str, Any],
                        *, max_rows: int, rows_per_shard: int, accelerator: Any,
                        seed: int) -> CachedActivations:
    """Read the cache of `metadata` under `root`, building it first (one pass of `source`).

    A complete cache is reused when it holds the source's whole epoch or at least this run's
    `max_rows` per process; otherwise it is rebuilt. Every process writes its own shards; the main
    process marks the cache complete once all are done. Running out of disk fails up front.
    """
    metadata = {**metadata, "sites": sorted(source.sites)}
    folder = cache_folder(root, metadata)
    info = read_cache_info(folder)
    world_size = accelerator.num_processes
    if info is None or not (info["full_pass"] or info["rows"] >= max_rows * world_size):
        _check_disk_space(source, folder, max_rows * world_size)
        if accelerator.is_main_process and folder.is_dir():
            shutil.rmtree(folder)
        accelerator.wait_for_everyone()
        rows, full_pass = write_activation_cache(
            source, folder, max_rows=max_rows, rows_per_shard=rows_per_shard,
            shard_prefix=f"rank{accelerator.process_index:05d}")
        totals = accelerator.reduce(torch.tensor([rows, int(full_pass)],
                                                 device=accelerator.device), "sum").tolist()
        if accelerator.is_main_process:
            finish_activation_cache(folder, {**metadata, "rows": totals[0],
                                             "full_pass": totals[1] == world_size})
        accelerator.wait_for_everyone()
    return CachedActivations(folder, source.sites, rank=accelerator.process_index,
                             world_size=world_size, seed=seed)


def _check_disk_space(source: ModelActivations, folder: Path, max_rows: int) -> None:
    """Refuse to start a cache that cannot fit on the disk (checked before the long pass)."""
    epoch_rows = source.chunks.tokens_per_epoch
    rows = max_rows if epoch_rows is None else min(max_rows, epoch_rows)
    position = copy.deepcopy(source.state_dict())
    probe = source.next_block()
    source.load_state_dict(position)
    bytes_per_row = sum(x.shape[-1] * x.element_size() for x in probe.values())
    existing = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    free = shutil.disk_usage(existing).free
    if rows * bytes_per_row > 0.95 * free:
        raise ValueError(
            f"the activation cache needs ~{rows * bytes_per_row / 1e9:.1f} GB but {existing} has "
            f"{free / 1e9:.1f} GB free; use another --activation_cache_dir, fewer --total_tokens, "
            "or --activation_cache_dir none to stream activations from the model")
