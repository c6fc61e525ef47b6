"""How many CPU threads a training process computes with.

`accelerate launch` hands every process `OMP_NUM_THREADS=num_cpu_threads_per_process`, and
without `--cpu` or `--num_cpu_threads_per_process` that is 1, also on a CPU-only machine where
the one process it starts could use every core: the README's main command then trains on one of
two cores and takes about twice as long. `use_the_cores` undoes that default for a lone CPU
process; several processes on one machine keep what the launcher gave each (they share the
cores), and `HF_DEEPSAE_CPU_THREADS` sets the number outright.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from accelerate import PartialState

THREADS_VARIABLE = "HF_DEEPSAE_CPU_THREADS"
LAUNCHER_MARK = "ACCELERATE_DYNAMO_BACKEND"
"""Set by `accelerate launch` for every process it starts (never by a plain `python` run)."""


def use_the_cores(state: PartialState, report: Callable[[str], None]) -> None:
    """Give this process the machine's cores where `accelerate launch` left a lone CPU process
    one thread; obey `HF_DEEPSAE_CPU_THREADS` wherever it is set."""
    chosen = os.environ.get(THREADS_VARIABLE)
    if chosen is not None:
        if not chosen.isdigit() or int(chosen) < 1:
            raise ValueError(f"{THREADS_VARIABLE}={chosen!r} must be a positive number of threads")
        torch.set_num_threads(int(chosen))
        return
    launched_with_one_thread = LAUNCHER_MARK in os.environ and \
        os.environ.get("OMP_NUM_THREADS") == "1" and torch.get_num_threads() == 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if state.device.type != "cpu" or state.num_processes != 1 or not launched_with_one_thread \
            or not cores or cores == 1:
        return
    torch.set_num_threads(cores)
    report(f"accelerate launch gave this lone CPU process 1 thread (its default without --cpu); "
           f"training on all {cores} cores instead ({THREADS_VARIABLE}=1 keeps one)")
