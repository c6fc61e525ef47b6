"""`accelerate launch`'s one-thread default for a lone CPU process is undone; the override wins."""

import os
from types import SimpleNamespace

import pytest
import torch

from hf_deepsae.training.cpu_threads import LAUNCHER_MARK, THREADS_VARIABLE, use_the_cores

CORES = len(os.sched_getaffinity(0))
LONE_CPU_PROCESS = SimpleNamespace(device=torch.device("cpu"), num_processes=1)


@pytest.fixture
def one_thread(monkeypatch):
    """This process as `accelerate launch` starts it without --cpu: OMP_NUM_THREADS=1."""
    before = torch.get_num_threads()
    monkeypatch.delenv(THREADS_VARIABLE, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(LAUNCHER_MARK, "no")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(CORES < 2, reason="needs a machine with two cores or more")
def test_a_lone_launched_cpu_process_gets_every_core_and_says_so(one_thread):
    said = []
    use_the_cores(LONE_CPU_PROCESS, said.append)
    assert torch.get_num_threads() == CORES
    assert f"all {CORES} cores" in said[0] and THREADS_VARIABLE in said[0]


@pytest.mark.parametrize("state", [
    SimpleNamespace(device=torch.device("cpu"), num_processes=2),
    SimpleNamespace(device=torch.device("cuda"), num_processes=1),
], ids=["several-processes-share-the-cores", "gpu"])
def test_other_launches_keep_the_launchers_threads(one_thread, state):
    said = []
    use_the_cores(state, said.append)
    assert torch.get_num_threads() == 1 and not said


def test_a_plain_python_run_is_left_alone(one_thread, monkeypatch):
    monkeypatch.delenv(LAUNCHER_MARK)
    use_the_cores(LONE_CPU_PROCESS, print)
    assert torch.get_num_threads() == 1


def test_the_variable_sets_the_threads_and_rejects_nonsense(one_thread, monkeypatch):
    monkeypatch.setenv(THREADS_VARIABLE, "1")
    use_the_cores(LONE_CPU_PROCESS, print)
    assert torch.get_num_threads() == 1
    monkeypatch.setenv(THREADS_VARIABLE, "two")
    with pytest.raises(ValueError, match="HF_DEEPSAE_CPU_THREADS='two' must be a positive"):
        use_the_cores(LONE_CPU_PROCESS, print)
