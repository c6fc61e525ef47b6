"""Processes of a real gloo group that train latent-sharded SAEs beside an unsharded reference.

`run_sharding_checks` is started by `torch.multiprocessing` (see `test_latent_sharding.py`). Each
process builds an `Accelerator` on the group, then for every architecture trains two copies of
the same SAE with the trainer's own step function (`_train_step`) on the same W batches a step:
an ordinary SAE (the DDP arithmetic: one loss per process's batch, averaged) and a latent-sharded
one. It records both runs' metrics, chosen latents and weights, the memory each holds, and a
round trip through the trainer's checkpoint files, in `<out>/rank<r>.pt` for the test to judge.
The runs use Adam, whose arithmetic is the same sharded or not; Muon's orthogonalisation, rounded
to bf16 as torch's, turns last-bit differences into visible ones within a few steps, so it is
checked by itself (`muon_steps`): one `ShardedMuon` step against `Muon` on the full
matrix.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from accelerate import Accelerator

from hf_deepsae import DeepSAEConfig, DeepSAEModel
from hf_deepsae.sites import Site
from hf_deepsae.training import TrainingConfig, build_optimizers, build_scheduler
from hf_deepsae.training.checkpointing import load_checkpoint, save_checkpoint
from hf_deepsae.training.dead_latents import DeadLatentCounter
from hf_deepsae.training.distributed import SAEParallelism, TrainingStates
from hf_deepsae.training.failures import check_same_on_every_process
from hf_deepsae.training.latent_sharding import LatentShard, shard_sae
from hf_deepsae.training.muon import Muon
from hf_deepsae.training.sharded_muon import ShardedMuon
from hf_deepsae.training.sharded_state import gather_model_state
from hf_deepsae.training.targets import SAERun, Target, site_name
from hf_deepsae.training.trainer import _train_step

D_IN, N_LATENTS, BATCH, STEPS = 16, 200, 16, 6
ARCHITECTURES = {
    "shallow": {},
    "deep": {"encoder_hidden": [24], "decoder_hidden": [24], "layer_norm": True,
             "std_coefficient": 0.1},
    "stacked": {"n_stacked": 2},
    "skip-transcoder": {"transcoder": True, "skip_connection": True, "d_out": 12,
                        "encoder_hidden": [8]},
    "matryoshka": {"n_stacked": 2, "decoder_hidden": [24],  # prefixes cross shards and stages
                   "matryoshka_prefixes": [10, 150, 260]},
}
READ, WRITE = Site("mlp", "input"), Site("mlp", "output")


def run_sharding_checks(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    results: dict = {"disagreement": disagreement_error(accelerator),
                     "muon": muon_steps(accelerator)}
    for name, architecture in ARCHITECTURES.items():
        results[name] = train_both(accelerator, architecture, Path(out_dir) / name)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    accelerator.wait_for_everyone()


def sharded_copy(sae: DeepSAEModel, latents: SAEParallelism) -> DeepSAEModel:
    """This process's latent shard of (a copy of) `sae`."""
    copied = copy.deepcopy(sae)
    shard_sae(copied, latents.rank, latents.world_size)
    return copied


def disagreement_error(accelerator: Accelerator) -> str:
    try:
        check_same_on_every_process(accelerator, "the checkpoint to resume",
                                    {"step": 4 * (accelerator.process_index + 1)})
    except ValueError as error:
        return str(error)
    return ""


def muon_steps(accelerator: Accelerator) -> dict:
    """Two steps of `Muon` on a full matrix, of `ShardedMuon` on this process's rows of it, and
    of Muon on those rows alone (the naive per-shard orthogonalisation), for a tall matrix (the
    all-reduced Gram path) and a wide one (the gathered path), orthogonalising in bf16 (exactly
    `torch.optim.Muon`) and in fp32 (where bf16 is slow): `{(rows, dtype): steps}`."""
    results = {}
    for rows in (N_LATENTS, 12):
        for dtype in ("bfloat16", "float32"):
            generator = torch.Generator().manual_seed(rows)
            full = torch.randn(rows, D_IN, generator=generator)
            grads = [torch.randn(rows, D_IN, generator=generator) for _ in range(2)]
            shard = LatentShard(rows, accelerator.process_index, accelerator.num_processes)
            reference, sharded, naive = (torch.nn.Parameter(x.clone()) for x in (
                full, shard.rows(full), shard.rows(full)))
            options = {"lr": 1e-2, "adjust_lr_fn": "match_rms_adamw",
                       "orthogonalization_dtype": dtype}
            optimizers = [Muon([reference], **options),
                          ShardedMuon([sharded], row_shards={sharded: shard}, **options),
                          Muon([naive], **options)]
            for grad in grads:
                for param, optimizer in zip((reference, sharded, naive), optimizers,
                                            strict=True):
                    param.grad = grad.clone() if param is reference else shard.rows(grad).clone()
                    optimizer.step()
            results[rows, dtype] = {"reference": shard.rows(reference.detach()),
                                    "sharded": sharded.detach(), "naive": naive.detach()}
    return results


