"""Deep vs shallow SAEs on a real model: FVU, L0, dead latents and CE-loss score at equal tokens.

    python benchmarks/study_deep_vs_shallow.py                          # GPU-sized defaults
    python benchmarks/study_deep_vs_shallow.py --quick --threads 1      # ~75 min on 1 CPU core
    python benchmarks/study_deep_vs_shallow.py --smoke --model_name_or_path tiny ...   # seconds

On SmolLM2-135M-Instruct's layer-6 MLP output (the cached activations; the last 16k tokens held
out), every SAE trains on the same number of tokens with the project's training recipe (AuxK on
dead latents, unit-norm decoder upkeep, gradient clipping, `hf_deepsae.training.optim`'s Adam or
Muon + AdamW with a linear schedule, at the trainer's default learning rate for each: Gao et al.'s
width scaling per stage, times `MUON_LR_SCALE` for Muon) and is scored by `hf_deepsae.evaluation`.
Sweeps:

- architectures at equal total latents: shallow TopK, MLP-encoder (one dense layer before the
  sparse one), deep (dense layers on both sides, LayerNorm) with hidden width d_in or 2·d_in
  (`deep-2x`), stacked residual top-k with 2-5
  stages (k per stage = round(k / stages), so total L0 matches up to rounding; each stage has
  1/stages of the latents);
- total L0 (k) in 8, 16, 32, 64; optimizer Adam vs Muon; std-of-pre-activation penalty off/on.

Reports held-out FVU, L0, dead % (no firing in the last 10% of training tokens) and held-out dead %,
and the CE-loss score of the best recipe per (architecture, k) on text none of them trained on
(docstrings of Python standard-library modules); plots the FVU-vs-L0 frontier per architecture.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import os
import time

import matplotlib
import torch
from common import (
    BATCH_SIZE,
    ActivationSource,
    activation_source,
    add_common_arguments,
    batches,
    make_train_step,
    print_table,
    train_eval_split,
    write_results,
)
from datasets import Dataset

from hf_deepsae import DeepSAEConfig, DeepSAEModel
from hf_deepsae.activations import load_language_model, tokenize_and_chunk
from hf_deepsae.evaluation import ActivationMetrics, evaluate_saes
from hf_deepsae.training.config import TrainingConfig
from hf_deepsae.training.dead_latents import DeadLatentCounter
from hf_deepsae.training.optim import build_optimizers, build_scheduler

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ARCHITECTURES = ("shallow", "mlp-encoder", "deep", "deep-2x",
                 *(f"stacked-{stages}" for stages in range(2, 6)))
QUICK = {"expansion_factor": 4, "batch_size": 1024, "train_tokens": 98_304, "ks": [8, 16, 32, 64],
         "optimizers": ["adam", "muon"], "std_coefficients": [0.0, 0.05], "ce_tokens": 1024}
SMOKE = {"architectures": ["shallow", "deep", "stacked-2"], "ks": [8], "optimizers": ["muon"],
         "std_coefficients": [0.0], "expansion_factor": 2, "batch_size": 64, "train_tokens": 128,
         "eval_tokens": 256, "ce_tokens": 32, "fresh": True}
RESULTS_NAME = "study_deep_vs_shallow"
RECIPE_SETTINGS = ("expansion_factor", "batch_size", "train_tokens", "eval_tokens", "seed",
                   "ce_tokens")
"""What makes two sweeps' runs comparable; a run's name says the rest (architecture, k, ...)."""
CE_MODULES = ["argparse", "collections", "contextlib", "dataclasses", "functools", "itertools",
              "json", "logging", "os", "pathlib", "re", "subprocess", "threading", "typing",
              "unittest", "urllib.request", "email", "asyncio", "inspect", "textwrap"]


def architecture_fields(architecture: str, d_in: int) -> dict:
    """`DeepSAEConfig` fields of an architecture; dense layers are d_in or 2·d_in wide."""
    if architecture.startswith("stacked-"):
        return {"n_stacked": int(architecture.removeprefix("stacked-"))}
    if architecture == "shallow":
        return {}
    if architecture == "mlp-encoder":
        return {"encoder_hidden": [d_in]}
    width = 2 * d_in if architecture == "deep-2x" else d_in
    return {"encoder_hidden": [width], "decoder_hidden": [width], "layer_norm": True}


def sae_config(architecture: str, k: int, n_total_latents: int, std_coefficient: float,
               source: ActivationSource, d_in: int) -> DeepSAEConfig:
    """The architecture at total L0 ≈ k and `n_total_latents` latents over all stages."""
    overrides = architecture_fields(architecture, d_in)
    stages = overrides.pop("n_stacked", 1)
    return DeepSAEConfig(
        d_in=d_in, n_latents=n_total_latents // stages, k=max(1, round(k / stages)),
        n_stacked=stages, std_coefficient=std_coefficient, hookpoint=source.hookpoint,
        base_model_name_or_path=source.model_name_or_path, **overrides,
    )


def train_one(config: DeepSAEConfig, optimizer: str, train: torch.Tensor, args: argparse.Namespace
              ) -> tuple[DeepSAEModel, float, float]:
    """Train on `args.train_tokens` tokens; returns the SAE, its dead fraction and seconds."""
    torch.manual_seed(args.seed)
    sae = DeepSAEModel(config).to(args.device)
    sae.initialize_from_activations(train[:8 * args.batch_size].to(args.device))
    num_steps = args.train_tokens // args.batch_size
    training = TrainingConfig(optimizer=optimizer, total_tokens=args.train_tokens,
                              batch_size=args.batch_size)
    optimizers = build_optimizers(sae, training, training.resolved_lr(config.n_latents))
    dead = DeadLatentCounter(config.n_total_latents, training.resolved_dead_threshold_tokens(),
                             device=args.device)
    step = make_train_step(
        sae, optimizers, schedulers=[build_scheduler(o, training, num_steps) for o in optimizers],
        dead=dead, max_grad_norm=training.max_grad_norm)
    start = time.perf_counter()
    for x in batches(train, args.batch_size, num_steps):
        step(x.to(args.device))
    return sae.eval(), dead.dead_fraction(), time.perf_counter() - start


@torch.no_grad()
def held_out_metrics(sae: DeepSAEModel, held_out: torch.Tensor, device: str) -> dict:
    metrics = ActivationMetrics(sae.config.n_total_latents)
    for x in held_out.split(BATCH_SIZE):
        out = sae(x.to(device))
        metrics.update(x, out.reconstruction.cpu(), out.latent_acts.cpu(),
                       out.latent_indices.cpu())
    result = metrics.compute()
    return {"fvu": result.fvu, "l0": result.l0, "held_out_dead_fraction": result.dead_fraction}


def ce_loss_scores(saes: dict[str, DeepSAEModel], tokens: int, device: str,
                   source: ActivationSource) -> dict[str, float]:
    """CE-loss score of each SAE spliced into the language model, on stdlib docstrings (unseen
    text)."""
    model, tokenizer = load_language_model(source.model_name_or_path, dtype=torch.float32,
                                           device=device)
    documents = [importlib.import_module(name).__doc__ or "" for name in CE_MODULES]
    chunks = tokenize_and_chunk(Dataset.from_dict({"text": documents}), tokenizer,
                                source.context_length)
    count = min(len(chunks), max(1, tokens // source.context_length))
    token_batches = [chunks[i:i + 4]["input_ids"] for i in range(0, count, 4)]
    result = evaluate_saes(model, saes, token_batches)
    return {name: metrics.ce_loss_score for name, metrics in result.language_model.items()}


def best_runs(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """The lowest-FVU run per (architecture, k): the recipe that represents each cell."""
    best: dict[tuple[str, int], dict] = {}
    for row in rows:
        key = (row["architecture"], row["k"])
        if key not in best or row["fvu"] < best[key]["fvu"]:
            best[key] = row
    return best


def plot_frontier(rows: list[dict], path: str) -> None:
    """FVU vs L0: every run as a faint point, the best recipe per (architecture, k) as a line."""
    figure, axis = plt.subplots(figsize=(7, 5))
    for index, architecture in enumerate(ARCHITECTURES):
        color = f"C{index}"
        runs = [row for row in rows if row["architecture"] == architecture]
        if not runs:
            continue
        axis.scatter([r["l0"] for r in runs], [r["fvu"] for r in runs], color=color, alpha=0.25,
                     s=12)
        line = sorted(best_runs(runs).values(), key=lambda run: run["l0"])
        axis.plot([r["l0"] for r in line], [r["fvu"] for r in line], marker="o", color=color,
                  label=architecture)
    axis.set(xscale="log", xlabel="L0 (active latents per token, held out)",
             ylabel="FVU (held out)", title="SmolLM2-135M layer-6 MLP out: FVU vs L0")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"2-CPU-core defaults: {QUICK} (explicit flags still win)")
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES),
                        choices=ARCHITECTURES)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--optimizers", nargs="+", default=["adam", "muon"],
                        choices=["adam", "muon"])
    parser.add_argument("--std_coefficients", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--expansion_factor", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=BATCH_SIZE)
    parser.add_argument("--train_tokens", type=int, default=2_000_000,
                        help="training tokens per SAE (epochs over the cached corpus)")
    parser.add_argument("--eval_tokens", type=int, default=16_384)
    parser.add_argument("--ce_tokens", type=int, default=8192,
                        help="tokens for the CE-loss score (0 skips it)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads (1 is steadiest on a machine shared with others)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true",
                        help="retrain every SAE instead of reusing finished runs from the JSON")
    add_common_arguments(parser)
    known = parser.parse_known_args()[0]
    if known.quick or known.smoke:
        parser.set_defaults(**(SMOKE if known.smoke else QUICK))
    return parser.parse_args()


def finished_runs(args: argparse.Namespace) -> dict[str, dict]:
    """`{name: row}` of an earlier run of this sweep with the same recipe (unless `--fresh`).

    Results are written after every SAE, so an interrupted sweep, or the same sweep with more
    architectures, k or optimizers, trains only what is missing.
    """
    path = args.results_dir / f"{RESULTS_NAME}.json"
    if args.fresh or not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    if any(earlier["settings"].get(key) != getattr(args, key) for key in RECIPE_SETTINGS):
        return {}
    return {row["name"]: row for row in earlier["runs"]}


def add_ce_loss_scores(rows: list[dict], trained: dict[str, DeepSAEModel], device: str,
                       tokens: int, source: ActivationSource) -> None:
    """The CE-loss score of the best run per (architecture, k); earlier runs keep theirs."""
    to_score = {row["name"]: trained[row["name"]] for row in best_runs(rows).values()
                if row["name"] in trained}
    scores = ce_loss_scores(to_score, tokens, device, source) if to_score else {}
    for row in rows:
        if row["name"] in trained or "ce_loss_score" not in row:
            row["ce_loss_score"] = scores.get(row["name"], math.nan)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    source = activation_source(args)
    train, held_out = train_eval_split(source.cached(), args.eval_tokens, args.seed)
    d_in = train.shape[1]
    n_total_latents = args.expansion_factor * d_in
    grid = list(itertools.product(args.architectures, args.ks, args.optimizers,
                                  args.std_coefficients))
    finished = finished_runs(args)
    print(f"{len(grid)} SAEs x {args.train_tokens} tokens ({train.shape[0]} distinct) on "
          f"{args.device}; {len(finished)} already trained; load average {os.getloadavg()}")
    rows: list[dict] = []
    trained: dict[str, DeepSAEModel] = {}  # this invocation's SAEs, for the CE-loss score
    for architecture, k, optimizer, std_coefficient in grid:
        name = f"{architecture} k={k} {optimizer} std={std_coefficient:g}"
        if name in finished:
            rows.append(finished[name])
            continue
        config = sae_config(architecture, k, n_total_latents, std_coefficient, source, d_in)
        sae, dead_fraction, seconds = train_one(config, optimizer, train, args)
        row = {"name": name, "architecture": architecture, "k": k, "optimizer": optimizer,
               "std_coefficient": std_coefficient, "n_total_latents": config.n_total_latents,
               "dead_fraction": dead_fraction, "train_s": seconds,
               **held_out_metrics(sae, held_out, args.device)}
        print(f"{name}: FVU {row['fvu']:.4f} L0 {row['l0']:.1f} dead {dead_fraction:.1%} "
              f"({seconds:.0f} s)", flush=True)
        rows.append(row)
        trained[name] = sae
        write_results(RESULTS_NAME, {"settings": vars(args), "runs": rows}, args.results_dir)
    if args.ce_tokens:
        add_ce_loss_scores(rows, trained, args.device, args.ce_tokens, source)
    print()
    print_table(rows, ["architecture", "k", "optimizer", "std_coefficient", "fvu", "l0",
                       "dead_fraction", "held_out_dead_fraction", "ce_loss_score", "train_s"])
    write_results(RESULTS_NAME, {"settings": vars(args), "runs": rows}, args.results_dir)
    plot_frontier(rows, str(args.results_dir / "fvu_vs_l0.png"))


if __name__ == "__main__":
    main()
