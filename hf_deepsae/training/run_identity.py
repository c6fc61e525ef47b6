"""Which run a checkpoint or an output folder belongs to, and the command that resumes it.

A run's identity is the settings that determine its result: every `TrainingConfig` and SAE
argument except `RESUMABLE_FIELDS`, plus the number of processes and the identity of the
activations (the model's commit or weight files, the data files, dtype, sites; see
`activations.language_model_identity`). Each checkpoint records them, and so does
`output_dir/training_run.json`, so resuming with other settings, or starting another run in a
used output folder, fails with the fields that differ instead of silently mixing two runs.
`RunPosition` words the messages of a stopped or diverged run: the step, the newest checkpoint,
and the exact command that continues it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ..files import atomic_write_json, read_json
from .checkpointing import (
    NonFiniteStateError,
    checkpoints_folder,
    list_checkpoints,
    remove_unfinished_checkpoints,
)
from .config import SAEArguments, TrainingConfig, parse_args
from .interruption import agreed_flags

RESUMABLE_FIELDS = frozenset({
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "activation_cache_dir",
    "logging_steps", "log_with", "checkpointing_steps", "checkpointing_minutes",
    "save_total_limit", "push_to_hub", "hub_model_id", "lr", "max_grad_norm", "mixed_precision",
    "muon_orthogonalization_dtype", "shard_latents", "distribute_hookpoints", "lm_device_map",
    "ddp_timeout",
})
"""Fields a resumed run may change: where things go, logging and checkpointing, the knobs that
rescue a diverging run (a new `lr` rescales the restored schedule), the precision of the SAE's
arithmetic (a run may resume on a machine whose fast dtypes differ), and where the SAEs and the
model live (every mode trains the same SAEs from the same checkpoint files, so a run that outgrew
DDP may continue latent-sharded; equal up to float rounding, bit-identical only in the same
mode). Everything else, the number of processes included (each continues its own data), decides
what the run computes, so changing it means a new run."""

RUN_RECORD_FILE = "training_run.json"
LOCK_FILE = ".training.lock"
_OUTPUTS_OF_A_RUN = ("checkpoints", "logs", "README.md", RUN_RECORD_FILE)


def run_settings(config: TrainingConfig, sae_kwargs: dict[str, Any], *, num_processes: int,
                 activations: dict[str, Any]) -> dict[str, Any]:
    """The settings that identify a run, as plain JSON values."""
    values = {**dataclasses.asdict(config), **sae_kwargs}
    settings = {name: value for name, value in values.items() if name not in RESUMABLE_FIELDS}
    settings.update(activations_from="model" if config.activation_cache_dir is None else "cache",
                    num_processes=num_processes, activations=activations)
    return json.loads(json.dumps(settings, sort_keys=True))


def run_id(settings: dict[str, Any]) -> str:
    """A short hash of `settings`: equal settings, equal id."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`"field: old → new"` for every setting that differs (nested ones as `a.b.c`)."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    return [f"{name}: {flat_old.get(name, '(absent)')!r} → {flat_new.get(name, '(absent)')!r}"
            for name in sorted(set(flat_old) | set(flat_new))
            if flat_old.get(name) != flat_new.get(name)]


def check_resume(checkpoint: Path, recorded: dict[str, Any], settings: dict[str, Any]) -> None:
    """Refuse to resume `checkpoint` (recorded settings) with different `settings`."""
    changed = differences(recorded, settings)
    if changed:
        raise ValueError(
            f"{checkpoint} belongs to a run with other settings:\n  " + "\n  ".join(changed)
            + f"\nResume with the checkpoint's settings (only {', '.join(sorted(RESUMABLE_FIELDS))}"
            " may change), or start a new run in another --output_dir")


