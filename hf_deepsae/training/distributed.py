"""How SAEs train over several processes: DDP, hookpoints spread over processes, latent sharding.

One canonical accelerate loop (`trainer.py`) serves all three modes; it asks `SAEParallelism`
which SAEs this process trains, which batches it trains them on, how to reduce, and how to turn
its part of the training state into the ordinary, unsharded one (checkpoints, saved SAEs).

- `ddp` (default): every process holds every SAE; `accelerator.prepare` wraps them in DDP, which
  averages the gradients of the processes' batches.
- `hookpoints` (`--distribute_hookpoints`): SAE i lives on process `i mod W` only. Every step each
  process sends its batch's activations at SAE i's sites to SAE i's owner (`dist.gather`), which
  trains on the W batches. Processes owning no SAE still run the language model and send.
- `latents` (`--shard_latents`): every process holds 1/W of each SAE's latents
  (`latent_sharding.py`); the processes' batches are all-gathered so that every shard sees them.

In both distributed modes an SAE takes the W batches one after the other and averages their
losses (each batch's FVU normalised by its own variance, AuxK and dead latents as DDP counts them),
so its gradient is DDP's and a run trains the same SAE, within float rounding, in every mode: the
modes change where memory goes, not what is learned. With one process every mode is plain DDP.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import gather_object

from ..configuration_deepsae import DeepSAEConfig
from ..modeling_deepsae import DeepSAEModel
from .latent_sharding import (
    check_shardable,
    clip_sharded_grad_norm_,
    shard_sae,
    sharded_parameter_names,
    sharded_parameters,
)
from .muon import Muon
from .sharded_muon import ShardedMuon
from .sharded_state import gather_model_state, model_from_state, run_state
from .state_files import nonfinite_tensors

MODES = ("ddp", "hookpoints", "latents")


class SAEParallelism:
    """Where each SAE lives and what crosses processes, for `n_saes` SAEs whose activation sites
    are `sae_sites[i]` (site names, the keys of the activation batches)."""

    def __init__(self, accelerator: Accelerator, *, shard_latents: bool,
                 distribute_hookpoints: bool, sae_sites: list[set[str]]) -> None:
        if shard_latents and distribute_hookpoints:
            raise ValueError("--shard_latents and --distribute_hookpoints exclude each other; "
                             "shard the latents of big SAEs, or spread many SAEs over processes")
        self.accelerator = accelerator
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        self.n_saes = len(sae_sites)
        self.mode = "ddp"
        if self.world_size > 1 and (shard_latents or distribute_hookpoints):
            self.mode = "latents" if shard_latents else "hookpoints"
        if self.mode != "ddp" and accelerator.mixed_precision == "fp16":
            raise ValueError("--mixed_precision fp16 needs a gradient scaler, which "
                             f"--{'shard_latents' if shard_latents else 'distribute_hookpoints'} "
                             "does not run; use --mixed_precision bf16 or no")
        self.site_owners: dict[str, list[int]] = {}
        for index, sites in enumerate(sae_sites):
            for site in sites:
                self.site_owners.setdefault(site, []).append(self.owner(index))

    def owner(self, index: int) -> int:
        """The process that trains SAE `index` (-1: every process)."""
        return index % self.world_size if self.mode == "hookpoints" else -1

    def trains(self, index: int) -> bool:
        return self.owner(index) in (-1, self.rank)

    # Building and stepping.

    def build_sae(self, config: DeepSAEConfig, initial_state: dict[str, torch.Tensor] | None = None
                  ) -> DeepSAEModel:
        """This process's copy (or latent shard) of a new `DeepSAEModel(config)`, on its device,
        holding `initial_state` if given (`--init_from`) instead of fresh weights.

        Latent shards get exactly the weights an unsharded run's main process initialises
        (the same seed gives the same SAE in every mode), but only the main process ever holds
        the full SAE: it builds it on the CPU and sends every process its rows; the others build
        theirs on the meta device, so no memory is spent on weights they don't keep.
        """
        device = self.accelerator.device
        if self.mode != "latents":
            return _with_state(DeepSAEModel(config), initial_state).to(device)
        check_shardable(config, self.world_size)
        is_main = self.rank == 0
        with contextlib.nullcontext() if is_main else torch.device("meta"):
            sae = DeepSAEModel(config)
        if is_main:
            _with_state(sae, initial_state)
        full = sae.state_dict() if is_main else {}
        shard = shard_sae(sae, self.rank, self.world_size)
        sae = sae.to(device) if is_main else sae.to_empty(device=device)
        sharded = set(sharded_parameter_names(sae))
        with torch.no_grad():
            for name, local in sae.state_dict().items():
                if name not in sharded:
                    dist.broadcast(local, src=0)
                elif is_main:
                    for rank in range(1, self.world_size):
                        start = sum(shard.sizes[:rank])
                        rows = full[name][start:start + shard.sizes[rank]]
                        dist.send(rows.to(device).contiguous(), dst=rank)
                else:
                    dist.recv(local, src=0)
        return sae

    def muon_class(self, sae: DeepSAEModel) -> Callable[..., torch.optim.Optimizer]:
        """The Muon optimizer class for `sae`'s matrices (`ShardedMuon` for a latent shard)."""
        if self.mode == "latents":
            return functools.partial(ShardedMuon, row_shards=sharded_parameters(sae))
        return Muon

    def prepare(self, sae: DeepSAEModel, optimizers: list, schedulers: list
                ) -> tuple[Any, list, list]:
        """`accelerator.prepare` for DDP; the distributed modes keep SAEs out of DDP."""
        if self.mode != "ddp":
            return sae, optimizers, schedulers
        sae, *prepared = self.accelerator.prepare(sae, *optimizers, *schedulers)
        return sae, prepared[:len(optimizers)], prepared[len(optimizers):]

    def exchange(self, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The batches this process trains its SAEs on: its own (DDP) or every process's."""
        if self.mode == "ddp":
            return [batch]
        batches: list[dict[str, torch.Tensor]] = [{} for _ in range(self.world_size)]
        for site in sorted(batch):
            rows = batch[site].contiguous()
            if self.mode == "latents":
                parts = [torch.empty_like(rows) for _ in range(self.world_size)]
                dist.all_gather(parts, rows)
            else:
                parts = None
                for owner in sorted(set(self.site_owners[site])):
                    received = [torch.empty_like(rows) for _ in range(self.world_size)] \
                        if owner == self.rank else None
                    dist.gather(rows, received, dst=owner)
                    parts = received if received is not None else parts
                if parts is None:
                    continue
            for rank, part in enumerate(parts):
                batches[rank][site] = part
        return batches

    def reduce_fired(self, fired: torch.Tensor) -> torch.Tensor:
        """Dead-latent "fired" counts of this step, summed over processes where they differ."""
        return self.accelerator.reduce(fired, "sum") if self.mode == "ddp" else fired

    @property
    def metrics_reduction(self) -> str:
        """How logged per-SAE metrics combine over processes: only owners report in hookpoints."""
        return "sum" if self.mode == "hookpoints" else "mean"

    def clip_grad_norm(self, sae: Any) -> Callable[..., Any]:
        if self.mode == "latents":
            return functools.partial(clip_sharded_grad_norm_, sae)
        return self.accelerator.clip_grad_norm_

    @property
    def evaluates_here(self) -> bool:
        """Whether this process evaluates its SAEs (all shards must take part in each forward)."""
        return self.mode != "ddp" or self.accelerator.is_main_process

    # The ordinary (unsharded) state, for checkpoints and the saved SAEs.

    def gather_saes(self, runs: dict[int, Any], extras: dict[int, Any]
                    ) -> dict[int, tuple[DeepSAEModel, Any]]:
        """Collective. `{i: (SAE i as an ordinary DeepSAEModel, extras[i])}` on the main process
        (every process in DDP); `{}` on other processes of the distributed modes. Gathered SAEs
        live on the CPU."""
        if self.mode == "ddp":
            return {index: (self.accelerator.unwrap_model(run.sae), extras[index])
                    for index, run in runs.items()}
        gathered = {}
        for index in range(self.n_saes):
            received = self.to_main(index, runs.get(index), lambda run, i=index: (
                self.accelerator.unwrap_model(run.sae).config, gather_model_state(
                    self.accelerator.unwrap_model(run.sae)), extras[i]))
            if received is not None:
                config, state, extra = received
                gathered[index] = (model_from_state(config, state), extra)
        return gathered

    def to_main(self, index: int, run: Any, describe: Callable[[Any], Any]) -> Any:
        """`describe(run)` of SAE `index`, computed where the run lives, delivered to the main
        process (None elsewhere). `describe` may be collective (latent shards)."""
        owner = self.owner(index)
        if self.mode == "ddp":  # every process holds the same SAE: the main process's is it
            return describe(run) if self.accelerator.is_main_process else None
        if owner == -1:
            value = describe(run)
            return value if self.accelerator.is_main_process else None
        if owner == 0:
            return describe(run) if self.rank == 0 else None
        if self.rank == owner:
            dist.send_object_list([describe(run)], dst=0)
        elif self.rank == 0:
            received = [None]
            dist.recv_object_list(received, src=owner)
            return received[0]
        return None


class TrainingStates:
    """The SAEs of a run as checkpoints see them (`checkpointing.CheckpointedRuns`): every
    hookpoint in order, the runs this process trains (`local`: whole SAEs, or latent shards), and
    their training states in the ordinary unsharded form, gathered to the main process one SAE at
    a time. One checkpoint format serves every mode, so a checkpoint can resume in another one."""

    def __init__(self, parallelism: SAEParallelism, runs: list[Any], hookpoints: list[str]
                 ) -> None:
        self.parallelism, self.local, self.hookpoints = parallelism, runs, hookpoints
        self._runs = {run.index: run for run in runs}

    def nonfinite(self) -> list[str]:
        """Collective: `"<hookpoint>: <tensor path>"` for each weight or optimizer state holding
        NaN/inf on any process; the same list on every process."""
        unwrap = self.parallelism.accelerator.unwrap_model
        found = [f"{run.name}: {name}" for run in self.local for name in nonfinite_tensors({
            "weights": unwrap(run.sae).state_dict(),
            "optimizer": [optimizer.state_dict()["state"] for optimizer in run.optimizers]})]
        if self.parallelism.mode == "ddp":  # every process holds the same SAEs
            return found
        return list(dict.fromkeys(gather_object(found)))

    def gathered(self) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """Collective, to be iterated to its end on every process: `(hookpoint, training state)`
        for each SAE in order (`sharded_state.run_state`), the state on the main process only."""
        unwrap = self.parallelism.accelerator.unwrap_model
        for index, hookpoint in enumerate(self.hookpoints):
            yield hookpoint, self.parallelism.to_main(index, self._runs.get(index), lambda run: (
                run_state(unwrap(run.sae), run.optimizers, run.schedulers, run.dead)))


def _with_state(sae: DeepSAEModel, state: dict[str, torch.Tensor] | None) -> DeepSAEModel:
    """`sae` holding `state` (whose names and shapes must match exactly), or as it is."""
    if state is not None:
        sae.load_state_dict(state)
    return sae
