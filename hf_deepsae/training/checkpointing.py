"""Atomic, exactly resumable checkpoints that never unpickle a file.

A checkpoint is `output_dir/checkpoints/step_<N>/`:

    trainer_state.json            step, process count, the run's settings; written last (the mark
                                  of a complete checkpoint)
    <hookpoint>/model.safetensors the SAE's weights
    <hookpoint>/optimizer_<i>.*   each optimizer's state_dict   (.json + .safetensors, see
    <hookpoint>/scheduler_<i>.json each lr schedule's state_dict  `state_files`)
    <hookpoint>/dead_latents.*    tokens since each latent fired
    grad_scaler.json              fp16 loss scaling (only with --mixed_precision fp16)
    rng_state_<rank>.*            Python, NumPy, torch and device RNG states of each process
    data_state_<rank>.json        each process's position in the activation stream

Everything is written to `.tmp-step_<N>` first and renamed once every process is done, so a crash
mid-save never leaves a half-written `step_<N>`; old checkpoints are renamed away before they are
deleted, so a kill while pruning leaves none half-deleted either. A checkpoint whose weights or
optimizer state hold NaN/inf is never written (`NonFiniteStateError`), so a diverging run keeps
its last finite checkpoints.

The files are the same however the run spreads its SAEs over processes (`distributed`): the SAEs'
states are gathered to the main process in their ordinary unsharded form, one SAE at a time, and
written there; every process writes its RNG and data position. On resume, each process reads the
SAEs it trains, a latent shard only its own rows (`sharded_state`).
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from ..files import (
    FileFormatError,
    atomic_write_json,
    file_sha256,
    load_safetensors,
    read_json,
    replace_folder,
)
from .dead_latents import DeadLatentCounter
from .sharded_state import optimizer_rows, weight_rows
from .state_files import read_state, write_state

_STEP_FOLDER = re.compile(r"^step_(\d+)$")
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_FORMAT = 2
"""1: accelerate's `save_state` (pickle files, no longer read); 2: safetensors + JSON."""
_TRAINER_STATE_KEYS = ("step", "num_processes", "hookpoints", "run_settings", "files")


class CheckpointedRun(Protocol):
    """What a checkpoint holds of one SAE being trained (the trainer's `SAERun`)."""

    name: str
    sae: torch.nn.Module
    optimizers: list
    schedulers: list
    dead: DeadLatentCounter


class CheckpointedRuns(Protocol):
    """Every SAE of a run, wherever its processes keep them (`distributed.TrainingStates`)."""

    hookpoints: list[str]
    """Every SAE of the run, in order."""
    local: list[CheckpointedRun]
    """The SAEs this process trains (whole, or its latent shards of them)."""

    def nonfinite(self) -> list[str]:
        """Collective: the NaN/inf weights and optimizer states of all processes' SAEs."""
        ...

    def gathered(self) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """Collective: `(hookpoint, whole training state)` per SAE (`sharded_state.run_state`),
        the state on the main process only."""
        ...


class NonFiniteStateError(RuntimeError):
    """The weights or optimizer state hold NaN/inf: the run diverged, nothing was saved."""

    def __init__(self, step: int, tensors: list[str]) -> None:
        self.step, self.tensors = step, tensors
        shown = ", ".join(tensors[:5]) + (f" and {len(tensors) - 5} more" if len(tensors) > 5
                                          else "")
        super().__init__(f"at step {step} the training state holds NaN/inf ({shown})")


