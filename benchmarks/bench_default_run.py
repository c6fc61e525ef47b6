"""The README's default run, timed part by part, from an empty activation cache.

    python benchmarks/bench_default_run.py                  # the default run, as a new user's
    python benchmarks/bench_default_run.py --compare_adam   # and the Adam recipe's step time
    python benchmarks/bench_default_run.py -- --total_tokens 500000   # any examples/train.py flags

One ordinary `hf_deepsae.training.train()` call with `examples/train.py`'s defaults (what `python
examples/train.py` runs, and on one process what `accelerate launch examples/train.py` does),
writing into a fresh temporary folder (output and activation cache), so the activation caching
of a first run is part of the time. The parts are timed by wrapping the functions the trainer
calls (attributes of `hf_deepsae.training.trainer`): reading the corpus, loading the language
model, tokenising, activation caching (one pass of the model over the corpus into the cache), SAE
setup (initialised from the first batch, `prepare`d), training (every optimizer step, with logging
and checkpoints; the first 10 steps also on their own), held-out evaluation and saving. Imports
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

from hf_deepsae.training import parse_args, train  # noqa: E402
from hf_deepsae.training import trainer as trainer_module  # noqa: E402

IMPORTS_S = time.perf_counter() - SCRIPT_START
PARTS = {  # trainer function → the part of the run it is
    "load_text_dataset": "corpus",
    "load_language_model": "model load",
    "tokenize_and_chunk": "tokenising",
    "open_or_build_cache": "activation caching",
    "_build_runs": "SAE setup",
    "evaluate_runs": "held-out evaluation",
    "save_saes": "saving",
}
SMOKE = ["--eval_tokens", "256", "--batch_size", "64", "--shuffle_buffer_size", "320",
         "--total_tokens", "1280", "--log_with", "none", "--checkpointing_steps", "0"]


@contextlib.contextmanager
def timed_parts() -> Iterator[dict[str, Any]]:
    """Wrap the trainer's functions; yields `{"spans": [(part, start, end)], "steps": [end]}`."""
    record: dict[str, Any] = {"spans": [], "steps": []}

    def timing(name: str, function: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                end = time.perf_counter()
                if name == "_train_step":
                    record["steps"].append(end)
                else:
                    record["spans"].append((PARTS[name], start, end))
        return wrapper

    originals = {name: getattr(trainer_module, name) for name in [*PARTS, "_train_step"]}
    for name, function in originals.items():
        setattr(trainer_module, name, timing(name, function))
    try:
        yield record
    finally:
        for name, function in originals.items():
            setattr(trainer_module, name, function)


def timed_run(train_args: list[str]) -> dict[str, Any]:
    """One `train()` with `train_args`; its parts, step times, held-out metrics and dtypes."""
    config, sae_arguments = parse_args(train_args)
    start = time.perf_counter()
    try:
        with timed_parts() as record:
            saes = train(config, sae_arguments)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    total = time.perf_counter() - start
    parts: dict[str, float] = {}
    for part, span_start, span_end in record["spans"]:
        parts[part] = parts.get(part, 0.0) + span_end - span_start
    setup_end = max(end for part, _, end in record["spans"] if part == "SAE setup")
    evaluation_start = min(start for part, start, _ in record["spans"]
                           if part == "held-out evaluation")
    parts["training"] = evaluation_start - setup_end
    parts["other"] = total - sum(parts.values())
    step_ends = [setup_end, *record["steps"]]
    steps = [end - begin for begin, end in zip(step_ends, step_ends[1:], strict=False)]
    sae = next(iter(saes.values()))
    return {
        "optimizer": config.optimizer, "total_s": total, "parts_s": parts, "steps": len(steps),
        "first_10_steps_mean_s": statistics.mean(steps[:10]),
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
    args, train_flags = parser.parse_known_args()
    train_flags = [flag for flag in train_flags if flag != "--"]
    with tempfile.TemporaryDirectory(prefix="bench_default_run-") as folder:
        base = [*(SMOKE if args.smoke else []), "--output_dir", f"{folder}/out",
                "--activation_cache_dir", f"{folder}/cache", *train_flags]
        runs = [timed_run(base)]
        if args.compare_adam:
            runs.append(timed_run([*base, "--output_dir", f"{folder}/adam", "--optimizer",
                                   "adam"]))
    print(f"\nimports: {IMPORTS_S:.1f} s")
    rows = [{"optimizer": run["optimizer"], **run["parts_s"], "total": run["total_s"],
             "first 10 steps (mean s)": run["first_10_steps_mean_s"],
             "held-out FVU": run["held_out"]["fvu"], "dead": run["held_out"]["dead_fraction"]}
            for run in runs]
    print_table(rows, list(rows[0]))
    print(f"precision: {runs[0]['precision']}")
    results: dict[str, Any] = {"settings": {"train_flags": base[:-4] + train_flags},
                               "imports_s": IMPORTS_S, "runs": runs}
    if args.compare_adam:
        ratio = runs[0]["first_10_steps_mean_s"] / runs[1]["first_10_steps_mean_s"]
        results["first_10_steps_over_adam"] = ratio
        print(f"first 10 steps: {ratio:.2f}x the Adam recipe's")
    write_results(args.results_name, results, args.results_dir)


if __name__ == "__main__":
    main()
