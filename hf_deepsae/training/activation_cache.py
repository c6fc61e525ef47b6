"""On-disk activation cache: one forward pass of the language model feeds many SAE runs.

Under a cache root, `<model>-<key>/` holds the activations of one combination of what determines
them — the model's weights and tokenizer (Hub commit or file fingerprints), its dtype, the data
(files' identity), the sites, context length, held-out split and token mask (`metadata`, hashed
into `key`) — so a model folder overwritten with other weights, or a Hub model updated under the
same id, gets a new cache instead of the old activations. Inside, each build is a folder
`build-<rows>-<id>/` of safetensors shards `{site: [rows, width]}` (the model's dtype, reading
order; `ActivationStream` shuffles later) plus `KEEP_ROWS`, the rows the token mask keeps (every
row is stored, so the cache holds whole chunks; the stream drops and counts the others), and
`cache_info.json`, written last, which marks it complete. A complete build is never modified, so
a reader never sees half a cache:

- a build holds the folder's `build.lock` (filelock); a second run waiting for it then reuses it;
- a reader holds a shared lock on its build (`readers.lock`) while it reads; a bigger build that
  supersedes it deletes it only once no reader is left;
- a build cut short (killed, disk full) has no `cache_info.json` and is removed by the next build.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import reduce
from filelock import FileLock, ReadWriteLock, Timeout
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..activations import KEEP_ROWS, EpochOrder, ModelActivations
from ..files import atomic_write_json, load_safetensors, read_json

CACHE_INFO_FILE = "cache_info.json"
CACHE_FORMAT = 3
"""Bumped whenever what a cache holds changes meaning, so old caches are never reused (3: shards
hold the token mask's `KEEP_ROWS`)."""
_BUILD_PREFIX = "build-"
_REBUILD = "delete the folder; the next run rebuilds the cache"


def write_activation_cache(
    source: ModelActivations,
    directory: str | Path,
    *,
    max_rows: int,
    rows_per_shard: int,
    shard_prefix: str = "shard",
    progress: bool = False,
) -> tuple[int, bool]:
    """Write one pass over `source` (at most `max_rows` rows) as safetensors shards.

    Returns the rows written and whether they are the source's whole epoch (not cut at max_rows).
    Each shard holds `{site: [rows, width]}` in the model's dtype, in reading order (the stream
    shuffles later). Processes use distinct `shard_prefix`es; call `finish_activation_cache` once
    all writers are done. `progress` shows a tqdm bar in tokens per second.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    written, shard_index, pending = 0, 0, []
    start_epoch = source.epoch
    epoch_rows = source.chunks.tokens_per_epoch if hasattr(source, "chunks") else None
    bar = tqdm(total=min(max_rows, epoch_rows or max_rows), desc="Caching activations",
               unit="tok", unit_scale=True, disable=not progress)
    while written < max_rows and source.epoch == start_epoch:
        pending.append(source.next_block())
        pending_rows = sum(block[source.sites[0]].shape[0] for block in pending)
        bar.update(pending[-1][source.sites[0]].shape[0])
        is_last = written + pending_rows >= max_rows or source.epoch != start_epoch
        if pending_rows >= rows_per_shard or is_last:
            shard = {name: torch.cat([block[name] for block in pending])[: max_rows - written]
                     for name in pending[0]}
            path = folder / f"{shard_prefix}-{shard_index:06d}.safetensors"
            save_file({site: rows.contiguous().cpu() for site, rows in shard.items()}, str(path))
            written += shard[source.sites[0]].shape[0]
            shard_index, pending = shard_index + 1, []
    bar.close()
    return written, source.epoch != start_epoch


def finish_activation_cache(directory: str | Path, metadata: dict[str, Any]) -> None:
    """Mark a cache complete by writing its `cache_info.json` (what it was built from)."""
    atomic_write_json(Path(directory) / CACHE_INFO_FILE, metadata)


def read_cache_info(directory: str | Path) -> dict[str, Any] | None:
    """The metadata of a complete cache in `directory`, or None if there is none (yet)."""
    path = Path(directory) / CACHE_INFO_FILE
    return read_json(path, fix=_REBUILD + f" ({Path(directory)})") if path.is_file() else None


class CachedActivations:
    """Blocks of a cache written by `write_activation_cache`: one shard per block.

    Shard `i` belongs to process `i % world_size`, so a cache written by any number of processes
    feeds any other number; each process reads its shards in a new seeded order every epoch.
    `hold()` takes the shared lock that keeps the build from being deleted; `close()` frees it.
    """

    def __init__(self, directory: str | Path, sites: list[str], *, rank: int = 0,
                 world_size: int = 1, seed: int = 0) -> None:
        self.directory = Path(directory)
        self.build_id = (read_cache_info(directory) or {}).get("build_id")
        shards = sorted(self.directory.glob("*.safetensors"))
        self.shards = shards[rank::world_size]
        if not self.shards:
            raise ValueError(f"activation cache {directory} has {len(shards)} shards, fewer than "
                             f"the {world_size} processes reading it; rebuild it with more data")
        self.sites = list(sites)
        self.order = EpochOrder(len(self.shards), seed)
        self._reader: ReadWriteLock | None = None

    @property
    def epoch(self) -> int:
        return self.order.epoch

    def next_block(self) -> dict[str, torch.Tensor]:
        path = self.shards[self.order.take(1)[0]]
        shard = load_safetensors(path, fix=f"{_REBUILD} ({self.directory})", required=self.sites)
        return {name: shard[name] for name in [*self.sites, KEEP_ROWS] if name in shard}

    def state_dict(self) -> dict[str, Any]:
        return {**self.order.state_dict(), "build_id": self.build_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("build_id") != self.build_id:
            raise ValueError(
                f"the checkpoint was reading activation cache build {state.get('build_id')}, but "
                f"{self.directory} is build {self.build_id}: the cache was rebuilt or deleted "
                "since, so resuming would train on other activations; restart the run")
        self.order.load_state_dict(state)

    def hold(self) -> CachedActivations:
        """Keep this build from being deleted while it is read (a no-op on read-only folders)."""
        lock = ReadWriteLock(self.directory / "readers.lock", is_singleton=False)
        try:
            lock.acquire_read()
        except (OSError, sqlite3.Error):
            return self
        self._reader = lock
        return self

    def close(self) -> None:
        if self._reader is not None:
            self._reader.release()
            self._reader.close()
            self._reader = None


def cache_folder(root: str | Path, metadata: dict[str, Any]) -> Path:
    """`root/<model>-<hash of metadata>`: one folder per combination of model, data and sites."""
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()[:16]
    model = str(metadata.get("model_name_or_path", "activations")).rstrip("/").split("/")[-1]
    return Path(root) / f"{model}-{digest}"


def complete_builds(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    """`(build folder, its cache_info)` of every complete build in `folder`, largest first."""
    builds = [(build, read_json(build / CACHE_INFO_FILE, fix=f"{_REBUILD} ({build})",
                                required=["rows", "full_pass", "build_id"]))
              for build in sorted(folder.glob(f"{_BUILD_PREFIX}*"))
              if (build / CACHE_INFO_FILE).is_file()]
    return sorted(builds, key=lambda item: (item[1]["full_pass"], item[1]["rows"]), reverse=True)


def find_cache(root: str | Path, metadata: dict[str, Any], sites: list[str], *,
               rows: int) -> Path | None:
    """The largest complete build of `metadata` and `sites` under `root` if it holds `rows` rows
    (or a whole epoch), else None: a cache can be found without loading the model."""
    folder = cache_folder(root, {**metadata, "sites": sorted(sites),
                                 "cache_format": CACHE_FORMAT})
    return _choose_build(folder, rows, None) if folder.is_dir() else None


def open_or_build_cache(source: ModelActivations, root: str | Path, metadata: dict[str, Any],
                        *, max_rows: int, rows_per_shard: int, accelerator: Any, seed: int,
                        build_id: str | None = None) -> CachedActivations:
    """Read the cache of `metadata` under `root`, building it first (one pass of `source`).

    The largest complete build is used when it holds the source's whole epoch or at least
    `max_rows` per process; otherwise a new, bigger build is written beside it and the smaller
    ones are deleted once no reader uses them. `build_id` (from a checkpoint) insists on one
    build, so a resumed run reads exactly what it read before. `accelerator` is an `Accelerator`
    or `PartialState`: every process writes its own shards, the main process marks the build
    complete. The returned cache holds its reader lock until `close()`.
    """
    folder = cache_folder(root, {**metadata, "sites": sorted(source.sites),
                                 "cache_format": CACHE_FORMAT})
    folder.mkdir(parents=True, exist_ok=True)
    build_lock = FileLock(folder / "build.lock")
    if accelerator.is_main_process:
        _acquire_announced(build_lock, folder)
        _remove_unfinished_builds(folder)
    try:
        accelerator.wait_for_everyone()
        world_size = accelerator.num_processes
        build = _choose_build(folder, max_rows * world_size, build_id)
        if build is None:
            build = _build(source, folder, max_rows=max_rows, rows_per_shard=rows_per_shard,
                           accelerator=accelerator, metadata=metadata)
        cache = CachedActivations(build, source.sites, rank=accelerator.process_index,
                                  world_size=world_size, seed=seed).hold()
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _remove_superseded_builds(folder, keep=build)
    finally:
        if build_lock.is_locked:
            build_lock.release()
    return cache


def _acquire_announced(lock: FileLock, folder: Path) -> None:
    """Take `lock`, saying so when another run holds it (it is building this cache)."""
    try:
        lock.acquire(timeout=1)
    except Timeout:
        print(f"Waiting for another run that is building the activation cache {folder} ...",
              flush=True)
        lock.acquire()


def _choose_build(folder: Path, rows: int, build_id: str | None) -> Path | None:
    builds = complete_builds(folder)
    if build_id is not None:
        matching = [build for build, info in builds if info["build_id"] == build_id]
        if not matching:
            raise ValueError(
                f"the checkpoint was reading activation cache build {build_id} in {folder}, which "
                "no longer exists (deleted, or superseded by a bigger build); resuming would "
                "train on other activations: restart the run, or restore that build")
        return matching[0]
    if builds and (builds[0][1]["full_pass"] or builds[0][1]["rows"] >= rows):
        return builds[0][0]
    return None


def _build(source: ModelActivations, folder: Path, *, max_rows: int, rows_per_shard: int,
           accelerator: Any, metadata: dict[str, Any]) -> Path:
    """Write a new complete build of at least `max_rows` rows per process into `folder`."""
    world_size = accelerator.num_processes
    build = folder / f"{_BUILD_PREFIX}{max_rows * world_size}"
    _check_disk_space(source, build, max_rows * world_size)
    rows, full_pass = write_activation_cache(
        source, build, max_rows=max_rows, rows_per_shard=rows_per_shard,
        shard_prefix=f"rank{accelerator.process_index:05d}",
        progress=accelerator.is_main_process)
    totals = reduce(torch.tensor([rows, int(full_pass)], device=accelerator.device), "sum")
    if accelerator.is_main_process:
        finish_activation_cache(build, {
            **metadata, "rows": int(totals[0]), "full_pass": int(totals[1]) == world_size,
            "build_id": uuid.uuid4().hex})
    accelerator.wait_for_everyone()
    return build


def _remove_unfinished_builds(folder: Path) -> None:
    """Builds without `cache_info.json` were cut short (only a lock holder builds): delete."""
    for build in folder.glob(f"{_BUILD_PREFIX}*"):
        if not (build / CACHE_INFO_FILE).is_file():
            shutil.rmtree(build, ignore_errors=True)
    for leftover in folder.glob(".deleting-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _remove_superseded_builds(folder: Path, keep: Path) -> None:
    """Delete the builds smaller than `keep` that no process is reading."""
    builds = complete_builds(folder)
    kept = next(info for build, info in builds if build == keep)
    for build, info in builds:
        if (info["full_pass"], info["rows"]) >= (kept["full_pass"], kept["rows"]):
            continue
        writer = ReadWriteLock(build / "readers.lock", blocking=False, is_singleton=False)
        try:
            writer.acquire_write()
        except (Timeout, OSError, sqlite3.Error):
            continue  # a run is reading it: the next build removes it
        try:
            trash = folder / f".deleting-{build.name}"
            build.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        finally:
            writer.release()
            writer.close()


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
