"""The README's default run, timed part by part, from an empty activation cache.

    python benchmarks/bench_default_run.py                  # the default run, as a new user's
    python benchmarks/bench_default_run.py --compare_adam   # and the Adam recipe's step time
    python benchmarks/bench_default_run.py -- --total_tokens 500000   # any examples/train.py flags

One ordinary `hf_deepsae.training.train()` call with `examples/train.py`'s defaults (what `python
examples/train.py` runs, and on one process what `accelerate launch examples/train.py` does),
writing into a fresh temporary folder (output and activation cache), so the activation caching
of a first run is part of the time. The parts are timed by wrapping the functions the trainer
calls (attributes of the `hf_deepsae.training` modules that call them): reading the corpus,
loading the language model, tokenising, activation caching (one pass of the model over the
corpus into the cache), SAE setup (initialised from the first batch, `prepare`d), training
(every optimizer step, with logging and checkpoints; the first 10 steps also on their own),
held-out evaluation and saving. Imports
are timed from the start of this script. `--compare_adam` then trains the Adam recipe from the
same cache: issue 13's check is that the default (Muon) recipe's first 10 steps take at most
1.5x the Adam recipe's where bf16 is slow, and the whole run at most 6 minutes on 2 cores.
"""

from __future__ import annotations

import time

SCRIPT_START = time.perf_counter()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from common import RESULTS_DIR, print_table, write_results  # noqa: E402

from hf_deepsae.training import data, finish, parse_args, train, trainer  # noqa: E402

IMPORTS_S = time.perf_counter() - SCRIPT_START
PARTS = {  # (module, function it calls) → the part of the run it is
    (trainer, "load_text_dataset"): "corpus",
    (trainer, "load_language_model"): "model load",
    (trainer, "tokenize_and_chunk"): "tokenising",
    (data, "open_or_build_cache"): "activation caching",
    (trainer, "_build_runs"): "SAE setup",
    (finish, "evaluate_runs"): "held-out evaluation",
    (finish, "save_saes"): "saving",
}
STEP = (trainer, "_train_step")
SMOKE = ["--eval_tokens", "256", "--batch_size", "64", "--shuffle_buffer_size", "320",
         "--total_tokens", "1280", "--log_with", "none", "--checkpointing_steps", "0"]


def now() -> tuple[float, float]:
    """(wall-clock seconds, this process's CPU seconds over all threads)."""
    return time.perf_counter(), time.process_time()


