"""Latent sharding: each of W processes holds a contiguous block of every sparse stage's latents.

What is sharded: the rows of each stage's encoder (weight and bias) and of its `W_dec`, with their
gradients and optimizer state, so an SAE's memory per process falls to ~1/W. What is replicated:
everything else (the dense encoder/decoder MLPs, `b_dec`, the input scales) and the activations
(every shard reads the same batch). The forward stays exact (Megatron-style tensor parallelism):

- **top-k**: each shard takes its local top-k of its pre-activations; the W·k candidates (value,
  global id) are all-gathered and the global top-k chosen, the same on every process. Each latent's
  value comes from the shard that owns it (others contribute 0) and is all-reduced.
- **decoding**: each shard decodes the winners it owns (`z @ W_dec` over its rows) and the partial
  first decoder layers are all-reduced *before* any nonlinear decoder MLP.
- **gradients**: the all-reduces above pass the gradient through unchanged (every process computes
  the same loss), and the encoder MLP's output sums the shards' partial gradients, so replicated
  parameters get the full gradient on every process without any other communication.
- **the std-of-pre-activation penalty** and its logged value sum per-row moments over shards;
  **AuxK** picks its dead latents with the same gathered top-k.

A sharded stage keeps the full `DeepSAEConfig` and speaks global latent ids everywhere, so
`DeepSAEModel.forward`, its AuxK loss, `latent_indices` and the dead-latent counters are those of
the unsharded SAE. Only `topk` SAEs shard (the architecture of the largest published runs).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..configuration_deepsae import DeepSAEConfig
from ..modeling_deepsae import DeepSAEModel, SparseStage
from ..pre_activation_std import ROWS_PER_BLOCK, gram_row_moments, std_from_row_moments
from ..sparsity import TopK, gather_linear, sparse_decode

SHARDED_PARAMETERS = ("encoder.weight", "encoder.bias", "W_dec")
"""The parameters of a `SparseStage` whose rows are latents, hence sharded."""


class _SumOverShards(torch.autograd.Function):
    """All-reduce (sum) forward, identity backward: assembles a quantity every shard contributes to.

    The loss downstream is the same on every process, so each shard's partial input receives the
    full gradient of the sum as it is (Megatron's `g`)."""

    @staticmethod
    def forward(ctx, partial, group):  # type: ignore[override]
        return identical_sum(partial, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


class _ShareWithShards(torch.autograd.Function):
    """Identity forward, all-reduce (sum) backward: a replicated tensor each shard reads its own
    latents from, whose gradient is the sum of the shards' partial gradients (Megatron's `f`)."""

    @staticmethod
    def forward(ctx, replicated, group):  # type: ignore[override]
        ctx.group = group
        return replicated.view_as(replicated)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return identical_sum(grad, ctx.group), None


def identical_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The sum of `tensor` over processes, bit-identical on every process.

    Replicated parameters stay identical only if every process computes the same sums. NCCL's
    ring and tree all-reduces hand every rank the same result; gloo's may round differently per
    rank (a+b+c summed in another order), so there the parts are gathered and added in rank order.
    """
    if dist.get_backend(group) == "nccl":
        total = tensor.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts).sum(0)


class LatentShard:
    """This process's block `[start, stop)` of a stage's `n_latents` latents, and the collectives
    that make the shards act as one SAE. Blocks differ by at most one latent in size."""

    def __init__(self, n_latents: int, rank: int, world_size: int,
                 group: dist.ProcessGroup | None = None) -> None:
        if n_latents < world_size:
            raise ValueError(f"n_latents={n_latents} can't be sharded over {world_size} processes; "
                             "use fewer processes or more latents")
        self.n_latents, self.rank, self.world_size, self.group = n_latents, rank, world_size, group
        self.sizes = [n_latents // world_size + (r < n_latents % world_size)
                      for r in range(world_size)]
        self.start = sum(self.sizes[:rank])
        self.stop = self.start + self.sizes[rank]

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def slice(self) -> slice:
        """This shard's rows of a `[n_latents, ...]` tensor, as an index."""
        return slice(self.start, self.stop)

    def rows(self, full: torch.Tensor) -> torch.Tensor:
        """This shard's rows of a `[n_latents, ...]` tensor."""
        return full[self.slice]

    def owns(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.start) & (ids < self.stop)

    def local(self, ids: torch.Tensor) -> torch.Tensor:
        """Local row of each global id (clamped into range for ids other shards own)."""
        return (ids - self.start).clamp(0, self.size - 1)

    def sum(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum over shards, differentiable (identity backward)."""
        return _SumOverShards.apply(partial, self.group)

    def share(self, replicated: torch.Tensor) -> torch.Tensor:
        """Mark `replicated` as read by every shard: its gradient is summed over shards."""
        return _ShareWithShards.apply(replicated, self.group)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return parts

    def all_gather_rows(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Every shard's rows of a row-sharded tensor (`rows` is this shard's `[size, ...]`)."""
        padded = rows.new_zeros((max(self.sizes), *rows.shape[1:]))
        padded[:self.size] = rows
        return [part[:size] for part, size in zip(self.all_gather(padded), self.sizes, strict=True)]

    @torch.no_grad()
    def top_k(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Global ids `[B, k]` of the k largest of all shards' `scores` per row (`[B, size]` here).

        Exact: the global top-k lies within the union of the shards' local top-k, which is
        gathered (W·k candidates a row) and reduced on every process alike.
        """
        local_k = min(k, self.size)
        values, ids = scores.topk(local_k, dim=-1, sorted=False)
        if local_k < k:  # pad to equal shapes across shards; -inf never wins a real latent
            values = torch.cat([values, values.new_full((len(values), k - local_k), -torch.inf)],
                               dim=-1)
            ids = torch.cat([ids, ids.new_zeros(len(ids), k - local_k)], dim=-1)
        candidates = torch.cat(self.all_gather(values), dim=-1)
        candidate_ids = torch.cat(self.all_gather(ids + self.start), dim=-1)
        return candidate_ids.gather(-1, candidates.topk(k, dim=-1, sorted=False).indices)

    def select(self, hidden: torch.Tensor, encoder: nn.Linear, ids: torch.Tensor,
               pre_acts: torch.Tensor) -> torch.Tensor:
        """Pre-activations of the global `ids` (`[B, m]`), each computed by its owner and summed."""
        owned = self.owns(ids)
        values = gather_linear(hidden, encoder, self.local(ids), pre_acts)
        return self.sum(values * owned.to(values.dtype))

    def decode_first_layer(self, latent_acts: torch.Tensor, ids: torch.Tensor,
                           weight: torch.Tensor) -> torch.Tensor:
        """`z @ W_dec` for sparse `(latent_acts, ids)`: each shard decodes its own latents."""
        owned_acts = latent_acts * self.owns(ids).to(latent_acts.dtype)
        return self.sum(sparse_decode(owned_acts, self.local(ids), weight))

    @torch.no_grad()
    def mean_row_std(self, pre_acts: torch.Tensor) -> torch.Tensor:
        """`mean over rows of std over all latents` from this shard's `[B, size]` pre-activations.

        Two passes (row means, then squared deviations), each summed over shards."""
        blocks = pre_acts.reshape(-1, pre_acts.shape[-1]).split(ROWS_PER_BLOCK)
        sums = identical_sum(torch.cat([block.float().sum(-1) for block in blocks]), self.group)
        means = (sums / self.n_latents).split(ROWS_PER_BLOCK)
        squares = identical_sum(torch.cat([(block.float() - mean[:, None]).pow(2).sum(-1)
                                           for block, mean in zip(blocks, means, strict=True)]),
                                self.group)
        return (squares / (self.n_latents - 1)).sqrt().mean()


class ShardedTopK(TopK):
    """`TopK` over all shards: the global top-k ids, with values from their owners (k read from
    the config at every call, as `TopK` does)."""

    def __init__(self, config: DeepSAEConfig, shard: LatentShard) -> None:
        super().__init__(config)
        self.shard = shard

    def forward(self, h: torch.Tensor, linear: nn.Linear, pre_acts: torch.Tensor):
        ids = self.shard.top_k(pre_acts, self.config.k)
        return torch.relu(self.shard.select(h, linear, ids, pre_acts)), ids


class SharedInput(nn.Sequential):
    """A stage's encoder MLP whose output every shard reads (same children, same weight names)."""

    def __init__(self, mlp: nn.Sequential, shard: LatentShard) -> None:
        super().__init__(*mlp)
        self.shard = shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shard.share(super().forward(x))


class ShardedSparseStage(SparseStage):
    """A `SparseStage` holding only its shard's latents (see the module docstring)."""

    shard: LatentShard

    def _first_decoder_layer(self, latent_acts: torch.Tensor,
                             latent_indices: torch.Tensor | None) -> torch.Tensor:
        if latent_indices is None:
            raise ValueError("a latent-sharded stage decodes sparse (values, ids) latents only")
        return self.shard.decode_first_layer(latent_acts, latent_indices, self.W_dec)

    def top_latents(self, scores: torch.Tensor, k: int,
                    among: torch.Tensor | None = None) -> torch.Tensor:
        if among is not None:
            scores = scores.masked_fill(~self.shard.rows(among), -torch.inf)
        return self.shard.top_k(scores, k)

    def select(self, hidden: torch.Tensor, pre_acts: torch.Tensor,
               indices: torch.Tensor) -> torch.Tensor:
        return self.shard.select(hidden, self.encoder, indices, pre_acts)

    def pre_act_std(self, hidden: torch.Tensor, pre_acts: torch.Tensor,
                    differentiable: bool) -> torch.Tensor:
        if not differentiable:
            return self.shard.mean_row_std(pre_acts)
        moments = self.shard.sum(gram_row_moments(hidden, self.encoder))
        return std_from_row_moments(moments, self.shard.n_latents)


def check_shardable(config: DeepSAEConfig, world_size: int) -> None:
    """Raise a clear error for SAEs `shard_sae` can't shard over `world_size` processes."""
    if config.sparsity != "topk":
        raise ValueError(f"--shard_latents supports sparsity='topk' SAEs; this one is "
                         f"{config.sparsity!r}: train it with DDP (drop --shard_latents)")
    if config.n_latents < world_size:
        raise ValueError(f"n_latents={config.n_latents} can't be split over {world_size} "
                         "processes; use more latents or fewer processes")


@torch.no_grad()
def shard_sae(sae: DeepSAEModel, rank: int, world_size: int,
              group: dist.ProcessGroup | None = None) -> LatentShard:
    """Turn `sae` (in place) into this process's shard of it; returns the shard.

    Each stage keeps rows `[start, stop)` of its encoder and `W_dec` and becomes a
    `ShardedSparseStage` (the class swap `torch.distributed.fsdp.fully_shard` also does); the rest
    is untouched. Every process must pass the same full `sae` (e.g. built with the same seed).
    """
    check_shardable(sae.config, world_size)
    shard = LatentShard(sae.config.n_latents, rank, world_size, group)
    for stage in sae.stages:
        for name in SHARDED_PARAMETERS:
            module_name, _, attribute = name.rpartition(".")
            module = stage.get_submodule(module_name)
            full = getattr(module, attribute)
            setattr(module, attribute, nn.Parameter(shard.rows(full).clone(),
                                                    requires_grad=full.requires_grad))
        stage.encoder.out_features = shard.size
        stage.encoder_mlp = SharedInput(stage.encoder_mlp, shard)
        stage.sparsity = ShardedTopK(stage.sparsity.config, shard)
        stage.shard = shard
        stage.__class__ = ShardedSparseStage
    return shard


def latent_shard(sae: nn.Module) -> LatentShard | None:
    """The `LatentShard` of a sharded SAE, or None for an ordinary one."""
    stages = getattr(sae, "stages", [])
    return stages[0].shard if stages and isinstance(stages[0], ShardedSparseStage) else None


def sharded_parameter_names(sae: nn.Module) -> list[str]:
    """Names (as in `state_dict`) of the row-sharded parameters of a sharded SAE."""
    return [f"stages.{i}.{name}" for i in range(len(sae.stages)) for name in SHARDED_PARAMETERS
            if isinstance(sae.stages[i], ShardedSparseStage)]


def sharded_parameters(sae: nn.Module) -> dict[nn.Parameter, LatentShard]:
    """`{parameter: its shard}` for the row-sharded parameters of `sae` (empty if unsharded)."""
    shard = latent_shard(sae)
    if shard is None:
        return {}
    return {sae.get_parameter(name): shard for name in sharded_parameter_names(sae)}


@torch.no_grad()
def clip_sharded_grad_norm_(sae: nn.Module, parameters: Iterable[torch.Tensor],
                            max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over the whole SAE, every shard included.

    The squared norm of the sharded gradients is summed over shards; replicated gradients (the
    same on every process) count once. Every process applies the same clipping factor.
    """
    sharded = sharded_parameters(sae)
    grads = [(p.grad, p in sharded) for p in parameters if p.grad is not None]
    squares = torch.zeros(2, dtype=torch.float32, device=grads[0][0].device)
    for grad, is_sharded in grads:
        squares[int(is_sharded)] += grad.float().pow(2).sum()
    shard = latent_shard(sae)
    if shard is not None:
        squares[1] = identical_sum(squares[1], shard.group)
    total_norm = squares.sum().sqrt()
    factor = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for grad, _ in grads:
        grad.mul_(factor.to(grad.dtype))
    return total_norm
