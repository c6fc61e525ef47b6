"""Run several `train` scenarios one after the other in each process of one launch.

    accelerate launch --multi_gpu --num_processes N ... tests/distributed_driver.py SCENARIOS.json

Launching processes is the slow part of a multi-process test, so one launch serves many
scenarios. `SCENARIOS.json` holds `{"output_root": ..., "base": {TrainingConfig fields},
"sae": {SAE overrides}, "scenarios": [...]}`; each scenario has a `name` and optional `config`
and `sae` overrides, `config_on_rank` (`{rank: overrides}`, to make processes disagree),
`raise_on_rank` (`[rank, step]`: that process raises `InjectedFailure` during that step),
`signal_on_rank` (`[rank, step]`: that process sends itself SIGTERM during that step),
`output_of` (train in that scenario's output_dir instead of its own) and `plant_pickles`
(`[checkpoint, copy]`: the main process copies that checkpoint, relative to `output_root`, and
plants pickle files in the copy that would create `<copy>.unpickled` if loaded). Each process
writes `<output_root>/<name>/outcome_<rank>.json` (`"ok"`, `"TrainingInterrupted"` or the error
it ended with); the main process also writes `logs.json` (every `accelerator.log` call). A
scenario that fails ends the launch (its process group is gone): failing scenarios come last.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

import hf_deepsae.training.trainer as trainer_module
from hf_deepsae.training import TrainingConfig, TrainingInterrupted, train

PICKLE_NAMES = ("custom_checkpoint_0.pkl", "optimizer.bin", "scheduler.bin",
                "random_states_0.pkl", "random_states_1.pkl", "pytorch_model.bin",
                "data_state_0.pt")
"""What accelerate's `save_state` writes (and loads by unpickling)."""


class InjectedFailure(RuntimeError):
    """The failure a scenario asks one process to raise."""


class Payload:
    """Unpickling it creates `marker`: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant_pickles(root: Path, checkpoint: str, copy: str) -> None:
    """Copy `checkpoint` to `copy` and put accelerate-named pickle files in it, beside and in
    each SAE's folder."""
    target = root / copy
    shutil.copytree(root / checkpoint, target)
    payload = Payload(target.with_name(f"{target.name}.unpickled"))
    for folder in [target, *(path for path in target.iterdir() if path.is_dir())]:
        for name in PICKLE_NAMES:
            torch.save(payload, folder / name)


def run_scenario(scenario: dict, spec: dict, rank: int) -> None:
    root = Path(spec["output_root"])
    folder = root / scenario["name"]
    folder.mkdir(parents=True, exist_ok=True)
    values = {**spec["base"], **scenario.get("config", {}),
              **scenario.get("config_on_rank", {}).get(str(rank), {}),
              "output_dir": str(root / scenario.get("output_of", scenario["name"]) / "out")}
    if "plant_pickles" in scenario and rank == 0:
        plant_pickles(root, *scenario["plant_pickles"])
    logs: list[dict] = []
    real_log, real_step = Accelerator.log, trainer_module.std_coefficient_at
    failure, stop = scenario.get("raise_on_rank"), scenario.get("signal_on_rank")

    def record(self, values, step=None, log_kwargs=None):
        logs.append({"step": step, **values})
        return real_log(self, values, step=step, log_kwargs=log_kwargs)

    def coefficient_or_failure(coefficient, schedule, step, num_steps):
        if failure and failure[0] == rank and step == failure[1]:
            raise InjectedFailure(f"injected failure at step {step}")
        if stop and stop[0] == rank and step == stop[1]:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(coefficient, schedule, step, num_steps)

    Accelerator.log = record
    trainer_module.std_coefficient_at = coefficient_or_failure
    try:
        train(TrainingConfig(**values), {**spec["sae"], **scenario.get("sae", {})})
        outcome = {"outcome": "ok"}
    except TrainingInterrupted as stopped:  # every process stopped and saved: the launch goes on
        outcome = {"outcome": "TrainingInterrupted", "step": stopped.step,
                   "checkpoint": str(stopped.checkpoint)}
    except Exception as error:  # recorded for the test, then the launch ends
        outcome = {"outcome": type(error).__name__, "message": str(error)}
    finally:
        Accelerator.log, trainer_module.std_coefficient_at = real_log, real_step
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    (folder / f"outcome_{rank}.json").write_text(json.dumps(outcome))
    if logs:
        (folder / "logs.json").write_text(json.dumps(logs))
    if outcome["outcome"] not in ("ok", "TrainingInterrupted"):
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        deadline = time.monotonic() + 60  # let every process report before the launcher reaps
        while time.monotonic() < deadline and len(list(folder.glob("outcome_*.json"))) < world_size:
            time.sleep(0.1)
        sys.exit(1)


def finish_trackers_only(self: Accelerator) -> None:
    """`end_training` without destroying the process group, which the next scenario reuses (a
    process group can't be re-created from the launcher's store)."""
    for tracker in self.trackers:
        tracker.finish()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ.get("RANK", 0))
    Accelerator.end_training = finish_trackers_only
    for scenario in spec["scenarios"]:
        run_scenario(scenario, spec, rank)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
