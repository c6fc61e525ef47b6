"""Latent sharding vs DDP over W = 1, 2, 4 gloo CPU processes: memory per process and speed.

    python benchmarks/bench_distributed.py                 # d 576, 32,768 latents, k 32, Adam
    python benchmarks/bench_distributed.py --smoke         # a tiny SAE, W = 1 and 2 (sharded)

For each W and mode, a fresh group of W processes (`torch.multiprocessing`, a real gloo group, one
`Accelerator` per process) trains the same shallow TopK SAE with the trainer's own pieces:
`SAEParallelism.build_sae`, `build_optimizers` and `_train_step` on the batches
`SAEParallelism.exchange` hands it. Every process draws its own `--batch_size` rows a step
(synthetic activations: the cost of a TopK step does not depend on their values), so a step
always trains on W x batch_size tokens. Modes: `ddp` (every process holds the whole SAE, DDP
averages gradients) and `latents` (`--shard_latents`: each holds 1/W of the latents). Reported per
process: the bytes of parameters, gradients and optimizer state, peak RSS and its growth over the
process's RSS before the SAE existed; per group: step time and tokens/s; and ratios to W = 1.
On a CPU all processes share the same cores and memory bus, so tokens/s shows the overhead of
the collectives rather than a speed-up; the memory columns are what sharding is for. The SAE is
wide next to the batch (32,768 latents, 1,024 tokens a process) so that its state, not the
per-batch pre-activations, dominates memory, as it does for the SAEs sharding is meant for.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, machine, peak_rss_mib, print_table, rss_mib  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def state_bytes(sae: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, int]:
    """Bytes of this process's parameters, their gradients (alive during every step) and the
    optimizer state."""
    parameters = sum(p.numel() * p.element_size() for p in sae.parameters())
    optimizer = sum(value.numel() * value.element_size() for opt in optimizers
                    for state in opt.state.values() for value in state.values()
                    if isinstance(value, torch.Tensor))
    return {"parameter_bytes": parameters, "gradient_bytes": parameters,
            "optimizer_bytes": optimizer}


def worker(rank: int, world_size: int, port: int, args: argparse.Namespace, mode: str,
           out_dir: str) -> None:
    """One process of the group: train `args.steps` steps and write its measurements."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS=str(args.threads))
    torch.set_num_threads(args.threads)
    from accelerate import Accelerator

    from hf_deepsae import DeepSAEConfig
    from hf_deepsae.sites import Site
    from hf_deepsae.training import TrainingConfig, build_optimizers
    from hf_deepsae.training.dead_latents import DeadLatentCounter
    from hf_deepsae.training.distributed import SAEParallelism
    from hf_deepsae.training.targets import SAERun, Target, site_name
    from hf_deepsae.training.trainer import _train_step

    accelerator = Accelerator(cpu=True)
    site = Site("activations", "output")
    parallelism = SAEParallelism(accelerator, shard_latents=mode == "latents",
                                 distribute_hookpoints=False, sae_sites=[{site_name(site)}])
    config = TrainingConfig(batch_size=args.batch_size, optimizer=args.optimizer,
                            total_tokens=args.batch_size * world_size * args.steps)
    baseline_rss = rss_mib()
    torch.manual_seed(0)
    sae = parallelism.build_sae(DeepSAEConfig(d_in=args.d_in, n_latents=args.n_latents, k=args.k))
    optimizers = build_optimizers(sae, config, 1e-3, muon_class=parallelism.muon_class(sae))
    sae, optimizers, _ = parallelism.prepare(sae, optimizers, [])
    run = SAERun(Target("activations", None, site, site), sae, optimizers, [],
                 DeadLatentCounter(args.n_latents, config.resolved_dead_threshold_tokens()))
    generator = torch.Generator().manual_seed(rank)
    step_seconds = []
    for step in range(args.warmup_steps + args.steps):
        batch = {site_name(site): torch.randn(args.batch_size, args.d_in, generator=generator)}
        start = time.perf_counter()
        _train_step(run, parallelism.exchange(batch), config, accelerator, parallelism, 0.0)
        accelerator.wait_for_everyone()
        if step >= args.warmup_steps:
            step_seconds.append(time.perf_counter() - start)
    result = {"rank": rank, "step_seconds": statistics.median(step_seconds),
              "peak_rss_mib": peak_rss_mib(), "baseline_rss_mib": baseline_rss,
              **state_bytes(accelerator.unwrap_model(sae), optimizers)}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