def hold_output_dir(output_dir: Path, accelerator: Any, cleanup: contextlib.ExitStack) -> None:
    """Lock `output_dir` for this run until `cleanup` closes: a second run there fails at once.

    The main process holds the lock; every process raises if it can't be taken.
    """
    error = None
    if accelerator.is_main_process:
        lock = FileLock(output_dir / LOCK_FILE)
        try:
            lock.acquire(timeout=0)
            cleanup.callback(lock.release)
        except Timeout:
            error = ValueError(f"another training run is using output_dir {str(output_dir)!r}; "
                               "wait for it to finish or pick another --output_dir")
    if agreed_flags(accelerator, error is not None)[0]:
        raise error or ValueError(f"the main process could not lock {output_dir}; see its error")


def prepare_output_dir(config: TrainingConfig, output_dir: Path, settings: dict[str, Any],
                       accelerator: Any, resumed: tuple[Path, dict[str, Any]] | None) -> None:
    """Refuse a mismatched resume or another run's output_dir; then record this run there.

    `resumed` is the checkpoint being resumed and its recorded settings. With
    `--overwrite_output_dir`, another run's outputs are deleted first (unless the run resumes from
    a checkpoint inside `output_dir`).
    """
    if resumed is not None:
        check_resume(resumed[0], resumed[1], settings)
    resuming_here = resumed is not None and \
        resumed[0].resolve().parent == checkpoints_folder(output_dir).resolve()
    if not resuming_here and not config.overwrite_output_dir:
        found = previous_run_outputs(output_dir, settings)
        if found:
            raise ValueError(
                f"output_dir {str(output_dir)!r} holds {found[0]}. Resume that run with "
                "--resume_from_checkpoint latest and its settings, pick another --output_dir, or "
                "pass --overwrite_output_dir to delete its outputs")
    if accelerator.is_main_process:
        if not resuming_here and config.overwrite_output_dir:
            _delete_previous_run(output_dir, settings)
        remove_unfinished_checkpoints(output_dir)
        atomic_write_json(output_dir / RUN_RECORD_FILE, {"run_id": run_id(settings),
                                                          "settings": settings})
    accelerator.wait_for_everyone()


def previous_run_outputs(output_dir: Path, settings: dict[str, Any]) -> list[str]:
    """What `output_dir` holds of a run other than the one of `settings` (empty: nothing)."""
    record = output_dir / RUN_RECORD_FILE
    if record.is_file():
        fix = "delete the file, or pass --overwrite_output_dir"
        recorded = read_json(record, fix=fix, required=["run_id", "settings"])
        changed = differences(recorded["settings"], settings)
        return [f"the outputs of another run ({RUN_RECORD_FILE}: {'; '.join(changed[:8])})"] \
            if changed else []
    found = [str(path.relative_to(output_dir)) for path in _saved_saes(output_dir)]
    if checkpoints_folder(output_dir).is_dir() and any(checkpoints_folder(output_dir).iterdir()):
        found.append("checkpoints/")
    return [f"the outputs of an earlier run of unknown settings ({', '.join(found)})"] \
        if found else []


def _delete_previous_run(output_dir: Path, settings: dict[str, Any]) -> None:
    """Delete another run's checkpoints, logs, saved SAEs and card (nothing else)."""
    if not previous_run_outputs(output_dir, settings):
        return
    for path in [*_saved_saes(output_dir), *(output_dir / name for name in _OUTPUTS_OF_A_RUN)]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def resume_command(config: TrainingConfig, sae_kwargs: dict[str, Any], *, num_processes: int,
                   **changes: Any) -> str:
    """The command line that runs `config` with `changes` (e.g. `resume_from_checkpoint=...`).

    Flags for every field that differs from its default, checked by parsing them back; where a
    value has no command-line spelling, a sentence saying what to pass instead.
    """
    values = {**dataclasses.asdict(config), **sae_kwargs, **changes}
    defaults = {**_defaults(TrainingConfig), **_defaults(SAEArguments)}
    flags = [flag for name, value in values.items()
             if name in defaults and value != defaults[name] for flag in _flag(name, value)]
    script = sys.argv[0] if sys.argv[0].endswith(".py") and not sys.argv[0].endswith(
        "__main__.py") else "examples/train.py"
    launcher = ["python"] if num_processes == 1 else [
        "accelerate", "launch", "--multi_gpu", "--num_processes", str(num_processes)]
    if _parses_to(flags, values):
        return shlex.join([*launcher, script, *flags])
    return "the same command with " + " ".join(f"--{name} {value}"
                                               for name, value in changes.items())


