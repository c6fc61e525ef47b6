"""No silent hangs: multi-process runs fail together, each process saying why.

A process group hangs when its processes stop doing the same collectives: one raised, one runs
another config, one resumed another step. Three guards:

- `process_group_kwargs`: a timeout on every collective (`--ddp_timeout`, as in `transformers`),
  the last resort when a process stops answering without dying.
- `check_same_on_every_process`: values that must agree (the config, the resumed step) are
  gathered and compared, and every process raises the same error naming what differs where.
- `fail_together`: a process that raises publishes its error in the process group's key-value
  store and closes its connections, so peers waiting in a collective fail at once (instead of at
  the timeout) and re-raise the first failure's reason. That is immediate with gloo; NCCL peers
  may wait for the timeout (its watchdog then aborts them) unless the launcher (`accelerate
  launch`/torchrun stop every worker once one exits with an error) is quicker.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import traceback
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, gather_object

from .interruption import TrainingInterrupted

_FAILURE_KEY = "hf_deepsae/failed/{rank}"


class PeerProcessFailed(RuntimeError):
    """Another process of the run raised; this one stops with that process's reason."""


def process_group_kwargs(timeout_s: int) -> InitProcessGroupKwargs:
    """Accelerate's process-group settings with a `timeout_s` limit on every collective."""
    return InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=timeout_s))


def check_same_on_every_process(accelerator: Accelerator, what: str,
                                values: dict[str, Any]) -> None:
    """Raise on every process unless all processes hold equal `values` (JSON-able).

    The error names the first differing entries and the processes that disagree with the main
    process, so a mistyped flag on one node is found from any node's log.
    """
    if accelerator.num_processes == 1:
        return
    canonical = json.loads(json.dumps(values, sort_keys=True, default=str))
    everyone = gather_object([canonical])
    differing = {rank: sorted(key for key in set(mine) | set(everyone[0])
                              if mine.get(key) != everyone[0].get(key))
                 for rank, mine in enumerate(everyone) if mine != everyone[0]}
    if differing:
        rank, keys = next(iter(differing.items()))
        details = ", ".join(f"{key}: {everyone[0].get(key)!r} on process 0 but "
                            f"{everyone[rank].get(key)!r} on process {rank}" for key in keys[:5])
        raise ValueError(f"the processes disagree on {what} (processes {sorted(differing)} differ "
                         f"from process 0; {details}); launch every process with the same "
                         "arguments and files")


@contextlib.contextmanager
def fail_together(accelerator: Accelerator) -> Iterator[None]:
    """Run a multi-process body so that one process's exception stops all of them promptly.

    The first process to raise stores its error and closes its connections; a peer that then
    fails in a collective raises `PeerProcessFailed` with the stored reason. A no-op with one
    process. `TrainingInterrupted` is no failure: every process raises it at the same step, once
    the checkpoint is saved; the training ends (trackers, process group) as after the last step.
    """
    try:
        yield
    except TrainingInterrupted:  # every process stopped at the same step, after saving together
        accelerator.end_training()
        raise
    except BaseException as error:
        if accelerator.num_processes == 1 or not dist.is_initialized():
            raise
        peer_failure = _published_failure(accelerator.num_processes, accelerator.process_index)
        if peer_failure is None:
            _publish_failure(accelerator.process_index, error)
        with contextlib.suppress(Exception):  # never mask the error that brought us here
            dist.destroy_process_group()
        if peer_failure is not None:
            raise PeerProcessFailed(peer_failure) from error
        raise


def _store() -> dist.Store | None:
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):
        return None


def _publish_failure(rank: int, error: BaseException) -> None:
    store = _store()
    if store is None:
        return
    where = traceback.extract_tb(error.__traceback__)[-1:] if error.__traceback__ else []
    location = f" at {where[0].filename}:{where[0].lineno}" if where else ""
    with contextlib.suppress(Exception):  # the store may be gone with a dead main process
        store.set(_FAILURE_KEY.format(rank=rank),
                  f"{type(error).__name__}: {error}{location}")


def _published_failure(world_size: int, my_rank: int) -> str | None:
    """`process r failed: <reason>` for the first peer that published a failure, if any."""
    store = _store()
    if store is None:
        return None
    for rank in range(world_size):
        key = _FAILURE_KEY.format(rank=rank)
        if rank == my_rank:
            continue
        with contextlib.suppress(Exception):
            if store.check([key]):
                return f"process {rank} failed: {store.get(key).decode()}"
    return None
