"""`Muon`: `torch.optim.Muon` whose Newton-Schulz orthogonalisation runs where it is fast.

`torch.optim.Muon` always orthogonalises in bfloat16. Where bf16 matmuls are not native (AVX2
CPUs, T4/V100 GPUs) that costs ~100x fp32's time: one call on a 4608x1152 gradient took 173 s
instead of 4.4 s on a 2-core AVX2 EPYC, 274 s per step of the default recipe. `Muon` keeps the
algorithm, hyper-parameters and state (a `torch.optim.Muon` checkpoint loads into it and back)
and only lets `hf_deepsae.precision` choose the dtype: bf16 runs `torch.optim.Muon.step` itself;
fp16 the same iteration in fp16; fp32 `newton_schulz_gram`, the same polynomial at fewer flops.

Cost of one default-recipe step's orthogonalisation (deep SAE: two 4608x1152 and two 1152x576
matrices): 294 GFLOP for the direct iteration, 169 GFLOP for the Gram formulation in fp32
(0.5-0.7 s on 2 Xeon cores at ~250-300 GFLOP/s).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .. import precision

_GRAM_MIN_ASPECT = 1.5
"""The Gram formulation costs 4m²n + 34m³ flops against the direct iteration's 20m²n + 10m³
(m ≤ n the sides, 5 steps): cheaper once n > 1.5m."""


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` with the orthogonalisation in `orthogonalization_dtype`.

    Args:
        params, lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps,
            adjust_lr_fn: as `torch.optim.Muon` (same defaults, same meaning).
        orthogonalization_dtype (`torch.dtype` or `str`, *optional*): `"bfloat16"` (exactly
            `torch.optim.Muon`), `"float16"` or `"float32"`; None or `"auto"` asks
            `hf_deepsae.precision.orthogonalization_dtype` for each parameter's device at every
            step (a resumed run adapts to the machine it resumes on). Not part of the state dict.
    """

    def __init__(self, params: Any, *, orthogonalization_dtype: torch.dtype | str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        if orthogonalization_dtype in ("auto", None):
            self.orthogonalization_dtype = None
        else:
            dtype = (getattr(torch, orthogonalization_dtype, None)
                     if isinstance(orthogonalization_dtype, str) else orthogonalization_dtype)
            if dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"orthogonalization_dtype={orthogonalization_dtype!r}: choose "
                                 "auto, float32, bfloat16 or float16")
            self.orthogonalization_dtype = dtype

    def dtype_for(self, param: torch.Tensor) -> torch.dtype:
        """The dtype `param`'s update is orthogonalised in."""
        if self.orthogonalization_dtype is not None:
            return self.orthogonalization_dtype
        return precision.orthogonalization_dtype(param.device)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if all(self.dtype_for(p) == torch.bfloat16 for p in params):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, momentum_buffers = [], [], []
            self._init_group(group, params, grads, momentum_buffers)
            for param, grad, buffer in zip(params, grads, momentum_buffers, strict=True):
                buffer.lerp_(grad, 1 - group["momentum"])
                update = grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
                update = orthogonalize(update, self.dtype_for(param), group["ns_coefficients"],
                                       group["ns_steps"], group["eps"])
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update.to(param.dtype),
                           alpha=-adjusted_lr(group["lr"], group["adjust_lr_fn"], param.shape))
        return loss


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """`torch.optim.Muon`'s per-matrix learning rate: Keller Jordan's `sqrt(max(1, A/B))`
    ("original", the default) or Moonshot's `0.2·sqrt(max(A, B))` ("match_rms_adamw")."""
    rows, columns = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / columns))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, columns))
    return lr


def orthogonalize(update: torch.Tensor, dtype: torch.dtype,
                  coefficients: tuple[float, float, float], steps: int, eps: float
                  ) -> torch.Tensor:
    """`steps` quintic Newton-Schulz steps on `update` (2-D) in `dtype`; the result in `dtype`.

    The direct iteration `X ← aX + (bA + cA²)X`, `A = XXᵀ` on the short side, as
    `torch.optim.Muon`; in fp32, for matrices more than 1.5x as long as wide, the same polynomial
    through the Gram matrix (`newton_schulz_gram`).
    """
    if update.ndim != 2:
        raise ValueError(f"Muon orthogonalises 2-D updates, got shape {tuple(update.shape)}")
    short, long = sorted(update.shape)
    if dtype == torch.float32 and long >= _GRAM_MIN_ASPECT * short:
        return newton_schulz_gram(update, coefficients, steps, eps)
    a, b, c = coefficients
    x = update.to(dtype)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if transposed else x


def newton_schulz_gram(update: torch.Tensor, coefficients: tuple[float, float, float],
                       steps: int, eps: float) -> torch.Tensor:
    """The Newton-Schulz polynomial of `update` computed on its m×m Gram matrix (fp32).

    Each step multiplies the iterate by `Q = aI + bA + cA²` (A its Gram matrix), so after k
    steps `X_k = R_k X_0` with `R_k = Q_k ⋯ Q_1` and `A_{k+1} = Q_k A_k Q_k`: polynomials in
    `A_0`, which commute. Only the first Gram matrix and the final `R X_0` touch the long side
    (4m²n flops), the steps cost 34m³ in all. Exact arithmetic gives the direct iteration's
    result; fp32 rounding differs from it by ~1e-4 relative (bf16's `torch.optim.Muon`: ~1e-2).
    """
    a, b, c = coefficients
    x = update.float()
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    gram = x @ x.T
    accumulated = None
    for step in range(steps):
        q = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        q.diagonal().add_(a)
        accumulated = q if accumulated is None else q @ accumulated
        if step < steps - 1:
            gram = q @ gram @ q
    x = x if accumulated is None else accumulated @ x
    return x.T if transposed else x
