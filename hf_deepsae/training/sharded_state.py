"""A latent-sharded SAE's training state in its ordinary form, and the rows of it each shard keeps.

Checkpoints and saved SAEs don't depend on how a run was spread over processes: a sharded run
gathers its rows to the main process, which writes the files an unsharded run writes
(`checkpointing`), and a resumed run reads back only its own rows of them (`weight_rows`,
`optimizer_rows`; safetensors reads a slice without loading the rest), so no process holds more
than its shard, except the main process, which holds one whole SAE at a time while saving. For
an ordinary SAE each function here is the plain operation (CPU copies, whole tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..configuration_deepsae import DeepSAEConfig
from ..modeling_deepsae import DeepSAEModel
from .latent_sharding import latent_shard, sharded_parameter_names, sharded_parameters

RowSelector = Callable[[Any, Sequence[int]], slice | None]
"""`(key, stored shape) -> the rows of that stored tensor this process keeps` (None: all of it)."""


def _gather_rows_to_main(rows: torch.Tensor, sae: DeepSAEModel) -> torch.Tensor | None:
    """The full tensor whose row shards the processes hold, on the main process's CPU."""
    shard = latent_shard(sae)
    assert shard is not None
    if shard.rank != 0:
        dist.send(rows.contiguous(), dst=0, group=shard.group)
        return None
    parts = [rows.detach().cpu()]
    for rank in range(1, shard.world_size):
        part = rows.new_empty((shard.sizes[rank], *rows.shape[1:]))
        dist.recv(part, src=rank, group=shard.group)
        parts.append(part.cpu())
    return torch.cat(parts)


@torch.no_grad()
def gather_model_state(sae: DeepSAEModel) -> dict[str, torch.Tensor] | None:
    """Collective for a latent shard: the unsharded `state_dict` on the main process (CPU), None
    on the others. An ordinary SAE's own `state_dict` (CPU copies)."""
    sharded = set(sharded_parameter_names(sae))
    state = {}
    for name, value in sae.state_dict().items():
        full = _gather_rows_to_main(value, sae) if name in sharded else value.detach().cpu()
        state[name] = full
    return None if any(value is None for value in state.values()) else state


def _sharded_optimizer_slots(optimizer: torch.optim.Optimizer, sae: DeepSAEModel
                             ) -> dict[int, torch.Tensor]:
    """`{state index: parameter}` for the optimizer's row-sharded parameters."""
    sharded = sharded_parameters(sae)
    params = [param for group in optimizer.param_groups for param in group["params"]]
    return {index: param for index, param in enumerate(params) if param in sharded}


@torch.no_grad()
def gather_optimizer_state(optimizer: torch.optim.Optimizer, sae: DeepSAEModel
                           ) -> dict[str, Any] | None:
    """Collective for a latent shard: the optimizer's `state_dict` as the unsharded SAE's optimizer
    would hold it, on the main process (None elsewhere)."""
    state = optimizer.state_dict()
    slots = _sharded_optimizer_slots(optimizer, sae)
    full_state: dict[int, dict[str, Any]] = {}
    for index, values in sorted(state["state"].items()):
        param = slots.get(index)
        full_state[index] = {
            key: _gather_rows_to_main(value, sae) if param is not None and isinstance(
                value, torch.Tensor) and value.shape == param.shape else _cpu(value)
            for key, value in sorted(values.items())}
    shard = latent_shard(sae)
    if shard is not None and shard.rank != 0:
        return None
    return {"state": full_state, "param_groups": state["param_groups"]}


def run_state(sae: DeepSAEModel, optimizers: list, schedulers: list, dead: Any
              ) -> dict[str, Any] | None:
    """Collective for a latent shard: one SAE's whole training state — `model` (its
    `state_dict`), `optimizers`, `schedulers`, `dead_latents` — unsharded, on the main process
    (None on the other shards)."""
    model = gather_model_state(sae)
    optimizer_states = [gather_optimizer_state(optimizer, sae) for optimizer in optimizers]
    if model is None:
        return None
    return {"model": model, "optimizers": optimizer_states,
            "schedulers": [scheduler.state_dict() for scheduler in schedulers],
            "dead_latents": {name: _cpu(value) for name, value in dead.state_dict().items()}}


def weight_rows(sae: DeepSAEModel) -> RowSelector | None:
    """Which rows of each stored weight (by `state_dict` name) `sae` keeps; None if it is not a
    shard."""
    shard = latent_shard(sae)
    if shard is None:
        return None
    sharded = set(sharded_parameter_names(sae))
    return lambda name, shape: shard.slice if name in sharded else None


def optimizer_rows(optimizer: torch.optim.Optimizer, sae: DeepSAEModel) -> RowSelector | None:
    """Which rows of each stored tensor of `optimizer`'s `state_dict` (keyed by its path in the
    state, e.g. `("state", 3, "exp_avg")`) a shard keeps: those of its sharded parameters' states
    shaped like the whole parameter. None if `sae` is not a shard."""
    shard = latent_shard(sae)
    if shard is None:
        return None
    slots = set(_sharded_optimizer_slots(optimizer, sae))

    def rows(path: Any, shape: Sequence[int]) -> slice | None:
        sharded = len(path) > 2 and path[0] == "state" and path[1] in slots
        return shard.slice if sharded and len(shape) and shape[0] == shard.n_latents else None

    return rows


def _cpu(value: Any) -> Any:
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def model_from_state(config: DeepSAEConfig, state: dict[str, torch.Tensor]) -> DeepSAEModel:
    """An ordinary `DeepSAEModel` holding `state`, built without initialising throwaway weights."""
    with torch.device("meta"):
        sae = DeepSAEModel(config)
    sae.load_state_dict(state, assign=True)
    return sae
