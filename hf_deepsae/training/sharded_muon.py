"""Muon on latent-sharded matrices: the update of the full matrix, not of each shard.

Muon orthogonalises a matrix's whole update (Newton-Schulz iterations towards `UVᵀ`).
Orthogonalising each row-shard by itself would be a different optimizer: W shards of a
`[n, d]` update would each be pushed to orthonormal columns, so the update's scale and directions
would change with the number of processes. `ShardedMuon` keeps Muon's semantics instead, exactly
and without gathering the matrix: an SAE's sharded matrices are tall (`n_latents > d`), and
`torch.optim.Muon` iterates on their `[d, n]` transpose, whose Gram matrix `X Xᵀ` (`[d, d]`) is a
sum over latents. Each iteration all-reduces that `d × d` Gram (plus the Frobenius norm once), and
every other product acts on this shard's own columns. Cost: `ns_steps + 1` all-reduces of `d²`
floats per matrix per step, instead of moving `n·d`. The learning-rate adjustment uses the full
shape. Replicated (unsharded) matrices take `Muon`'s own orthogonalisation; both iterate in the
dtype `Muon.dtype_for` picks (fp32 where this device's bf16 matmuls are slow).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .latent_sharding import LatentShard, identical_sum
from .muon import Muon, adjusted_lr, orthogonalize


class ShardedMuon(Muon):
    """`Muon` (same arguments, state and `state_dict`) where some parameters are row shards:
    `row_shards` maps each such parameter to its `LatentShard`.

    `orthogonalized` is the one place that turns a momentum update into Muon's direction, in
    the dtype `dtype_for` picks, for sharded and replicated matrices alike.
    """

    def __init__(self, params: Any, *, row_shards: dict[torch.Tensor, LatentShard],
                 **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.row_shards = row_shards

    def orthogonalized(self, update: torch.Tensor, param: torch.Tensor, group: dict[str, Any]
                       ) -> torch.Tensor:
        """Muon's orthogonalised `update` of `param`: of the whole matrix, this shard's rows."""
        options = (group["ns_coefficients"], group["ns_steps"], group["eps"])
        dtype = self.dtype_for(param)

        def whole(matrix: torch.Tensor) -> torch.Tensor:
            return orthogonalize(matrix, dtype, *options)

        shard = self.row_shards.get(param)
        if shard is None:
            return whole(update)
        return sharded_newton_schulz(update, shard, dtype, *options, whole=whole)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One Muon step: the arithmetic of `Muon` with a sharded orthogonalisation."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - momentum)
                update = param.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                shard = self.row_shards.get(param)
                shape = param.shape if shard is None else \
                    torch.Size((shard.n_latents, *param.shape[1:]))
                update = self.orthogonalized(update, param, group)
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update.to(param.dtype),
                           alpha=-adjusted_lr(lr, group["adjust_lr_fn"], shape))
        return loss


def sharded_newton_schulz(rows: torch.Tensor, shard: LatentShard, dtype: torch.dtype,
                          ns_coefficients: tuple[float, float, float], ns_steps: int,
                          eps: float, *, whole: Callable[[torch.Tensor], torch.Tensor]
                          ) -> torch.Tensor:
    """This shard's rows of `whole(full matrix)`, the Newton-Schulz orthogonalisation, for
    `[size, d]` `rows`, iterating in `dtype`.

    The Gram matrices are accumulated in fp32 and summed over shards before rounding to `dtype`,
    as one fp32-accumulating matmul over the full matrix would. A wide full matrix (fewer latents
    than columns), whose Gram isn't a sum over rows, is gathered and given to `whole`.
    """
    a, b, c = ns_coefficients
    if shard.n_latents <= rows.shape[1]:
        return shard.rows(whole(torch.cat(shard.all_gather_rows(rows))))
    ortho = rows.to(dtype).T
    norm_square = identical_sum(ortho.float().pow(2).sum(), shard.group)
    ortho.div_(norm_square.sqrt().to(ortho.dtype).clamp(min=eps))
    for _ in range(ns_steps):
        gram = identical_sum(ortho.float() @ ortho.float().T, shard.group).to(ortho.dtype)
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        ortho = torch.addmm(ortho, gram_update, ortho, beta=a)
    return ortho.T
