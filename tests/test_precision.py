"""`hf_deepsae.precision`: what the device computes fast, and every dtype choice that asks it.

Both branches of every choice run on any machine through the `bf16_is_fast` fixture (which sets
`HF_DEEPSAE_FAST_BF16`); the real probe is checked against itself, and, on an x86 CPU whose flags
claim AVX512-BF16, against oneDNN held to AVX2 (where the flags lie).
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training_e2e import HOOKPOINT, TINY_SAE, tiny_config
from tiny_models import judge_tokenizer, tiny_model
from transformers import AutoModel

from hf_deepsae import DeepSAEConfig, DeepSAEModel, load_language_model, precision
from hf_deepsae.sparsity import selection_dtype
from hf_deepsae.training import train

PRECISION_FILE = Path(precision.__file__)


def test_environment_forces_the_verdict(bf16_is_fast):
    found = precision.device_precision("cpu")
    assert found.fast(torch.bfloat16) is bf16_is_fast
    assert found.bfloat16.decided_by == f"HF_DEEPSAE_FAST_BF16={int(bf16_is_fast)}"
    assert not found.fast(torch.float16) and found.fast(torch.float32)


def test_choices_follow_the_verdict(bf16_is_fast):
    half = torch.bfloat16 if bf16_is_fast else torch.float32
    assert precision.orthogonalization_dtype("cpu") == half
    assert precision.topk_selection_dtype("cpu", torch.float32) == half
    assert precision.mixed_precision("cpu") == ("bf16" if bf16_is_fast else "no")
    assert precision.language_model_dtype(torch.bfloat16, "cpu") == half
    assert precision.language_model_dtype(torch.float32, "cpu") == torch.float32  # never lower
    assert precision.topk_selection_dtype("cpu", torch.float16) == torch.float16  # already half


def test_fp16_is_chosen_for_muon_where_only_fp16_is_fast(monkeypatch):
    monkeypatch.setenv("HF_DEEPSAE_FAST_BF16", "0")
    monkeypatch.setenv("HF_DEEPSAE_FAST_FP16", "1")
    assert precision.orthogonalization_dtype("cpu") == torch.float16
    assert precision.mixed_precision("cpu") == "no"  # fp16 autocast only on request


def test_a_bad_override_is_refused(monkeypatch):
    monkeypatch.setenv("HF_DEEPSAE_FAST_BF16", "yes")
    with pytest.raises(ValueError, match="HF_DEEPSAE_FAST_BF16='yes': set it to 1"):
        precision.device_precision("cpu")


def test_the_probe_decides_on_this_cpu(monkeypatch):
    monkeypatch.delenv("HF_DEEPSAE_FAST_BF16", raising=False)
    monkeypatch.delenv("HF_DEEPSAE_FAST_FP16", raising=False)
    found = precision.device_precision("cpu")
    assert found.name and found.threads == torch.get_num_threads()
    for dtype in precision.HALF_DTYPES:
        support = found.support(dtype)
        if support.decided_by == "isa flags":
            assert support.native is False and not support.fast
        else:
            assert support.decided_by == "probe" and support.speedup > 0
            assert support.fast == (support.speedup >= precision.FAST_SPEEDUP)
    assert "bf16 " in found.summary() and found.as_dict()["device"] == "cpu"


@pytest.mark.slow
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64")
                    or "avx512_bf16" not in precision._cpu_flags(),
                    reason="needs an x86 CPU whose flags claim AVX512-BF16")
def test_the_probe_sees_through_flags_that_claim_native_bf16():
    """oneDNN held to AVX2 runs bf16 GEMMs ~100x slower than fp32 while the flags still say
    avx512_bf16: exactly an AVX2-only CPU's speeds, with flags that lie."""
    script = (
        "import importlib.util, sys, torch\n"
        f"spec = importlib.util.spec_from_file_location('precision', {str(PRECISION_FILE)!r})\n"
        "module = sys.modules['precision'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "support = module.device_precision('cpu').bfloat16\n"
        "print(support.native, support.fast, support.decided_by)\n"
    )
    env = {"ONEDNN_MAX_CPU_ISA": "AVX2", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False", "probe"]


def test_processes_can_adopt_the_main_process_findings(monkeypatch, bf16_is_fast):
    found = precision.device_precision("cpu")
    monkeypatch.delenv("HF_DEEPSAE_FAST_BF16")
    monkeypatch.setattr(precision, "_ADOPTED", {})
    precision.adopt_device_precision("cpu:1", found)  # a DDP rank's name for the one CPU
    assert precision.device_precision("cpu").fast(torch.bfloat16) is bf16_is_fast


@pytest.mark.parametrize(("capability", "bf16", "fp16"), [
    ((7, 5), False, True),  # T4
    ((7, 0), False, True),  # V100
    ((8, 0), True, True),   # A100
    ((6, 1), False, False),  # GTX 10xx: fp16 at 1/64 rate
])
def test_cuda_decides_by_compute_capability(monkeypatch, capability, bf16, fp16):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    measure = precision._measured_support.__wrapped__  # uncached: no real GPU here
    device = torch.device("cuda", 0)
    assert measure(device, torch.bfloat16).fast is bf16
    assert measure(device, torch.float16).fast is fp16
    assert measure(device, torch.bfloat16).decided_by.startswith("cuda capability")


def test_auto_topk_selection_follows_the_policy_and_keeps_fp32_values(bf16_is_fast):
    sae = DeepSAEModel(DeepSAEConfig(d_in=32, n_latents=128, k=4))
    assert sae.config.topk_selection_dtype == "auto"
    expected = torch.bfloat16 if bf16_is_fast else torch.float32
    assert selection_dtype("auto", torch.device("cpu"), torch.float32) == expected
    out = sae(torch.randn(8, 32))
    assert out.latent_acts.dtype == out.reconstruction.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.float16):  # autocast's dtype wins over "auto"
        assert selection_dtype("auto", torch.device("cpu"), torch.float32) == torch.float16