def measure(world_size: int, mode: str, args: argparse.Namespace) -> dict:
    """Start one group, gather its processes' measurements into one row."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(worker, args=(world_size, free_port(), args, mode, out_dir),
                           nprocs=world_size, start_method="spawn")
        ranks = [json.loads((Path(out_dir) / f"rank{r}.json").read_text())
                 for r in range(world_size)]
    state = [r["parameter_bytes"] + r["gradient_bytes"] + r["optimizer_bytes"] for r in ranks]
    step = max(r["step_seconds"] for r in ranks)
    return {
        "processes": world_size, "mode": mode,
        "state_mib_per_process": max(state) / 2**20,
        "parameter_and_optimizer_mib_per_process": max(
            r["parameter_bytes"] + r["optimizer_bytes"] for r in ranks) / 2**20,
        "peak_rss_mib_per_process": max(r["peak_rss_mib"] for r in ranks),
        "rss_growth_mib_per_process": max(r["peak_rss_mib"] - r["baseline_rss_mib"]
                                          for r in ranks),
        "rss_growth_mib_non_main": max((r["peak_rss_mib"] - r["baseline_rss_mib"]
                                        for r in ranks[1:]), default=None),
        "step_seconds": step, "tokens_per_second": world_size * args.batch_size / step,
        "ranks": ranks,
    }


def add_ratios(rows: list[dict]) -> None:
    """Each row's memory and speed relative to the single-process run."""
    single = rows[0]
    for row in rows:
        row["state_ratio"] = row["state_mib_per_process"] / single["state_mib_per_process"]
        row["rss_growth_ratio"] = row["rss_growth_mib_per_process"] / \
            single["rss_growth_mib_per_process"]
        row["tokens_per_second_ratio"] = row["tokens_per_second"] / single["tokens_per_second"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world_sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", default=["ddp", "latents"],
                        choices=["ddp", "latents"], help="modes measured on W > 1 processes")
    parser.add_argument("--d_in", type=int, default=576)
    parser.add_argument("--n_latents", type=int, default=32_768)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=1024, help="rows per process a step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--optimizer", default="adam", choices=["muon", "adam", "adamw"],
                        help="muon: DDP repeats the whole orthogonalisation on every process, "
                             "sharding splits it (and all-reduces d x d Grams)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--results_dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny SAE on 1 and 2 processes, for the test suite")
    args = parser.parse_args(argv)
    if args.smoke:
        args.world_sizes, args.d_in, args.n_latents, args.k = [1, 2], 16, 64, 4
        args.batch_size, args.steps, args.warmup_steps, args.modes = 32, 2, 1, ["latents"]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = []
    for world_size in args.world_sizes:
        for mode in (["ddp"] if world_size == 1 else args.modes):
            rows.append(measure(world_size, mode, args))
            print(f"measured {mode} on {world_size} process(es)", flush=True)
    add_ratios(rows)
    print_table(rows, ["processes", "mode", "parameter_and_optimizer_mib_per_process",
                       "state_mib_per_process", "state_ratio", "peak_rss_mib_per_process",
                       "rss_growth_mib_per_process", "rss_growth_mib_non_main",
                       "tokens_per_second", "tokens_per_second_ratio"])
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / "distributed.json"
    settings = {key: str(value) if isinstance(value, Path) else value
                for key, value in vars(args).items()}
    path.write_text(json.dumps({"machine": machine(), "settings": settings, "results": rows},
                               indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
