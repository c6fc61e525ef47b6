"""Suite-wide settings and shared fixtures: tests use tiny models, where threads cost more than
they save."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # shared helpers: tiny_models, hub_server


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(folder of a random 2-layer GPT-2 with a word-level tokenizer, its text corpus)."""
    from test_activations import make_tiny_lm, write_corpus

    folder = tmp_path_factory.mktemp("tiny_lm")
    corpus = write_corpus(folder)
    return make_tiny_lm(folder, corpus), corpus


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each `train` must start like a new process, and
    leave none behind, whatever ran before it."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(params=["bf16 fast", "bf16 slow"])
def bf16_is_fast(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Both branches of every precision choice on any machine: `hf_deepsae.precision` told that
    this device's bf16 matmuls are fast (an AVX512-BF16/AMX CPU, an A100), then that they are not
    (an AVX2 CPU, a T4); fp16 counts as slow in both."""
    fast = request.param == "bf16 fast"
    monkeypatch.setenv("HF_DEEPSAE_FAST_BF16", "1" if fast else "0")
    monkeypatch.setenv("HF_DEEPSAE_FAST_FP16", "0")
    return fast