def test_none_chooses_exactly_whatever_the_policy(bf16_is_fast):
    config = DeepSAEConfig(d_in=32, n_latents=128, k=4, topk_selection_dtype="none")
    assert config.topk_selection_dtype is None
    assert selection_dtype(None, torch.device("cpu"), torch.float32) == torch.float32


def test_language_model_auto_keeps_a_bf16_checkpoint_only_where_bf16_is_fast(tmp_path,
                                                                              bf16_is_fast):
    tiny_model("llama", torch.bfloat16).save_pretrained(tmp_path)
    judge_tokenizer().save_pretrained(tmp_path)
    model, _ = load_language_model(str(tmp_path))
    assert model.dtype == (torch.bfloat16 if bf16_is_fast else torch.float32)
    assert load_language_model(str(tmp_path), dtype="bfloat16")[0].dtype == torch.bfloat16


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_training_logs_and_records_every_choice(tiny_lm, tmp_path, capsys, bf16_is_fast):
    train(tiny_config(tiny_lm, tmp_path, total_tokens=64 * 4), TINY_SAE)
    half = "bfloat16" if bf16_is_fast else "float32"
    recorded = AutoModel.from_pretrained(tmp_path / HOOKPOINT).config.training_config
    assert recorded["mixed_precision"] == "auto"
    assert {key: recorded["precision"][key] for key in (
        "mixed_precision", "muon_orthogonalization_dtype", "topk_selection_dtype", "lm_dtype")
    } == {"mixed_precision": "bf16" if bf16_is_fast else "no",
          "muon_orthogonalization_dtype": half, "topk_selection_dtype": half,
          "lm_dtype": "float32"}
    assert f"bf16 {'fast' if bf16_is_fast else 'slow'}" in recorded["precision"]["device"]
    assert capsys.readouterr().out.count("Precision on cpu") == 1
