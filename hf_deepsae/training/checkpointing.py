"""Atomic, exactly resumable checkpoints on top of `accelerator.save_state`.

A checkpoint is `output_dir/checkpoints/step_<N>/`: accelerate's files (SAE weights, optimizer and
scheduler states, RNG states of every process, registered objects such as the dead-latent
counters) plus `trainer_state.json` (step, process count) and one `data_state_<rank>.pt` per
process (its position in the activation stream). Everything is written to a hidden temporary
folder first and renamed with `os.replace` once every process is done, so a crash mid-save never
leaves a half-written `step_<N>` that a later `--resume_from_checkpoint latest` would pick.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

_STEP_FOLDER = re.compile(r"^step_(\d+)$")
TRAINER_STATE_FILE = "trainer_state.json"


def checkpoints_folder(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    folder = checkpoints_folder(output_dir)
    if not folder.is_dir():
        return []
    steps = [(int(m.group(1)), path) for path in folder.iterdir()
             if path.is_dir() and (m := _STEP_FOLDER.match(path.name))]
    return [path for _, path in sorted(steps)]


def find_checkpoint(output_dir: str | Path, name: str) -> Path:
    """`name` is a checkpoint folder or `"latest"` (newest in `output_dir/checkpoints`)."""
    if name == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise ValueError(f"--resume_from_checkpoint latest: no checkpoint in "
                             f"{checkpoints_folder(output_dir)}")
        return checkpoints[-1]
    path = Path(name)
    if not (path / TRAINER_STATE_FILE).is_file():
        raise ValueError(f"--resume_from_checkpoint {name!r} is not a checkpoint folder (no "
                         f"{TRAINER_STATE_FILE}); pass a step_<N> folder or 'latest'")
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int,
                    data_state: dict[str, Any], save_total_limit: int | None) -> Path:
    """Save the full training state of every process as `step_<step>`; returns its path."""
    final = checkpoints_folder(output_dir) / f"step_{step}"
    scratch = final.with_name(f".tmp-step_{step}")
    if accelerator.is_main_process and scratch.exists():
        shutil.rmtree(scratch)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(scratch))
    torch.save(data_state, scratch / f"data_state_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        state = {"step": step, "num_processes": accelerator.num_processes}
        (scratch / TRAINER_STATE_FILE).write_text(json.dumps(state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(scratch, final)
        if save_total_limit:
            for old in list_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> tuple[int, dict[str, Any]]:
    """Restore everything `save_checkpoint` wrote; returns `(step, this process's data state)`."""
    state = json.loads((path / TRAINER_STATE_FILE).read_text())
    if state["num_processes"] != accelerator.num_processes:
        raise ValueError(
            f"{path} was written by {state['num_processes']} processes; resume it with the same "
            f"number (now {accelerator.num_processes}) so every process continues its own data"
        )
    accelerator.load_state(str(path))
    data_state = torch.load(path / f"data_state_{accelerator.process_index}.pt", weights_only=True)
    return state["step"], data_state
