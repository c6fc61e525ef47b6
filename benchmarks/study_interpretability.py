"""Is a deep SAE better, or only lower-FVU? Absorption and sparse probing at equal L0.

    python benchmarks/study_interpretability.py --quick --threads 2  # the README's table
    python benchmarks/study_interpretability.py                      # 4,608 latents, 250k tokens
    python benchmarks/study_interpretability.py --smoke --results_dir /tmp/smoke  # a minute
    python benchmarks/study_interpretability.py --judge_base_url http://localhost:8000/v1 \\
        --judge_model Qwen/Qwen2.5-7B-Instruct                       # adds the auto-interp column

Shallow TopK, MLP-encoder, deep (1152-wide dense layers on both sides, LayerNorm: the default
deep recipe) and stacked (4 residual top-k stages) SAEs with the same total latents are trained at
the same total L0 (k) on the cached SmolLM2-135M-Instruct layer-6 MLP-output activations, with
the recipe of `study_deep_vs_shallow.py` (AuxK, Muon + AdamW at the trainer's learning rates),
then scored on held-out activations (FVU, L0) and by `hf_deepsae.evaluation`'s judge-free
interpretability benchmarks on the same model and site:

- absorption (first-letter task on the model's vocabulary): absorption fraction, full absorption
  rate, first-letter F1 of the best latent and of each letter's main latents;
- sparse probing (offline tasks: source of a passage among Python's docs, stdlib docstrings and
  the Bible; code vs prose): test accuracy of probes on 1, 2, 5 and 20 latents and on all.

With `--judge_base_url`, every SAE also gets auto-interp detection and fuzzing scores. Trained SAEs
are saved under `--work_dir` and every SAE's row is written to the JSON as soon as it is done, so
an interrupted run (or a wider grid) resumes where it stopped; `--rescore` scores the trained SAEs
again (after a change to the benchmarks), `--fresh` starts over.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import matplotlib
import torch
from common import (
    DEFAULT_CACHE_DIR,
    ActivationSource,
    activation_source,
    add_common_arguments,
    add_interpretability_arguments,
    interpretability_scores,
    interpretability_suite,
    machine,
    print_table,
    train_eval_split,
)
from study_deep_vs_shallow import held_out_metrics, sae_config, train_one

from hf_deepsae import DeepSAEModel
from hf_deepsae.activations import (
    load_language_model,
    load_text_dataset,
    tokenize_and_chunk,
)
from hf_deepsae.evaluation import BenchmarkSuite
from hf_deepsae.evaluation.autointerp import AutoInterpConfig
from hf_deepsae.files import atomic_write_json, read_json
from hf_deepsae.interpret.judges import JudgeConfig
from hf_deepsae.sites import capture_activations

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS_NAME = "study_interpretability"
ARCHITECTURES = ["shallow", "mlp-encoder", "deep-2x", "stacked-4"]
LABELS = {"shallow": "shallow TopK", "mlp-encoder": "MLP encoder (576)",
          "deep-2x": "deep (1152, LayerNorm)", "stacked-4": "stacked x4"}
SETTINGS = ("expansion_factor", "batch_size", "train_tokens", "eval_tokens", "seed", "optimizer",
            "absorption_words", "probing_per_class", "judge_model", "smoke", "quick",
            "model_name_or_path", "hookpoint", "dataset_name", "context_length")
"""What makes two runs' rows comparable (a row's name says the architecture and k)."""
QUICK = {"expansion_factor": 4, "train_tokens": 98_304}
"""The budget of `study_deep_vs_shallow.py --quick` (2,304 latents, one pass over the corpus)."""
SMOKE = {"expansion_factor": 1, "batch_size": 256, "train_tokens": 512, "eval_tokens": 512,
         "ks": [8], "absorption_words": 300, "probing_per_class": 8}
COLUMNS = [
    ("fvu", "FVU"), ("l0", "L0"), ("dead_fraction", "dead"),
    ("absorption_fraction", "absorption"), ("full_absorption_rate", "full abs."),
    ("first_letter_f1", "letter F1 (1)"), ("first_letter_main_latents_f1", "letter F1 (main)"),
    ("sparse_probing_top_1_accuracy", "probe@1"), ("sparse_probing_top_5_accuracy", "probe@5"),
    ("sparse_probing_top_20_accuracy", "probe@20"),
    ("sparse_probing_sae_accuracy", "probe@all"),
    ("autointerp_detection_balanced_accuracy", "detection"),
    ("autointerp_fuzzing_balanced_accuracy", "fuzzing"),
]
"""Row key and table title of every number the study reports, in table order."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"2-CPU-core budget: {QUICK} (explicit flags still win)")
    parser.add_argument("--architectures", nargs="+", default=ARCHITECTURES,
                        choices=ARCHITECTURES)
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--expansion_factor", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=1024)
    parser.add_argument("--train_tokens", type=int, default=250_000)
    parser.add_argument("--eval_tokens", type=int, default=16_384)
    parser.add_argument("--optimizer", default="muon", choices=["adam", "muon"])
    parser.add_argument("--judge_base_url", default=None)
    parser.add_argument("--judge_model", default=None)
    parser.add_argument("--work_dir", type=Path, default=DEFAULT_CACHE_DIR / RESULTS_NAME,
                        help="where trained SAEs are kept (to resume)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="retrain and rescore every SAE")
    parser.add_argument("--rescore", action="store_true",
                        help="rescore every SAE, reusing the trained ones in --work_dir")
    add_interpretability_arguments(parser)
    add_common_arguments(parser)
    known = parser.parse_known_args(argv)[0]
    if known.quick or known.smoke:
        parser.set_defaults(**(SMOKE if known.smoke else QUICK))
    return parser.parse_args(argv)


def live_activations(model: torch.nn.Module, tokenizer, n_tokens: int,
                     source: ActivationSource) -> torch.Tensor:
    """`[rows, d]` activations of the first chunks of the source's corpus (for `--smoke`)."""
    chunks = tokenize_and_chunk(load_text_dataset(source.dataset_name), tokenizer,
                                source.context_length)
    ids = torch.as_tensor(chunks[:max(1, n_tokens // source.context_length)]["input_ids"])
    activations = capture_activations(model, ids, [source.hookpoint])[source.hookpoint]
    return activations.reshape(-1, activations.shape[-1]).float()


def finished_rows(args: argparse.Namespace) -> dict[str, dict]:
    path = args.results_dir / f"{RESULTS_NAME}.json"
    if args.fresh or args.rescore or not path.is_file():
        return {}
    earlier = read_json(path, required=("settings", "runs"),
                        fix="pass --fresh to start over (or delete the file)")
    if any(earlier["settings"].get(key) != getattr(args, key) for key in SETTINGS):
        return {}
    return {row["name"]: row for row in earlier["runs"]}


def trained_sae(name: str, architecture: str, k: int, train: torch.Tensor,
                args: argparse.Namespace, source: ActivationSource
                ) -> tuple[DeepSAEModel, dict]:
    """The SAE from `--work_dir` if this recipe trained it before, else trained now and saved."""
    folder = args.work_dir / name.replace(" ", "_").replace("=", "")
    recipe = {key: getattr(args, key) for key in SETTINGS}
    record_path = folder / "study_recipe.json"
    if not args.fresh and record_path.is_file():
        record = read_json(record_path, required=("recipe", "training"),
                           fix="pass --fresh to train again (or delete the folder)")
        if record["recipe"] == recipe:
            return DeepSAEModel.from_pretrained(folder).to(args.device).eval(), record["training"]
    d_in = train.shape[1]
    config = sae_config(architecture, k, args.expansion_factor * d_in, 0.0, source, d_in)
    sae, dead_fraction, seconds = train_one(config, args.optimizer, train, args)
    sae.save_pretrained(folder)
    training = {"dead_fraction": dead_fraction, "train_s": seconds}
    atomic_write_json(record_path, {"recipe": recipe, "training": training})
    return sae, training


def suite_for(args: argparse.Namespace, model: torch.nn.Module, tokenizer) -> BenchmarkSuite:
    """Absorption and sparse probing, plus auto-interp with `--judge_base_url`."""
    if not args.judge_base_url:
        return interpretability_suite(model, tokenizer, args)
    judge = JudgeConfig(judge_model=args.judge_model, judge_base_url=args.judge_base_url,
                        judge_cache=str(args.work_dir / "judge_cache.sqlite"))
    autointerp = AutoInterpConfig()
    chunks = tokenize_and_chunk(load_text_dataset(args.dataset_name), tokenizer,
                                autointerp.context_length)
    corpus = torch.as_tensor(chunks[:autointerp.n_tokens // autointerp.context_length]["input_ids"])
    return interpretability_suite(model, tokenizer, args, autointerp=autointerp, judge=judge,
                                  corpus_ids=corpus)


def plot(rows: list[dict], path: Path, site: str) -> None:
    """One panel per benchmark number, L0 on x, one line per architecture."""
    metrics = [(key, title) for key, title in COLUMNS[3:] if any(key in row for row in rows)]
    columns = 3
    figure, axes = plt.subplots((len(metrics) + columns - 1) // columns, columns,
                                figsize=(12, 3.2 * ((len(metrics) + columns - 1) // columns)),
                                squeeze=False)
    for axis, (key, title) in zip(axes.flat, metrics, strict=False):
        for architecture in ARCHITECTURES:
            line = sorted((row for row in rows if row["architecture"] == architecture
                           and row.get(key) is not None), key=lambda row: row["l0"])
            if line:
                axis.plot([r["l0"] for r in line], [r[key] for r in line], marker="o",
                          label=LABELS[architecture])
        axis.set(title=title, xlabel="L0 (held out)")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(metrics):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize="small")
    figure.suptitle(f"{site}: interpretability at equal L0")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def write_results(path: Path, args: argparse.Namespace, rows: list[dict], **extra: float) -> None:
    settings = {key: str(value) if isinstance(value, Path) else value
                for key, value in vars(args).items()}
    atomic_write_json(path, {"machine": machine(), "settings": settings, "runs": rows, **extra})



def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    finished = finished_rows(args)
    grid = [(f"{architecture} k={k}", architecture, k)
            for k in args.ks for architecture in args.architectures]
    print(f"{len(grid)} SAEs, {sum(name in finished for name, _, _ in grid)} already scored; "
          f"load average {os.getloadavg()}")
    if any(name not in finished for name, _, _ in grid):
        source = activation_source(args)
        model, tokenizer = load_language_model(source.model_name_or_path, dtype=torch.float32,
                                               device=args.device)
        activations = (live_activations(model, tokenizer, args.train_tokens + args.eval_tokens,
                                        source)
                       if args.smoke else source.cached())
        train, held_out = train_eval_split(activations, args.eval_tokens, args.seed)
        suite = suite_for(args, model, tokenizer)
    rows, path = [], args.results_dir / f"{RESULTS_NAME}.json"
    for name, architecture, k in grid:
        if name in finished:
            rows.append(finished[name])
            continue
        sae, training = trained_sae(name, architecture, k, train, args, source)
        row = {"name": name, "architecture": architecture, "k": k, **training,
               **held_out_metrics(sae, held_out, args.device),
               **interpretability_scores(suite, sae)}
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{key} {row[key]:.3f}" for key, _ in COLUMNS
                                      if row.get(key) is not None), flush=True)
        write_results(path, args, rows)
    shown = [title for key, title in COLUMNS if any(row.get(key) is not None for row in rows)]
    print_table([{"SAE": row["name"]} | {title: row.get(key) for key, title in COLUMNS}
                 for row in rows], ["SAE", *shown])
    write_results(path, args, rows, total_s=time.perf_counter() - start)
    plot(rows, args.results_dir / f"{RESULTS_NAME}.png",
         f"{Path(args.model_name_or_path).name} {args.hookpoint}")
    return rows


if __name__ == "__main__":
    main()