@contextlib.contextmanager
def timed_parts() -> Iterator[dict[str, Any]]:
    """Wrap the trainer's functions; yields `{"spans": [(part, start, end)], "steps": [end]}`
    with `now()` pairs as times."""
    record: dict[str, Any] = {"spans": [], "steps": []}

    def timing(place: tuple[Any, str], function: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = now()
            try:
                return function(*args, **kwargs)
            finally:
                end = now()
                if place == STEP:
                    record["steps"].append(end)
                else:
                    record["spans"].append((PARTS[place], start, end))
        return wrapper

    originals = {place: getattr(*place) for place in [*PARTS, STEP]}
    for (module, name), function in originals.items():
        setattr(module, name, timing((module, name), function))
    try:
        yield record
    finally:
        for (module, name), function in originals.items():
            setattr(module, name, function)


def durations(record: dict[str, Any], start: tuple[float, float], end: tuple[float, float],
              clock: int) -> tuple[dict[str, float], list[float]]:
    """Seconds per part and per step on one clock (0: wall, 1: process CPU time)."""
    parts: dict[str, float] = {}
    for part, span_start, span_end in record["spans"]:
        parts[part] = parts.get(part, 0.0) + span_end[clock] - span_start[clock]
    setup_end = max(end[clock] for part, _, end in record["spans"] if part == "SAE setup")
    evaluation_start = min(start[clock] for part, start, _ in record["spans"]
                           if part == "held-out evaluation")
    parts["training"] = evaluation_start - setup_end
    parts["other"] = end[clock] - start[clock] - sum(parts.values())
    step_ends = [setup_end, *(step[clock] for step in record["steps"])]
    return parts, [b - a for a, b in zip(step_ends, step_ends[1:], strict=False)]


def timed_run(train_args: list[str]) -> dict[str, Any]:
    """One `train()` with `train_args`; its parts, step times, held-out metrics and dtypes, in
    wall-clock seconds and in CPU seconds (which other processes on a busy machine don't
    inflate; on an idle machine, wall ≈ CPU / threads where the work parallelises)."""
    config, sae_arguments = parse_args(train_args)
    start = now()
    try:
        with timed_parts() as record:
            saes = train(config, sae_arguments)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    end = now()
    parts, steps = durations(record, start, end, clock=0)
    cpu_parts, cpu_steps = durations(record, start, end, clock=1)
    sae = next(iter(saes.values()))
    return {
        "optimizer": config.optimizer, "total_s": end[0] - start[0], "parts_s": parts,
        "total_cpu_s": end[1] - start[1], "parts_cpu_s": cpu_parts, "steps": len(steps),
        "first_10_steps_mean_s": statistics.mean(steps[:10]),
        "first_10_steps_mean_cpu_s": statistics.mean(cpu_steps[:10]),
        "median_step_s": statistics.median(steps),
        "held_out": {key: sae.config.metrics[key] for key in ("fvu", "l0", "dead_fraction")},
        "precision": sae.config.training_config["precision"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare_adam", action="store_true",
                        help="also train the Adam recipe from the same cache")
    parser.add_argument("--results_dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--results_name", default="default_run")
    parser.add_argument("--smoke", action="store_true",
                        help=f"a tiny run: {' '.join(SMOKE)} (later train.py flags still win)")
    parser.add_argument("--work_dir", type=Path,
                        help="keep the outputs and activation cache here (must not hold a cache "
                             "yet); default: a temporary folder, deleted after")
    args, train_flags = parser.parse_known_args()
    train_flags = [flag for flag in train_flags if flag != "--"]
    if args.work_dir is not None and (args.work_dir / "cache").exists():
        parser.error(f"{args.work_dir}/cache exists: the run must start from an empty cache")
    with (contextlib.nullcontext(str(args.work_dir)) if args.work_dir else
          tempfile.TemporaryDirectory(prefix="bench_default_run-")) as folder:
        base = [*(SMOKE if args.smoke else []), "--output_dir", f"{folder}/out",
                "--activation_cache_dir", f"{folder}/cache", *train_flags]
        runs = [timed_run(base)]
        if args.compare_adam:
            runs.append(timed_run([*base, "--output_dir", f"{folder}/adam", "--optimizer",
                                   "adam"]))
    print(f"\nimports: {IMPORTS_S:.1f} s")
    rows = [{"optimizer": f"{run['optimizer']} ({clock})", **run[f"parts{suffix}"],
             "total": run[f"total{suffix}"],
             "first 10 steps (mean)": run[f"first_10_steps_mean{suffix}"],
             "held-out FVU": run["held_out"]["fvu"], "dead": run["held_out"]["dead_fraction"]}
            for run in runs for clock, suffix in (("wall s", "_s"), ("CPU s", "_cpu_s"))]
    print_table(rows, list(rows[0]))
    print(f"precision: {runs[0]['precision']}")
    results: dict[str, Any] = {"settings": {"train_flags": base[:-4] + train_flags},
                               "imports_s": IMPORTS_S, "runs": runs}
    if args.compare_adam:
        ratio = runs[0]["first_10_steps_mean_s"] / runs[1]["first_10_steps_mean_s"]
        cpu_ratio = runs[0]["first_10_steps_mean_cpu_s"] / runs[1]["first_10_steps_mean_cpu_s"]
        results["first_10_steps_over_adam"] = ratio
        results["first_10_steps_over_adam_in_cpu_time"] = cpu_ratio
        print(f"first 10 steps: {ratio:.2f}x the Adam recipe's ({cpu_ratio:.2f}x in CPU time)")
    write_results(args.results_name, results, args.results_dir)


if __name__ == "__main__":
    main()
