"""Sparsity rules (TopK, BatchTopK, JumpReLU, ReLU) and the sparse kernels behind them.

Why custom autograd: a top-k SAE's step is dominated by the dense encoder matmul `[B, d] @ [d, n]`.
Autograd through `topk` would backpropagate a mostly-zero `[B, n]` gradient with two more dense
matmuls; `gather_linear` instead routes the gradient through the k selected latents only, so the
backward costs O(B·k·d). Decoding uses `embedding_bag`, so it costs O(B·k·d) instead of O(B·n·d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_deepsae import DeepSAEConfig


class _GatherLinear(torch.autograd.Function):
    """`values[b, j] = h[b] · weight[indices[b, j]] + bias[indices[b, j]]` with a sparse backward.

    The forward reads the already computed dense pre-activations, so it costs one gather.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, indices, pre_acts):  # type: ignore[override]
        ctx.save_for_backward(h, weight, indices)
        return pre_acts.gather(-1, indices)

    @staticmethod
    def backward(ctx, grad_values):  # type: ignore[override]
        h, weight, indices = ctx.saved_tensors
        grad_h = grad_weight = grad_bias = None
        grad_values = grad_values.to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_h = F.embedding_bag(indices, weight, per_sample_weights=grad_values, mode="sum")
        flat_indices = indices.reshape(-1)
        if ctx.needs_input_grad[1]:
            grad_weight = _scatter_outer(flat_indices, grad_values, h, weight.shape[0])
        if ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            grad_bias.index_add_(0, flat_indices, grad_values.reshape(-1))
        return grad_h, grad_weight, grad_bias, None, None


def _scatter_outer(flat_indices: torch.Tensor, grad_values: torch.Tensor, h: torch.Tensor,
                   n_rows: int) -> torch.Tensor:
    """`Σ_{b,j} grad_values[b,j] · h[b]` added into row `indices[b,j]` of an `[n_rows, d]` matrix.

    Written as a sparse `[n_rows, B] @ [B, d]` product: only the B·k selected (row, latent) pairs
    are touched.
    """
    batch, k = grad_values.shape
    rows = torch.arange(batch, device=h.device).repeat_interleave(k)
    selection = torch.sparse_coo_tensor(
        torch.stack([flat_indices, rows]), grad_values.reshape(-1), (n_rows, batch),
        check_invariants=False,
    )
    return torch.sparse.mm(selection, h.to(grad_values.dtype)).to(h.dtype)


def gather_linear(h: torch.Tensor, linear: nn.Linear, indices: torch.Tensor,
                  pre_acts: torch.Tensor) -> torch.Tensor:
    """Values of `linear(h)` at `indices` (shape `[B, m]`), differentiable through them only."""
    return _GatherLinear.apply(h, linear.weight, linear.bias, indices, pre_acts)


def sparse_decode(values: torch.Tensor, indices: torch.Tensor,
                  weight: torch.Tensor) -> torch.Tensor:
    """`Σ_j values[b, j] · weight[indices[b, j]]` for `[B, m]` values/indices: O(B·m·d)."""
    return F.embedding_bag(indices, weight, per_sample_weights=values.to(weight.dtype), mode="sum")


def topk_select(pre_acts: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest pre-activations per row, chosen without gradient."""
    with torch.no_grad():
        return pre_acts.topk(k, dim=-1, sorted=False).indices


class TopK(nn.Module):
    """Exactly k active latents per row: ReLU of the k largest pre-activations (Gao et al.)."""

    def __init__(self, config: DeepSAEConfig) -> None:
        super().__init__()
        self.k = config.k

    def forward(self, h: torch.Tensor, linear: nn.Linear, pre_acts: torch.Tensor):
        indices = topk_select(pre_acts, self.k)
        return F.relu(gather_linear(h, linear, indices, pre_acts)), indices


class BatchTopK(nn.Module):
    """k·B active latents over a batch of B rows while training; a learned threshold at inference.

    The threshold is an EMA of the smallest selected activation (Bussmann et al.), stored as a
    buffer so that a loaded SAE encodes single examples independently of their batch. Until it has
    been learned (threshold < 0) inference falls back to per-row top-k.
    """

    def __init__(self, config: DeepSAEConfig) -> None:
        super().__init__()
        self.k = config.k
        self.momentum = config.batchtopk_threshold_momentum
        self.register_buffer("threshold", torch.tensor(-1.0))

    def forward(self, h: torch.Tensor, linear: nn.Linear, pre_acts: torch.Tensor):
        acts = F.relu(pre_acts)
        if self.training:
            flat = acts.flatten()
            selected = flat.topk(self.k * acts.shape[0], sorted=False)
            mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, selected.indices, True)
            self._update_threshold(selected.values)
            return acts * mask.view_as(acts), None
        if self.threshold < 0:
            indices = topk_select(pre_acts, self.k)
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
            self.threshold.mul_(self.momentum).add_((1 - self.momentum) * smallest)


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
        self.bandwidth = config.jumprelu_bandwidth
        self.init_threshold = config.jumprelu_init_threshold
        self.threshold = nn.Parameter(torch.full((config.n_latents,), self.init_threshold))

    def forward(self, h: torch.Tensor, linear: nn.Linear, pre_acts: torch.Tensor):
        return _JumpReLUFunction.apply(pre_acts, self.threshold, self.bandwidth), None

    def l0(self, pre_acts: torch.Tensor) -> torch.Tensor:
        """Mean number of active latents per row, differentiable in the thresholds."""
        return _StepFunction.apply(pre_acts, self.threshold, self.bandwidth).sum(-1).mean()


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
