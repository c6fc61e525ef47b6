"""The one place that knows what a device computes fast, and every dtype choice that follows.

Half-precision matmuls are not faster everywhere. Measured on 2 cores (torch 2.13, GEMM GFLOP/s
fp32 / bf16 / fp16): an AMD EPYC Zen 4 (AVX512-BF16) ~170 / ~375 / -; an Intel Xeon (Sapphire
Rapids under KVM, AVX512-BF16 and AVX512-FP16 but no AMX) 185 / 118 / 197; the same Xeon limited
to AVX2 (`ONEDNN_MAX_CPU_ISA=AVX2`, as on an AVX2-only EPYC) 220 / 1.6 / 1.6: a bf16 path that
is 2x faster on one CPU is 100x slower on another. GPUs without native bf16 (T4, V100) have the
same cliff. So nothing here trusts a flag alone:

- CUDA: the compute capability decides (bf16 from 8.0, fp16 tensor cores from 7.0).
- CPU and other devices: the ISA flags (`torch.cpu.get_capabilities()`, e.g. avx512_bf16,
  amx_bf16, avx512_fp16, amx_fp16) say whether a dtype can be native; when they say it can (or
  don't know), a probe of a few small square matmuls (~0.1 s, once per process and device)
  measures its throughput against fp32, and only a dtype at least `FAST_SPEEDUP` times faster
  counts as fast. The probe has the last word: flags can lie (a hypervisor, a build or
  `ONEDNN_MAX_CPU_ISA` may keep the instructions from being used).
- `HF_DEEPSAE_FAST_BF16=0/1` and `HF_DEEPSAE_FAST_FP16=0/1` force the verdict (tests exercise
  both branches of every choice on any machine that way).

The choices (each overridable where it is configured): `orthogonalization_dtype` (Muon's
Newton-Schulz step), `topk_selection_dtype` (choosing the top-k latents, `DeepSAEConfig`'s
`"auto"`), `mixed_precision` (the SAE's autocast in training), `language_model_dtype` (the frozen
model that produces activations). Fast means at least as fast as fp32 in every one of them.

This file is copied next to saved checkpoints with `sparsity.py` (it resolves `"auto"` where the
SAE runs), so it imports only torch and the standard library.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

FAST_SPEEDUP = 1.5
"""A half dtype counts as fast when its probed GEMM throughput is at least this multiple of
fp32's. Below ~1.7x, bf16 Newton-Schulz (294 GFLOP a step for the default SAE) is no faster than
the fp32 Gram formulation (169 GFLOP); 1.5 separates every CPU class above with a wide margin."""

FORCE_ENVIRONMENT = {torch.bfloat16: "HF_DEEPSAE_FAST_BF16", torch.float16: "HF_DEEPSAE_FAST_FP16"}
HALF_DTYPES = tuple(FORCE_ENVIRONMENT)
NATIVE_CPU_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"),
                    torch.float16: ("avx512_fp16", "amx_fp16", "fphp", "asimdhp")}
"""ISA flags (x86 as `torch.cpu.get_capabilities` names them, ARM as /proc/cpuinfo does) under
which a dtype's matmul can be native; x86 without them only emulates it."""

_PROBE_SIZES = ((256, 2), (512, 5))
"""(matrix size, interleaved timings per dtype) of the probe's two stages."""
_CLEARLY_SLOW = 0.5


@dataclasses.dataclass(frozen=True)
class DtypeSupport:
    """What a device does with one half dtype.

    `native`: the ISA flags or compute capability allow native matmuls (None: unknown).
    `speedup`: probed GEMM throughput relative to fp32 (None: not probed). `fast`: the verdict
    every choice uses. `decided_by`: what set it (probe, isa flags, cuda capability, environment).
    """

    native: bool | None
    speedup: float | None
    fast: bool
    decided_by: str