@dataclass
class RunPosition:
    """Where a run is (step, checkpoints, settings), for the messages on how to continue it."""

    config: TrainingConfig
    sae_kwargs: dict[str, Any]
    accelerator: Any
    output_dir: Path
    num_steps: int
    step: int = 0
    last_finite_step: int = 0
    settings: dict[str, Any] | None = None
    learning_rate: float = 0.0

    def __post_init__(self) -> None:
        self.last_finite_step = self.step

    def newest_checkpoint(self) -> Path | None:
        checkpoints = list_checkpoints(self.output_dir)
        return checkpoints[-1] if checkpoints else None

    def command(self, **changes: Any) -> str:
        if self.config.mixed_precision is None and self.accelerator.mixed_precision != "no":
            changes.setdefault("mixed_precision", self.accelerator.mixed_precision)
        return resume_command(self.config, self.sae_kwargs,
                              num_processes=self.accelerator.num_processes, **changes)

    def stopped_message(self, saved: Path | None) -> str:
        newest = saved or self.newest_checkpoint()
        head = f"Stopped at step {self.step}/{self.num_steps}"
        if saved is not None:
            head += f"; saved the training state to {saved}"
        if newest is None:
            return f"{head}. No checkpoint yet: run the same command again to start over."
        if saved is None:
            head += f"; the newest checkpoint is {newest}"
        return f"{head}. Resume with:\n  {self.command(resume_from_checkpoint='latest')}"

    def diverged_message(self, error: NonFiniteStateError) -> str:
        names = "; ".join(error.tensors[:3])
        text = (f"{names} became non-finite between steps {self.last_finite_step} and "
                f"{error.step}; lower --lr or --max_grad_norm, or use --mixed_precision no.")
        newest = self.newest_checkpoint()
        if newest is None:
            return text + " No checkpoint was saved; start again with a lower --lr."
        changes = {"resume_from_checkpoint": str(newest), "lr": self.learning_rate / 2}
        return (text + f" Nothing non-finite was saved: the newest checkpoint, {newest}, is "
                f"finite. Resume from it with a lower learning rate:\n  {self.command(**changes)}")


def _flag(name: str, value: Any) -> list[str]:
    if isinstance(value, bool):
        return [f"--{name}", str(value).lower()]
    if value is None:
        return [f"--{name}", "none"]
    if isinstance(value, list | tuple):
        return [f"--{name}", *map(str, value)]
    return [f"--{name}", str(value)]


def _parses_to(flags: list[str], values: dict[str, Any]) -> bool:
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            config, sae_arguments = parse_args(flags)
    except (SystemExit, ValueError):
        return False
    parsed = {**dataclasses.asdict(config), **dataclasses.asdict(sae_arguments)}
    return all(json.dumps(parsed[name]) == json.dumps(value) for name, value in values.items()
               if name in parsed)


def _defaults(config_class: type) -> dict[str, Any]:
    return {field.name: field.default_factory() if field.default_factory is not dataclasses.MISSING
            else field.default for field in dataclasses.fields(config_class)}


def _saved_saes(output_dir: Path) -> list[Path]:
    """Subfolders holding an SAE the trainer saved (a config.json with a training config)."""
    saes = []
    for config in sorted(output_dir.glob("*/config.json")):
        with contextlib.suppress(ValueError, OSError):
            if "training_config" in json.loads(config.read_text()):
                saes.append(config.parent)
    return saes


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and value and all(
            isinstance(item, dict) and "name" in item for item in value):
        items = ((item["name"], item) for item in value)
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat
