"""Sparsity rules (TopK, BatchTopK, JumpReLU, ReLU) and the sparse kernels behind them.

Why custom autograd: a top-k SAE's step is dominated by the dense encoder matmul `[B, d] @ [d, n]`.
Autograd through `topk` would backpropagate a mostly-zero `[B, n]` gradient with two more dense
matmuls; `gather_linear` instead routes the gradient through the k selected latents only, so the
backward costs O(B·k·d). Decoding uses `embedding_bag`, so it costs O(B·k·d) instead of O(B·n·d).
Both backwards are the same two sparse products: a weight gradient `Σ value · row` scattered into
the selected rows (CSR `[n, B] @ [B, d]` after sorting the pairs by latent) and per-pair dot
products `row · weight[latent]` (an SDDMM), never materialising a `[B·k, d]` intermediate.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_deepsae import DeepSAEConfig
from .precision import topk_selection_dtype


class _GatherLinear(torch.autograd.Function):
    """`values[b, j] = h[b] · weight[indices[b, j]] + bias[indices[b, j]]` with a sparse backward.

    The forward reads the already computed dense pre-activations, so it costs one gather. When they
    are of lower precision than the weight (bf16 autocast, or a bf16 GEMM used only to choose the
    latents), the k values are recomputed at the weight's precision instead: an O(B·k·d) SDDMM.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, indices, pre_acts):  # type: ignore[override]
        ctx.save_for_backward(h, weight, indices)
        if pre_acts.dtype == weight.dtype:
            return pre_acts.gather(-1, indices)
        return _row_dots(h, indices, weight) + bias[indices]

    @staticmethod
    def backward(ctx, grad_values):  # type: ignore[override]
        h, weight, indices = ctx.saved_tensors
        grad_h = grad_weight = grad_bias = None
        grad_values = grad_values.to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_h = F.embedding_bag(indices, weight, per_sample_weights=grad_values,
                                     mode="sum").to(h.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = _scatter_outer(indices, grad_values, h, weight.shape[0])
        if ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            grad_bias.index_add_(0, indices.reshape(-1), grad_values.reshape(-1))
        return grad_h, grad_weight, grad_bias, None, None


class _SparseDecode(torch.autograd.Function):
    """`out[b] = Σ_j values[b, j] · weight[indices[b, j]]` with an O(B·k·d) backward.

    `embedding_bag`'s own CPU backward costs ~5x its forward (measured at B=4096, k=32, d=576,
    n=9216); here the weight gradient is the same CSR product as the encoder's and the value
    gradient an SDDMM, together ~4x the forward.
    """

    @staticmethod
    def forward(ctx, values, indices, weight):  # type: ignore[override]
        ctx.save_for_backward(values, indices, weight)
        return F.embedding_bag(indices, weight, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        values, indices, weight = ctx.saved_tensors
        grad_values = grad_weight = None
        grad_out = grad_out.to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_values = _row_dots(grad_out, indices, weight)
        if ctx.needs_input_grad[2]:
            grad_weight = _scatter_outer(indices, values, grad_out, weight.shape[0])
        return grad_values, None, grad_weight


def _row_dots(rows: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`out[b, j] = rows[b] · weight[indices[b, j]]`: a sampled dense-dense product (SDDMM).

    `(rows @ weightᵀ)` evaluated only at the B·k entries of `indices` (sorted per row, as CSR
    wants, then put back in the caller's order); no `[B, k, d]` gather is materialised.
    """
    batch, k = indices.shape
    dtype = torch.promote_types(weight.dtype, torch.float32)
    sorted_indices, order = indices.sort(-1)
    row_starts = torch.arange(0, batch * k + 1, k, device=indices.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(
            row_starts, sorted_indices.reshape(-1), rows.new_zeros(batch * k, dtype=dtype),
            (batch, weight.shape[0]), check_invariants=False,
        )
    dots = torch.sparse.sampled_addmm(pattern, rows.to(dtype), weight.T.to(dtype), beta=0.0)
    return torch.empty_like(order, dtype=weight.dtype).scatter_(
        1, order, dots.values().view(batch, k).to(weight.dtype))


def _scatter_outer(indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor,
                  n_out: int) -> torch.Tensor:
    """`out[i] = Σ_{(b, j): indices[b, j] = i} weights[b, j] · rows[b]`, an `[n_out, d]` matrix.

    The gradient of a weight matrix read through k indices per row. Computed as a CSR
    `[n_out, B] @ [B, d]` product after sorting the B·k pairs by output row, so each output row is
    one sequential sum: no `[B·k, d]` intermediate (sparsify's `index_add_`) and no atomics or
    coalescing (a COO product). Accumulates in at least fp32 (MKL has no bf16 sparse product);
    returns `weights`' dtype.
    """
    batch, k = indices.shape
    dtype = torch.promote_types(weights.dtype, torch.float32)
    flat = indices.reshape(-1)
    order = flat.argsort()
    row_starts = torch.zeros(n_out + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(torch.bincount(flat, minlength=n_out), 0, out=row_starts[1:])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        selection = torch.sparse_csr_tensor(
            row_starts, torch.div(order, k, rounding_mode="floor"),
            weights.reshape(-1)[order].to(dtype), (n_out, batch), check_invariants=False,
        )
    return (selection @ rows.to(dtype)).to(weights.dtype)


def gather_linear(h: torch.Tensor, linear: nn.Linear, indices: torch.Tensor,
                  pre_acts: torch.Tensor) -> torch.Tensor:
    """Values of `linear(h)` at `indices` (shape `[B, m]`), differentiable through them only."""
    return _GatherLinear.apply(h, linear.weight, linear.bias, indices, pre_acts)


def sparse_decode(values: torch.Tensor, indices: torch.Tensor,
                  weight: torch.Tensor) -> torch.Tensor:
    """`Σ_j values[b, j] · weight[indices[b, j]]` for `[B, m]` values/indices: O(B·m·d)."""
    return _SparseDecode.apply(values.to(weight.dtype), indices, weight)


class Workspace:
    """A reused output buffer for a top-k SAE's `[B, n]` pre-activations on CPU.

    The pre-activations are the one large tensor of a top-k step. A fresh `[4096, 9216]` fp32
    tensor every step is a fresh 151 MB mapping from the OS (glibc maps blocks over 32 MB
    directly), whose page faults cost ~90 ms per step, a third of the encoder matmul that writes
    it (measured on 2 cores); writing into the same pages again costs nothing extra. CUDA's caching
    allocator already reuses memory, so only CPU tensors use the buffer. Not copied or pickled
    with its module: it is scratch memory.
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
            ) -> torch.Tensor | None:
        """An uninitialised `shape` tensor over the buffer (grown as needed); None off CPU."""
        if device.type != "cpu":
            return None
        numel = math.prod(shape)
        buffer = self._buffer
        if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
            buffer = self._buffer = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)

    def __getstate__(self) -> dict:
        return {"_buffer": None}

    def __deepcopy__(self, memo: dict) -> Workspace:
        return Workspace()


def selection_pre_acts(hidden: torch.Tensor, linear: nn.Linear, dtype: str | None,
                       workspace: Workspace) -> torch.Tensor:
    """`linear(hidden)` (no gradient) for choosing the top-k latents, written into `workspace`.

    Computed in `dtype` (a torch dtype name) if given, else in autocast's dtype when autocast is
    on, else, for `"auto"`, in the dtype `precision.topk_selection_dtype` picks for the device,
    else in the weight's: `gather_linear` recomputes the chosen values at the weight's precision
    when these are of lower precision, so a bf16 choice halves the matmul that bounds the step
    (where bf16 is fast) without rounding the values, gradients or weights. `hidden` is `[B, d]`.
    """
    weight = linear.weight
    compute_dtype = selection_dtype(dtype, hidden.device, weight.dtype)
    out = workspace.get((hidden.shape[0], weight.shape[0]), compute_dtype, hidden.device)
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        return torch.addmm(linear.bias.to(compute_dtype), hidden.to(compute_dtype),
                           weight.to(compute_dtype).T, out=out)


def selection_dtype(dtype: str | None, device: torch.device, weight_dtype: torch.dtype
                    ) -> torch.dtype:
    """The dtype `selection_pre_acts` chooses latents in, here and now (autocast included)."""
    if dtype not in (None, "auto"):
        return getattr(torch, dtype)
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return topk_selection_dtype(device, weight_dtype) if dtype == "auto" else weight_dtype


def topk_select(pre_acts: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest pre-activations per row, chosen without gradient."""
    with torch.no_grad():
        return pre_acts.topk(k, dim=-1, sorted=False).indices


class TopK(nn.Module):
    """Exactly k active latents per row: ReLU of the k largest pre-activations (Gao et al.).

    Settings are read from the config at every call (here and in the other rules), so a changed
    `sae.config.k` is the k that runs and that `save_pretrained` records.
    """

    def __init__(self, config: DeepSAEConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, h: torch.Tensor, linear: nn.Linear, pre_acts: torch.Tensor):
        indices = topk_select(pre_acts, self.config.k)
        return F.relu(gather_linear(h, linear, indices, pre_acts)), indices


class BatchTopK(nn.Module):
    """k·B active latents over a batch of B rows while training; a learned threshold at inference.

    The threshold is an EMA of the smallest selected activation (Bussmann et al.), stored as a
    buffer so that a loaded SAE encodes single examples independently of their batch. Until it has
    been learned (threshold < 0) inference falls back to per-row top-k.
    """

    def __init__(self, config: DeepSAEConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("threshold", torch.tensor(-1.0))

    def forward(self, h: torch.Tensor, linear: nn.Linear, pre_acts: torch.Tensor):
        acts = F.relu(pre_acts)
        if self.training:
            flat = acts.flatten()
            selected = flat.topk(self.config.k * acts.shape[0], sorted=False)
            mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, selected.indices, True)
            self._update_threshold(selected.values)
            return acts * mask.view_as(acts), None
        if self.threshold < 0:
            indices = topk_select(pre_acts, self.config.k)
            mask = torch.zeros_like(acts, dtype=torch.bool).scatter_(-1, indices, True)
            return acts * mask, None
        return acts * (pre_acts > self.threshold), None

    @torch.no_grad()
    def _update_threshold(self, selected_values: torch.Tensor) -> None:
        positive = selected_values[selected_values > 0]
        if positive.numel() == 0:
            return
        smallest = positive.min().float()
        if self.threshold < 0:
            self.threshold.copy_(smallest)
        else:
            momentum = self.config.batchtopk_threshold_momentum
            self.threshold.mul_(momentum).add_((1 - momentum) * smallest)


class _JumpReLUFunction(torch.autograd.Function):
    """`z · H(z - θ)` with the rectangle-kernel pseudo-derivative for θ (Rajamanoharan et al.)."""

    @staticmethod
    def forward(ctx, pre_acts, threshold, bandwidth):  # type: ignore[override]
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth = bandwidth
        return pre_acts * (pre_acts > threshold)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        pre_acts, threshold = ctx.saved_tensors
        in_window = ((pre_acts - threshold).abs() < ctx.bandwidth / 2).to(grad_output.dtype)
        grad_pre = grad_output * (pre_acts > threshold)
        grad_threshold = -(threshold / ctx.bandwidth) * in_window * grad_output
        return grad_pre, grad_threshold.reshape(-1, threshold.shape[-1]).sum(0), None


class _StepFunction(torch.autograd.Function):
    """Heaviside `H(z - θ)` whose θ-gradient is the same pseudo-derivative: the L0 penalty's."""

    @staticmethod
    def forward(ctx, pre_acts, threshold, bandwidth):  # type: ignore[override]
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth = bandwidth
        return (pre_acts > threshold).to(pre_acts.dtype)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        pre_acts, threshold = ctx.saved_tensors
        in_window = ((pre_acts - threshold).abs() < ctx.bandwidth / 2).to(grad_output.dtype)
        grad_threshold = -(1.0 / ctx.bandwidth) * in_window * grad_output
        return None, grad_threshold.reshape(-1, threshold.shape[-1]).sum(0), None


class JumpReLU(nn.Module):
    """A latent fires when its pre-activation exceeds its own learned threshold `θ_i`."""

    def __init__(self, config: DeepSAEConfig) -> None:
        super().__init__()
        self.config = config
        self.init_threshold = config.jumprelu_init_threshold
        self.threshold = nn.Parameter(torch.full((config.n_latents,), self.init_threshold))

    def forward(self, h: torch.Tensor, linear: nn.Linear, pre_acts: torch.Tensor):
        return _JumpReLUFunction.apply(pre_acts, self.threshold,
                                       self.config.jumprelu_bandwidth), None

    def l0(self, pre_acts: torch.Tensor) -> torch.Tensor:
        """Mean number of active latents per row, differentiable in the thresholds."""
        return _StepFunction.apply(pre_acts, self.threshold,
                                   self.config.jumprelu_bandwidth).sum(-1).mean()


class ReLU(nn.Module):
    """Plain ReLU latents; sparsity comes from the L1 penalty in the loss."""

    def __init__(self, config: DeepSAEConfig) -> None:
        super().__init__()

    def forward(self, h: torch.Tensor, linear: nn.Linear, pre_acts: torch.Tensor):
        return F.relu(pre_acts), None


SPARSITY_CLASSES: dict[str, type[nn.Module]] = {
    "topk": TopK,
    "batchtopk": BatchTopK,
    "jumprelu": JumpReLU,
    "relu": ReLU,
}