@dataclasses.dataclass(frozen=True)
class DevicePrecision:
    """A device's half-precision facts: its name, relevant ISA flags, and bf16/fp16 support."""

    device: str
    name: str
    flags: tuple[str, ...]
    threads: int
    bfloat16: DtypeSupport
    float16: DtypeSupport

    def support(self, dtype: torch.dtype) -> DtypeSupport:
        return self.bfloat16 if dtype == torch.bfloat16 else self.float16

    def fast(self, dtype: torch.dtype) -> bool:
        """Whether matmuls in `dtype` run at least as fast as fp32 here (fp32 itself: True)."""
        return dtype not in HALF_DTYPES or self.support(dtype).fast

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line for logs, e.g. `cpu (AMD EPYC 9R14, 2 threads): bf16 fast (probe 2.2x)...`."""
        parts = []
        for label, support in (("bf16", self.bfloat16), ("fp16", self.float16)):
            evidence = support.decided_by
            if support.speedup is not None:
                evidence += f" {support.speedup:.2g}x fp32"
            parts.append(f"{label} {'fast' if support.fast else 'slow'} ({evidence})")
        return f"{self.device} ({self.name}, {self.threads} threads): {', '.join(parts)}"


def device_precision(device: str | torch.device | None = None) -> DevicePrecision:
    """What `device` (default: CPU) computes fast: measured once per process, then cached.

    `HF_DEEPSAE_FAST_BF16`/`HF_DEEPSAE_FAST_FP16` are read on every call and, when set, replace
    the verdict for their dtype (and skip its probe).
    """
    device = _canonical(device)
    adopted = _ADOPTED.get(device)
    supports = {}
    for dtype, variable in FORCE_ENVIRONMENT.items():
        forced = _forced_verdict(variable)
        if forced is not None:
            supports[dtype] = DtypeSupport(None, None, forced, f"{variable}={int(forced)}")
        elif adopted is not None:
            supports[dtype] = adopted.support(dtype)
        else:
            supports[dtype] = _measured_support(device, dtype)
    if adopted is not None:
        return dataclasses.replace(adopted, bfloat16=supports[torch.bfloat16],
                                   float16=supports[torch.float16])
    flags = _cpu_flags() if device.type == "cpu" else ()
    return DevicePrecision(str(device), _device_name(device), flags, torch.get_num_threads(),
                           supports[torch.bfloat16], supports[torch.float16])


def adopt_device_precision(device: str | torch.device | None, found: DevicePrecision) -> None:
    """Make this process answer for `device` as `found` says (instead of measuring).

    Distributed runs call it with their main process's findings: ranks that probed separately
    could disagree on a busy machine, and then step the same weights in different dtypes.
    """
    _ADOPTED[_canonical(device)] = found


_ADOPTED: dict[torch.device, DevicePrecision] = {}


def _canonical(device: str | torch.device | None) -> torch.device:
    device = torch.device("cpu" if device is None else device)
    if device.type == "cpu":  # one CPU, however a launcher numbers it ("cpu:1" under DDP)
        return torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def is_fast(dtype: torch.dtype, device: str | torch.device | None = None) -> bool:
    """Whether `device` computes `dtype` matmuls fast (`device_precision(device).fast(dtype)`,
    without building the report: the top-k selection asks on every forward)."""
    if dtype not in HALF_DTYPES:
        return True
    forced = _forced_verdict(FORCE_ENVIRONMENT[dtype])
    if forced is not None:
        return forced
    device = _canonical(device)
    adopted = _ADOPTED.get(device)
    return (adopted.support(dtype) if adopted else _measured_support(device, dtype)).fast


def orthogonalization_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """Muon's Newton-Schulz dtype: bf16 (as `torch.optim.Muon`) where fast, else fp16 where fast
    (more precise than bf16; the iterate is normalised, so its range suffices), else fp32."""
    return next((dtype for dtype in HALF_DTYPES if is_fast(dtype, device)), torch.float32)


def topk_selection_dtype(device: str | torch.device | None, weight_dtype: torch.dtype
                         ) -> torch.dtype:
    """The dtype to choose top-k latents in, for `DeepSAEConfig(topk_selection_dtype="auto")`:
    bf16 for fp32 weights where bf16 is fast (it has fp32's range; only near-ties at the k-th
    value can be chosen differently), else the weights' own dtype (exact)."""
    if weight_dtype == torch.float32 and is_fast(torch.bfloat16, device):
        return torch.bfloat16
    return weight_dtype


def mixed_precision(device: str | torch.device | None = None) -> str:
    """The SAE's default autocast in training, as accelerate names it: "bf16" where bf16 is fast,
    else "no" (fp16 autocast needs loss scaling and overflows more easily: only on request)."""
    return "bf16" if is_fast(torch.bfloat16, device) else "no"


def language_model_dtype(checkpoint_dtype: torch.dtype,
                         device: str | torch.device | None = None) -> torch.dtype:
    """The frozen language model's dtype for `load_language_model(dtype="auto")`: the
    checkpoint's own, unless that is a half dtype this device computes slowly (then fp32, which
    holds every half value exactly). Never lower than the checkpoint: activations stay as exact."""
    if not is_fast(checkpoint_dtype, device):
        return torch.float32
    return checkpoint_dtype


