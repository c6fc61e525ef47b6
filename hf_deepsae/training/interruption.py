"""Stopping cleanly: Ctrl-C and SIGTERM become "checkpoint at the end of this step, then stop".

A signal arriving mid-step (in autograd, in the middle of an all-reduce) must not leave processes
at different steps or a half-written checkpoint, so the handler only records the request; the
training loop asks `agreed_flags` at each step end, where every process learns whether any
process was signalled, and all save the same step together. A second Ctrl-C stops at once
(`KeyboardInterrupt`), for when even one more step is too long. `accelerate launch` answers
Ctrl-C by sending SIGTERM to the script (and SIGKILL 5 s later), SLURM pre-emption sends SIGTERM:
both are handled like the first Ctrl-C.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on a signal; `step` is the last finished step, `checkpoint` the newest
    checkpoint (None if there is none). The trainer has printed how to resume."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"training stopped at step {step}; newest checkpoint: {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class StopRequests:
    """While active (a context manager), SIGINT and SIGTERM set `requested` instead of raising.

    Signal handlers can only be installed from the main thread; elsewhere this does nothing and
    signals keep their usual effect.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True


def agreed_flags(accelerator: Any, *flags: bool) -> list[bool]:
    """Each flag is True on every process if it is True on any (one all-reduce; none alone)."""
    if accelerator.num_processes == 1:
        return list(flags)
    votes = torch.tensor([float(flag) for flag in flags], device=accelerator.device)
    return [vote > 0 for vote in accelerator.reduce(votes, "sum").tolist()]