def make_run(sae: DeepSAEModel, parallelism: SAEParallelism, config: TrainingConfig) -> SAERun:
    target = Target("mlp", None, READ, WRITE if sae.config.transcoder else READ)
    optimizers = build_optimizers(sae, config, 1e-2, muon_class=parallelism.muon_class(sae))
    schedulers = [build_scheduler(optimizer, config, STEPS) for optimizer in optimizers]
    dead = DeadLatentCounter(sae.config.n_total_latents, config.resolved_dead_threshold_tokens())
    return SAERun(target, sae, optimizers, schedulers, dead)


def batches_of_step(step: int, world_size: int, transcoder: bool) -> list[dict]:
    """The W per-process batches of a step (the same on every process, as after exchange)."""
    generator = torch.Generator().manual_seed(1000 + step)
    batches = []
    for _ in range(world_size):
        x = torch.randn(BATCH, D_IN, generator=generator) * 3 + 1
        batch = {site_name(READ): x}
        if transcoder:
            batch[site_name(WRITE)] = torch.randn(BATCH, 12, generator=generator) + x[:, :12]
        batches.append(batch)
    return batches


def state_bytes(run: SAERun) -> int:
    tensors = list(run.sae.parameters()) + [
        value for optimizer in run.optimizers for state in optimizer.state.values()
        for value in state.values() if isinstance(value, torch.Tensor) and value.ndim]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def train_both(accelerator: Accelerator, architecture: dict, folder: Path) -> dict:
    world_size = accelerator.num_processes
    config = TrainingConfig(batch_size=BATCH, dead_threshold_tokens=2 * BATCH * world_size,
                            total_tokens=BATCH * world_size * STEPS, max_grad_norm=1.0,
                            optimizer="adam")
    torch.manual_seed(0)
    sae_config = DeepSAEConfig(d_in=D_IN, n_latents=N_LATENTS, k=4, k_aux=6, **architecture)
    full = DeepSAEModel(sae_config)
    first = batches_of_step(0, world_size, sae_config.transcoder)[0]
    full.initialize_from_activations(*[first[key] for key in first])
    sites = [{site_name(READ), site_name(WRITE)}]
    ddp = SAEParallelism(accelerator, shard_latents=False, distribute_hookpoints=False,
                         sae_sites=sites)
    latents = SAEParallelism(accelerator, shard_latents=True, distribute_hookpoints=False,
                             sae_sites=sites)
    reference = make_run(full, ddp, config)
    sharded = make_run(sharded_copy(full, latents), latents, config)
    probe = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(7)) * 3 + 1
    record: dict = {"reference_metrics": [], "sharded_metrics": [], "reference_latents": [],
                    "sharded_latents": []}
    for step in range(STEPS):
        batches = batches_of_step(step, world_size, sae_config.transcoder)
        for run, parallelism, key in ((reference, ddp, "reference"), (sharded, latents, "sharded")):
            metrics = _train_step(run, batches, config, accelerator, parallelism, 0.1)
            record[f"{key}_metrics"].append(metrics)
            with torch.no_grad():
                indices = run.sae(probe, target=probe[:, :12] if sae_config.transcoder else None,
                                  dead_mask=run.dead.dead_mask).latent_indices
            record[f"{key}_latents"].append(indices.sort(-1).values)
    record["dead_latents"] = (reference.dead.tokens_since_fired, sharded.dead.tokens_since_fired)
    record["reference_state"] = reference.sae.state_dict()
    record["sharded_state"] = gather_model_state(sharded.sae)
    record["bytes"] = (state_bytes(reference), state_bytes(sharded))
    record["checkpoint"] = checkpoint_round_trip(latents, sharded, sae_config, config, folder)
    record["muon_optimizer"] = type(build_optimizers(
        sharded.sae, TrainingConfig(optimizer="muon"), 1e-2,
        muon_class=latents.muon_class(sharded.sae))[0]).__name__
    return record


def checkpoint_round_trip(latents: SAEParallelism, run: SAERun, sae_config: DeepSAEConfig,
                          config: TrainingConfig, folder: Path) -> dict:
    """A sharded run's state, saved as the trainer saves checkpoints, loaded into a fresh shard
    and gathered again; with the files of the checkpoint."""
    def states(run: SAERun) -> TrainingStates:
        return TrainingStates(latents, [run], [run.name])

    saved = dict(states(run).gathered())[run.name]
    path = save_checkpoint(latents.accelerator, folder, 1, states(run), {}, run_settings={})
    torch.manual_seed(123)
    fresh = make_run(latents.build_sae(sae_config), latents, config)
    load_checkpoint(latents.accelerator, path, states(fresh))
    return {"saved": saved, "reloaded": dict(states(fresh).gathered())[fresh.name],
            "files": sorted(str(file.relative_to(path)) for file in path.rglob("*")
                            if file.is_file())}