def _forced_verdict(variable: str) -> bool | None:
    value = os.environ.get(variable, "").strip()
    if not value:
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{variable}={value!r}: set it to 1 (treat as fast), 0 (treat as slow) "
                         "or leave it unset (measure)")
    return value == "1"


@functools.cache
def _measured_support(device: torch.device, dtype: torch.dtype) -> DtypeSupport:
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if torch.version.hip is not None:
            return DtypeSupport(True, None, True, "rocm")
        native = capability >= ((8, 0) if dtype == torch.bfloat16 else (7, 0))
        return DtypeSupport(native, None, native, "cuda capability {}.{}".format(*capability))
    native = _native_on_cpu(dtype, _cpu_flags()) if device.type == "cpu" else None
    if native is False:
        return DtypeSupport(False, None, False, "isa flags")
    speedup = _probe_speedup(device, dtype)
    return DtypeSupport(native, round(speedup, 3), speedup >= FAST_SPEEDUP, "probe")


@functools.cache
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name() if device.type == "cpu" else device.type


def _native_on_cpu(dtype: torch.dtype, flags: tuple[str, ...]) -> bool | None:
    """True/False from the ISA flags on x86 (the flags are complete there); None elsewhere."""
    if any(flag in flags for flag in NATIVE_CPU_FLAGS[dtype]):
        return True
    return False if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686") else None


@functools.cache
def _cpu_flags() -> tuple[str, ...]:
    """The CPU's flags among `NATIVE_CPU_FLAGS` (from torch's cpuinfo, else /proc/cpuinfo)."""
    wanted = {flag for flags in NATIVE_CPU_FLAGS.values() for flag in flags}
    if hasattr(torch.cpu, "get_capabilities"):
        present = {name for name, value in torch.cpu.get_capabilities().items() if value is True}
    else:
        present = set()
    for line in _proc_cpuinfo_lines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            present |= set(line.split(":", 1)[1].split())
            break
    return tuple(sorted(present & wanted))


def _cpu_name() -> str:
    for line in _proc_cpuinfo_lines():
        if line.split(":")[0].strip() == "model name":
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _proc_cpuinfo_lines() -> list[str]:
    path = Path("/proc/cpuinfo")
    return path.read_text(errors="replace").splitlines() if path.is_file() else []


def _probe_speedup(device: torch.device, dtype: torch.dtype) -> float:
    """`dtype`'s square-GEMM throughput over fp32's on `device` (best of interleaved runs).

    A small size first: an emulated dtype is many times slower already there and ends the probe
    (a 256^3 bf16 product takes ~40 ms at AVX2's 0.8 GFLOP/s per core); otherwise 512^3, where
    per-call overheads no longer hide the throughput (it matches 2048^3 and the SAE's shapes within
    ~10% on the CPUs above), decides. On CPU the products run on one thread and are timed in that
    thread's CPU time, so other processes on a busy machine don't skew the ratio (wall-clock
    timings on 2 cores shared by ~10 processes put emulated-slow bf16 at "2.2x fp32").
    """
    on_cpu = device.type == "cpu"
    clock = time.thread_time if on_cpu else time.perf_counter
    threads = torch.get_num_threads()
    speedup = 0.0
    try:
        if on_cpu:
            torch.set_num_threads(1)
        with torch.inference_mode(), torch.autocast(device.type, enabled=False):
            for size, rounds in _PROBE_SIZES:
                base = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
                operands = {d: base.to(device=device, dtype=d) for d in (torch.float32, dtype)}
                for operand in operands.values():
                    _matmul_seconds(operand, clock)  # warm-up: kernel choice, primitive caches
                seconds: dict[torch.dtype, list[float]] = {d: [] for d in operands}
                for _ in range(rounds):  # interleaved, so both see the same machine state
                    for d, operand in operands.items():
                        seconds[d].append(_matmul_seconds(operand, clock))
                speedup = min(seconds[torch.float32]) / min(seconds[dtype])
                if speedup < _CLEARLY_SLOW:
                    break
    finally:
        torch.set_num_threads(threads)
    return speedup


def _matmul_seconds(operand: torch.Tensor, clock: Callable[[], float]) -> float:
    start = clock()
    (operand @ operand)[0, 0].item()  # .item() waits for asynchronous devices
    return clock() - start
