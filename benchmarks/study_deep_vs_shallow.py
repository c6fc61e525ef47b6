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
  1/stages of the latents), and Matryoshka versions of shallow and deep-2x (`matryoshka`,
  `deep-2x-matryoshka`: nested prefixes of n/16, n/4 and all n latents, see `MATRYOSHKA`);
- total L0 (k) in 8, 16, 32, 64; optimizer Adam vs Muon; std-of-pre-activation penalty off/on.

Reports held-out FVU, L0, dead % (no firing in the last 10% of training tokens) and held-out dead %,
and, for the best recipe per (architecture, k), the CE-loss score and the spliced KL on text none
of them trained on (docstrings of Python standard-library modules); plots the FVU-vs-L0 frontier
per architecture. `--interpretability` adds the absorption and sparse-probing benchmarks of
`hf_deepsae.evaluation` (as `study_interpretability.py` runs them) for those best SAEs, which are
kept under `--work_dir` so that a later run can score them without training them again.
`--kl_finetune_tokens N` fine-tunes a copy of each best SAE on the model's KL for N tokens
(`hf_deepsae.training.end_to_end.fine_tune_on_kl` with `examples/kl_finetune.py`'s recipe) and
scores it alike, as architecture `<architecture>+kl`.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import torch
from common import (
    BATCH_SIZE,
    DEFAULT_CACHE_DIR,
    ActivationSource,
    activation_source,
    add_common_arguments,
    add_interpretability_arguments,
    batches,
    interpretability_scores,
    interpretability_suite,
    make_train_step,
    print_table,
    train_eval_split,
    write_results,
)
from datasets import Dataset

from hf_deepsae import DeepSAEConfig, DeepSAEModel
from hf_deepsae.activations import load_language_model, tokenize_and_chunk
from hf_deepsae.evaluation import ActivationMetrics, BenchmarkSuite, evaluate_saes
from hf_deepsae.training.config import TrainingConfig
from hf_deepsae.training.dead_latents import DeadLatentCounter
from hf_deepsae.training.end_to_end import KL_FINE_TUNE_RECIPE, fine_tune_on_kl
from hf_deepsae.training.optim import build_optimizers, build_scheduler

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MATRYOSHKA = {"matryoshka": "shallow", "deep-2x-matryoshka": "deep-2x"}
"""Matryoshka architectures and the architecture each one trains with nested prefixes."""
MATRYOSHKA_DIVISORS = (16, 4)
"""Prefixes of n/16 and n/4 latents before all n: geometric steps, as the nested dictionaries of
Bussmann et al. (2025) grow, and even the smallest (144 of the quick sweep's 2,304 latents) has
several times k latents, so it can reconstruct on its own with the full SAE's top-k truncated."""
ARCHITECTURES = ("shallow", "mlp-encoder", "deep", "deep-2x",
                 *(f"stacked-{stages}" for stages in range(2, 6)), *MATRYOSHKA)
QUICK = {"expansion_factor": 4, "batch_size": 1024, "train_tokens": 98_304, "ks": [8, 16, 32, 64],
         "optimizers": ["adam", "muon"], "std_coefficients": [0.0, 0.05], "ce_tokens": 1024}
SMOKE = {"architectures": ["shallow", "deep", "stacked-2", "matryoshka"], "ks": [8],
         "optimizers": ["muon"], "std_coefficients": [0.0], "expansion_factor": 2,
         "batch_size": 64, "train_tokens": 128, "eval_tokens": 256, "ce_tokens": 32,
         "interpretability": True, "absorption_words": 300, "probing_per_class": 8,
         "kl_finetune_tokens": 128, "fresh": True}
RESULTS_NAME = "study_deep_vs_shallow"
PLOT_NAME = "fvu_vs_l0"
RECIPE_SETTINGS = ("expansion_factor", "batch_size", "train_tokens", "eval_tokens", "seed",
                   "ce_tokens")
"""What makes two sweeps' runs comparable; a run's name says the rest (architecture, k, ...)."""
CE_MODULES = ["argparse", "collections", "contextlib", "dataclasses", "functools", "itertools",
              "json", "logging", "os", "pathlib", "re", "subprocess", "threading", "typing",
              "unittest", "urllib.request", "email", "asyncio", "inspect", "textwrap"]


def architecture_fields(architecture: str, d_in: int, n_total_latents: int) -> dict:
    """`DeepSAEConfig` fields of an architecture; dense layers are d_in or 2·d_in wide."""
    if architecture in MATRYOSHKA:
        return {**architecture_fields(MATRYOSHKA[architecture], d_in, n_total_latents),
                "matryoshka_prefixes": [n_total_latents // d for d in MATRYOSHKA_DIVISORS]}
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
    overrides = architecture_fields(architecture, d_in, n_total_latents)
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


def spliced_metrics(saes: dict[str, DeepSAEModel], model: torch.nn.Module, tokenizer: Any,
                    tokens: int, source: ActivationSource) -> dict[str, dict[str, float]]:
    """CE-loss score and KL(clean ‖ spliced) (nats per token) of each SAE spliced alone into the
    language model, on stdlib docstrings (text no SAE trained on)."""
    documents = [importlib.import_module(name).__doc__ or "" for name in CE_MODULES]
    chunks = tokenize_and_chunk(Dataset.from_dict({"text": documents}), tokenizer,
                                source.context_length)
    count = min(len(chunks), max(1, tokens // source.context_length))
    token_batches = [chunks[i:i + 4]["input_ids"] for i in range(0, count, 4)]
    result = evaluate_saes(model, saes, token_batches)
    return {name: {"ce_loss_score": metrics.ce_loss_score, "kl_spliced": metrics.kl_spliced}
            for name, metrics in result.language_model.items()}


def best_runs(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """The lowest-FVU run per (architecture, k): the recipe that represents each cell."""
    best: dict[tuple[str, int], dict] = {}
    for row in rows:
        key = (row["architecture"], row["k"])
        if key not in best or row["fvu"] < best[key]["fvu"]:
            best[key] = row
    return best


def plot_frontier(rows: list[dict], path: Path) -> None:
    """FVU vs L0: every run as a faint point, the best recipe per (architecture, k) as a line."""
    figure, axis = plt.subplots(figsize=(7, 5))
    for index, architecture in enumerate(dict.fromkeys(row["architecture"] for row in rows)):
        color = f"C{index}"
        runs = [row for row in rows if row["architecture"] == architecture]
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
                        help="tokens for the CE-loss score and spliced KL (0 skips them)")
    parser.add_argument("--interpretability", action="store_true",
                        help="also run absorption and sparse probing on the best SAE per "
                             "(architecture, k)")
    parser.add_argument("--kl_finetune_tokens", type=int, default=0,
                        help="fine-tune a copy of the best SAE per (architecture, k) on the "
                             "model's KL for this many tokens and report it as "
                             "'<architecture>+kl' (0: none)")
    parser.add_argument("--kl_lm_batch_size", type=int, default=TrainingConfig.lm_batch_size,
                        help="sequences per KL fine-tuning step (fewer: more steps of the same "
                             "tokens)")
    parser.add_argument("--results_name", default=RESULTS_NAME,
                        help="the JSON's name in --results_dir (and the plot's, unless it is "
                             f"{RESULTS_NAME}, whose plot is {PLOT_NAME}.png)")
    parser.add_argument("--work_dir", type=Path, default=None,
                        help="where the best SAE per (architecture, k) is kept (default: "
                             f"{DEFAULT_CACHE_DIR}/<results_name>)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads (1 is steadiest on a machine shared with others)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true",
                        help="retrain every SAE instead of reusing finished runs from the JSON")
    add_interpretability_arguments(parser)
    add_common_arguments(parser)
    known = parser.parse_known_args()[0]
    if known.quick or known.smoke:
        parser.set_defaults(**(SMOKE if known.smoke else QUICK))
    args = parser.parse_args()
    args.work_dir = args.work_dir or DEFAULT_CACHE_DIR / args.results_name
    return args


def plot_path(args: argparse.Namespace) -> Path:
    """The README shows the main sweep's plot as `fvu_vs_l0.png`; any other results name gets a
    plot of its own name, so a focused sweep never overwrites it."""
    name = PLOT_NAME if args.results_name == RESULTS_NAME else args.results_name
    return args.results_dir / f"{name}.png"


def recipe(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for key in RECIPE_SETTINGS}


def finished_runs(args: argparse.Namespace) -> dict[str, dict]:
    """`{name: row}` of an earlier run of this sweep with the same recipe (unless `--fresh`).

    Results are written after every SAE, so an interrupted sweep, or the same sweep with more
    architectures, k or optimizers, trains only what is missing.
    """
    path = args.results_dir / f"{args.results_name}.json"
    if args.fresh or not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    if any(earlier["settings"].get(key) != value for key, value in recipe(args).items()):
        return {}
    return {row["name"]: row for row in earlier["runs"]}


def cell_folder(row: dict, args: argparse.Namespace) -> Path:
    return args.work_dir / f"{row['architecture']}_k{row['k']}"


def keep_if_best(sae: DeepSAEModel, row: dict, rows: list[dict], args: argparse.Namespace
                 ) -> None:
    """Save `sae` as its cell's SAE when its run is the cell's best so far (one SAE per cell on
    disk, not one per recipe), marked with its run's name and the sweep's recipe."""
    if best_runs(rows)[row["architecture"], row["k"]] is row:
        sae.config.training_config = {"study_run": row["name"], "study_recipe": recipe(args)}
        sae.save_pretrained(cell_folder(row, args))


def best_saes(rows: list[dict], trained: dict[str, DeepSAEModel], args: argparse.Namespace
              ) -> dict[str, DeepSAEModel]:
    """`{name: SAE}` of the best run per (architecture, k): trained now, or kept in `--work_dir`
    by an earlier run of the same recipe (cells with neither are left out, and said so); the
    KL fine-tuned copies are not among them."""
    saes = {}
    for row in best_runs([row for row in rows if "fine_tuned_from" not in row]).values():
        folder = cell_folder(row, args)
        if row["name"] in trained:
            saes[row["name"]] = trained[row["name"]]
        elif (folder / "config.json").is_file() and (
                json.loads((folder / "config.json").read_text()).get("training_config")
                == {"study_run": row["name"], "study_recipe": recipe(args)}):
            saes[row["name"]] = DeepSAEModel.from_pretrained(folder).to(args.device).eval()
        else:
            print(f"{row['name']}: not in {folder}, so not scored beyond its FVU (--fresh "
                  "trains it again)")
    return saes


def add_spliced_metrics(rows: list[dict], saes: dict[str, DeepSAEModel], model: torch.nn.Module,
                        tokenizer: Any, args: argparse.Namespace, source: ActivationSource
                        ) -> None:
    """The CE-loss score and spliced KL of the best SAEs that have none yet; NaN for the rest."""
    to_score = {row["name"]: saes[row["name"]] for row in rows
                if row["name"] in saes and math.isnan(row.get("kl_spliced", math.nan))}
    scores = (spliced_metrics(to_score, model, tokenizer, args.ce_tokens, source)
              if to_score else {})
    for row in rows:
        row.update(scores.get(row["name"], {}))
        for key in ("ce_loss_score", "kl_spliced"):
            row.setdefault(key, math.nan)


def add_interpretability(rows: list[dict], saes: dict[str, DeepSAEModel],
                         suite: Callable[[], BenchmarkSuite], args: argparse.Namespace) -> None:
    """Absorption and sparse-probing numbers of the best SAEs that have none yet, each row
    written as soon as it is scored."""
    for row in rows:
        if row["name"] not in saes or "benchmark_s" in row:
            continue
        row.update(interpretability_scores(suite(), saes[row["name"]]))
        print(f"{row['name']}: absorption fraction {row.get('absorption_fraction')}, sparse "
              f"probing top-1 {row['sparse_probing_top_1_accuracy']:.3f}", flush=True)
        save(rows, args)


def add_kl_finetuned(rows: list[dict], saes: dict[str, DeepSAEModel], model: torch.nn.Module,
                     tokenizer: Any, held_out: torch.Tensor, suite: Callable[[], BenchmarkSuite],
                     args: argparse.Namespace, source: ActivationSource) -> None:
    """A row `<architecture>+kl` per best SAE: a copy fine-tuned on KL(clean ‖ spliced) for
    `--kl_finetune_tokens` tokens, then scored as the best SAEs are (each row written when done).

    The fine-tune reads the corpus's first chunks in the order the activation cache was built
    from (`ActivationSource.token_chunks`), so up to 16,384 tokens it sees only the cache's first
    shard; where that shard is a training one (the default cache), no held-out row.
    """
    config = TrainingConfig(**KL_FINE_TUNE_RECIPE, total_tokens=args.kl_finetune_tokens,
                            lm_batch_size=args.kl_lm_batch_size,
                            context_length=source.context_length, seed=args.seed)
    done = {row["name"] for row in rows}
    for row in [row for row in rows if row["name"] in saes]:
        name = f"{row['name']} +kl {args.kl_finetune_tokens}"
        if name in done:
            continue
        sae = copy.deepcopy(saes[row["name"]])
        start = time.perf_counter()
        fine_tune_on_kl(model, sae, source.token_chunks(tokenizer, config.lm_batch_size), config)
        tuned = {"name": name, "architecture": f"{row['architecture']}+kl",
                 **{key: row[key] for key in ("k", "optimizer", "std_coefficient",
                                              "n_total_latents")},
                 "fine_tuned_from": row["name"], "kl_finetune_tokens": args.kl_finetune_tokens,
                 "kl_lm_batch_size": args.kl_lm_batch_size,
                 "train_s": time.perf_counter() - start,
                 **held_out_metrics(sae, held_out, args.device)}
        if args.ce_tokens:
            tuned.update(spliced_metrics({name: sae}, model, tokenizer, args.ce_tokens,
                                         source)[name])
        if args.interpretability:
            tuned.update(interpretability_scores(suite(), sae))
        print(f"{name}: FVU {row['fvu']:.4f} -> {tuned['fvu']:.4f}, spliced KL "
              f"{row.get('kl_spliced', math.nan):.4f} -> {tuned.get('kl_spliced', math.nan):.4f}",
              flush=True)
        rows.append(tuned)
        save(rows, args)


def save(rows: list[dict], args: argparse.Namespace) -> None:
    write_results(args.results_name, {"settings": vars(args), "runs": rows}, args.results_dir)


def train_grid(train: torch.Tensor, held_out: torch.Tensor, args: argparse.Namespace,
               source: ActivationSource) -> tuple[list[dict], dict[str, DeepSAEModel]]:
    """Every run of the grid: finished ones from the JSON, the rest trained now (written after
    each); returns the rows and this invocation's SAEs."""
    d_in = train.shape[1]
    n_total_latents = args.expansion_factor * d_in
    grid = list(itertools.product(args.architectures, args.ks, args.optimizers,
                                  args.std_coefficients))
    finished = finished_runs(args)
    print(f"{len(grid)} SAEs x {args.train_tokens} tokens ({train.shape[0]} distinct) on "
          f"{args.device}; {len(finished)} already trained; load average {os.getloadavg()}")
    rows: list[dict] = []
    trained: dict[str, DeepSAEModel] = {}
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
        keep_if_best(sae, row, rows, args)
        save(rows, args)
    names = {row["name"] for row in rows}
    rows += [row for row in finished.values() if row.get("fine_tuned_from") in names]
    return rows, trained


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    source = activation_source(args)
    train, held_out = train_eval_split(source.cached(), args.eval_tokens, args.seed)
    rows, trained = train_grid(train, held_out, args, source)
    if args.ce_tokens or args.interpretability or args.kl_finetune_tokens:
        saes = best_saes(rows, trained, args)
        model, tokenizer = load_language_model(source.model_name_or_path, dtype=torch.float32,
                                               device=args.device)
        suite = functools.cache(lambda: interpretability_suite(model, tokenizer, args))
        if args.ce_tokens:
            add_spliced_metrics(rows, saes, model, tokenizer, args, source)
            save(rows, args)
        if args.interpretability:
            add_interpretability(rows, saes, suite, args)
        if args.kl_finetune_tokens:
            add_kl_finetuned(rows, saes, model, tokenizer, held_out, suite, args, source)
    print()
    columns = ["architecture", "k", "optimizer", "std_coefficient", "fvu", "l0", "dead_fraction",
               "held_out_dead_fraction", "ce_loss_score", "kl_spliced", "absorption_fraction",
               "sparse_probing_top_1_accuracy", "train_s"]
    print_table(rows, [column for column in columns if any(column in row for row in rows)])
    save(rows, args)
    plot_frontier(rows, plot_path(args))


if __name__ == "__main__":
    main()