def checkpoints_folder(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir` (with their `trainer_state.json`), oldest first."""
    folder = checkpoints_folder(output_dir)
    if not folder.is_dir():
        return []
    steps = [(int(m.group(1)), path) for path in folder.iterdir()
             if (m := _STEP_FOLDER.match(path.name)) and (path / TRAINER_STATE_FILE).is_file()]
    return [path for _, path in sorted(steps)]


def find_checkpoint(output_dir: str | Path, name: str) -> Path:
    """`name` is a checkpoint folder or `"latest"` (newest complete one in `output_dir`)."""
    if name == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise ValueError(f"--resume_from_checkpoint latest: no complete checkpoint in "
                             f"{checkpoints_folder(output_dir)}; start without it")
        return checkpoints[-1]
    path = Path(name)
    if not (path / TRAINER_STATE_FILE).is_file():
        raise ValueError(f"--resume_from_checkpoint {name!r} is not a complete checkpoint folder "
                         f"(no {TRAINER_STATE_FILE}); pass a step_<N> folder or 'latest'")
    return path


def read_trainer_state(path: Path) -> dict[str, Any]:
    """`trainer_state.json` of the checkpoint `path`; refuses the old pickle-based format."""
    state = read_json(path / TRAINER_STATE_FILE, fix=_damaged(path))
    if state.get("format") != CHECKPOINT_FORMAT:
        raise FileFormatError(
            path, f"written in checkpoint format {state.get('format', 1)} (accelerate's pickle "
            f"files, which can run code when loaded); this version reads only format "
            f"{CHECKPOINT_FORMAT}", "start the run again without --resume_from_checkpoint")
    missing = [key for key in _TRAINER_STATE_KEYS if key not in state]
    if missing:
        raise FileFormatError(path / TRAINER_STATE_FILE, f"missing required keys {missing}",
                              _damaged(path))
    return state


def verify_checkpoint(path: Path) -> None:
    """Check every file of checkpoint `path` against the digests recorded when it was saved."""
    recorded = read_trainer_state(path)["files"]
    for name, digest in recorded.items():
        file = path / name
        if not file.is_file():
            raise FileFormatError(file, "the file is missing", _damaged(path))
        if file_sha256(file) != digest:
            raise FileFormatError(file, "its content differs from what was saved (truncated, "
                                  "corrupted or replaced)", _damaged(path))


def read_data_state(path: Path, process_index: int) -> dict[str, Any]:
    """Process `process_index`'s position in the activation stream stored in checkpoint `path`."""
    return read_state(path, f"data_state_{process_index}", fix=_damaged(path))


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int,
                    runs: CheckpointedRuns, data_state: dict[str, Any], *,
                    run_settings: dict[str, Any], save_total_limit: int | None = None) -> Path:
    """Save the full training state of every process as `step_<step>`; returns its path.

    Collective: every process calls it. Raises `NonFiniteStateError` (on every process, before
    writing anything) when a weight or optimizer state holds NaN/inf. Keeps the newest
    `save_total_limit` checkpoints.
    """
    bad = runs.nonfinite()
    if bad:
        raise NonFiniteStateError(step, bad)
    final = checkpoints_folder(output_dir) / f"step_{step}"
    scratch = final.with_name(f".tmp-step_{step}")
    try:
        _write_checkpoint(accelerator, scratch, step, runs, data_state, run_settings)
    except BaseException:  # a full disk, a kill signal: leave no half checkpoint behind
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        replace_folder(scratch, final)
        if save_total_limit:
            for old in list_checkpoints(output_dir)[:-save_total_limit]:
                delete_checkpoint(old)
    accelerator.wait_for_everyone()
    return final


def _write_checkpoint(accelerator: Accelerator, scratch: Path, step: int,
                      runs: CheckpointedRuns, data_state: dict[str, Any],
                      run_settings: dict[str, Any]) -> None:
    """Write every file of a checkpoint into `scratch`, `trainer_state.json` last."""
    if accelerator.is_main_process:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    for hookpoint, state in runs.gathered():
        if state is not None:
            _write_run(scratch / hookpoint, state)
    if accelerator.is_main_process and accelerator.scaler is not None:
        write_state(scratch, "grad_scaler", accelerator.scaler.state_dict())
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    write_state(scratch, f"rng_state_{rank}", _rng_state(accelerator.device))
    write_state(scratch, f"data_state_{rank}", data_state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {str(file.relative_to(scratch)): file_sha256(file)
                 for file in sorted(scratch.rglob("*")) if file.is_file()}
        atomic_write_json(scratch / TRAINER_STATE_FILE, {
            "format": CHECKPOINT_FORMAT, "step": step, "num_processes": accelerator.num_processes,
            "hookpoints": runs.hookpoints, "run_settings": run_settings,
            "files": files})


def open_checkpoint(path: Path) -> dict[str, Any]:
    """The `trainer_state.json` of checkpoint `path`, once every file matches its digest.

    A damaged or altered checkpoint fails here with the file's name, before anything is read
    from it.
    """
    verify_checkpoint(path)
    return read_trainer_state(path)


def load_checkpoint(accelerator: Accelerator, path: Path, runs: CheckpointedRuns,
                    state: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """Restore everything `save_checkpoint` wrote into this process's SAEs (`runs.local`, each
    reading only its rows if it is a latent shard); returns `(step, this process's data state)`.

    `state` is what `open_checkpoint(path)` returned (which verifies every file); without it,
    the checkpoint is opened (and verified) here.
    """
    state = open_checkpoint(path) if state is None else state
    if state["hookpoints"] != runs.hookpoints:
        raise FileFormatError(path, f"holds SAEs for {state['hookpoints']}, not "
                              f"{runs.hookpoints}", _damaged(path))
    for run in runs.local:
        _load_run(accelerator, path, run)
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(read_state(path, "grad_scaler", fix=_damaged(path)))
    rng_state = read_state(path, f"rng_state_{accelerator.process_index}", fix=_damaged(path))
    try:
        _set_rng_state(rng_state, accelerator.device)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise FileFormatError(path / f"rng_state_{accelerator.process_index}.json",
                              f"not a valid RNG state ({error})", _damaged(path)) from None
    return state["step"], read_data_state(path, accelerator.process_index)


def delete_checkpoint(path: Path) -> None:
    """Rename `path` out of `list_checkpoints`' sight, then delete it (a kill leaves no half)."""
    trash = path.with_name(f".deleting-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_unfinished_checkpoints(output_dir: str | Path) -> None:
    """Delete what killed saves and prunes left behind (only while no run uses `output_dir`)."""
    folder = checkpoints_folder(output_dir)
    for leftover in [*folder.glob(".tmp-step_*"), *folder.glob(".deleting-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def _damaged(path: Path) -> str:
    older = ", ".join(p.name for p in list_checkpoints(path.parent) if p != path) or "none"
    return (f"the checkpoint is damaged; resume from an older one (--resume_from_checkpoint "
            f"<folder>; others in {path.parent}: {older}) or start again")


def _write_run(folder: Path, state: dict[str, Any]) -> None:
    """Write one SAE's training state (`sharded_state.run_state`) into `folder`."""
    folder.mkdir()
    save_file({name: value.detach().contiguous().cpu() for name, value in state["model"].items()},
              str(folder / "model.safetensors"))
    for index, optimizer_state in enumerate(state["optimizers"]):
        write_state(folder, f"optimizer_{index}", optimizer_state)
    for index, scheduler_state in enumerate(state["schedulers"]):
        write_state(folder, f"scheduler_{index}", scheduler_state)
    write_state(folder, "dead_latents", state["dead_latents"])


def _load_run(accelerator: Accelerator, path: Path, run: CheckpointedRun) -> None:
    folder, fix = path / run.name, _damaged(path)
    sae = accelerator.unwrap_model(run.sae)
    weights = load_safetensors(folder / "model.safetensors", fix=fix,
                               required=list(sae.state_dict()), rows=weight_rows(sae))
    try:
        sae.load_state_dict(weights)
        for index, optimizer in enumerate(run.optimizers):
            optimizer.load_state_dict(read_state(folder, f"optimizer_{index}", fix=fix,
                                                 rows=optimizer_rows(optimizer, sae)))
        for index, (optimizer, scheduler) in enumerate(zip(run.optimizers, run.schedulers,
                                                           strict=True)):
            schedule = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper
            peak_lrs = list(schedule.base_lrs)
            scheduler.load_state_dict(read_state(folder, f"scheduler_{index}", fix=fix))
            _keep_peak_lrs(optimizer, schedule, peak_lrs)
        run.dead.load_state_dict(read_state(folder, "dead_latents", fix=fix))
    except (KeyError, ValueError, RuntimeError) as error:
        if isinstance(error, FileFormatError):
            raise
        raise FileFormatError(folder, f"does not fit the SAE being trained ({error})",
                              fix) from None


def _keep_peak_lrs(optimizer: Any, schedule: Any, peak_lrs: list[float]) -> None:
    """Rescale a restored schedule to this run's peak learning rates (`--lr` may change on
    resume, e.g. to continue a diverged run from its last finite checkpoint more gently)."""
    if list(schedule.base_lrs) == peak_lrs:
        return
    for group, restored, peak in zip(optimizer.param_groups, list(schedule.base_lrs), peak_lrs,
                                     strict=True):
        if restored != peak:
            group["lr"] *= peak / restored
            group["initial_lr"] = peak
    schedule.base_lrs = peak_lrs
    schedule._last_lr = [group["lr"] for group in optimizer.param_groups]


def _rng_state(device: torch.device) -> dict[str, Any]:
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [name, keys.tolist(), position, has_gauss, cached_gaussian]}
    if device.type != "cpu":
        state["device"] = torch.get_device_module(device.type).get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    random.setstate(state["python"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss,
                         cached_gaussian))
    torch.set_rng_state(state["torch"])
    if device.type != "cpu" and "device" in state:
        torch.get_device_module(device.type).set_rng_state(state["device"])
