"""What every benchmark shares: the cached real activations, timing, machine facts and results.

The activations are SmolLM2-135M-Instruct's layer-6 MLP output (`model.layers.6.mlp.down_proj`)
over the offline default corpus (Python's documentation topics), computed once with the project's
own pipeline (`activations.load_language_model` → `tokenize_and_chunk` → `ModelActivations`, i.e.
`splice.capture_activations`) and written with `training.activation_cache` under
`--cache_dir`; later runs read the safetensors shards back (a complete cache never loads the
model). The last `eval_tokens` rows (whole, distinct token chunks) are held out. Every script takes
the same `--model_name_or_path/--hookpoint/--dataset_name/--context_length/--max_cached_tokens`
flags (the test suite runs each with `--smoke` on a tiny random model, from an empty cache) and
`--results_dir`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
from accelerate import PartialState

from hf_deepsae import DeepSAEModel
from hf_deepsae.activations import (
    EMBEDDED_MODEL_NAME,
    ModelActivations,
    TokenChunks,
    load_language_model,
    load_text_dataset,
    tokenize_and_chunk,
)
from hf_deepsae.evaluation import (
    AbsorptionConfig,
    BenchmarkSuite,
    SparseProbingConfig,
    benchmark_scalars,
)
from hf_deepsae.modeling_deepsae import DeepSAEOutput
from hf_deepsae.precision import device_precision
from hf_deepsae.training import update_sae
from hf_deepsae.training.activation_cache import (
    CachedActivations,
    find_cache,
    open_or_build_cache,
)
from hf_deepsae.training.dead_latents import DeadLatentCounter

HOOKPOINT = "model.layers.6.mlp.down_proj"
CONTEXT_LENGTH = 256
MAX_CACHED_TOKENS = 1 << 20
BATCH_SIZE = 4096
"""Tokens per training step in every benchmark (as in the issue: 4096-token batches)."""
RESULTS_DIR = Path(__file__).resolve().parent / "results"
LOAD_AVERAGE_AT_START = os.getloadavg()
"""1/5/15-minute load averages when the benchmark started (they include its own threads)."""
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_deepsae"
EMULATION_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY",
                       "HF_DEEPSAE_FAST_BF16", "HF_DEEPSAE_FAST_FP16")
"""Environment variables that change which kernels run (see README: emulating an AVX2 CPU)."""


@dataclasses.dataclass(frozen=True)
class ActivationSource:
    """Which activations a benchmark reads: a language model's output at one module, over a
    corpus (the offline default: Python's documentation), cut into `context_length` chunks."""

    model_name_or_path: str = EMBEDDED_MODEL_NAME
    hookpoint: str = HOOKPOINT
    dataset_name: str | None = None
    context_length: int = CONTEXT_LENGTH
    max_cached_tokens: int = MAX_CACHED_TOKENS
    cache_dir: str = str(DEFAULT_CACHE_DIR / "benchmark_activations")

    def token_chunks(self, tokenizer: Any, lm_batch_size: int = 8, seed: int = 0) -> TokenChunks:
        """The corpus's `context_length` chunks in the seeded order `cached()` builds the cache
        from: the first 64 chunks of 256 tokens are its first shard of 16,384 rows (`cached()`
        then reads the shards in a seeded order of their own and holds out the last rows read)."""
        chunks = tokenize_and_chunk(load_text_dataset(self.dataset_name), tokenizer,
                                    self.context_length)
        return TokenChunks(chunks, lm_batch_size, seed)

    def live(self, seed: int = 0, lm_batch_size: int = 8) -> ModelActivations:
        """Activations straight from the language model (loads it)."""
        model, tokenizer = load_language_model(self.model_name_or_path, dtype=torch.float32)
        return ModelActivations(model, {self.hookpoint: self.hookpoint},
                                self.token_chunks(tokenizer, lm_batch_size, seed))

    def cached(self) -> torch.Tensor:
        """All cached activation rows `[rows, d]` (float32), building the cache on first use.

        The cache holds one pass over the whole corpus (chunks in a seeded random order), so the
        tail rows used for held-out evaluation come from chunks spread over the corpus. A complete
        cache is read without loading the language model.
        """
        metadata = {"model_name_or_path": self.model_name_or_path, "lm_dtype": "float32",
                    "dataset_name": self.dataset_name, "context_length": self.context_length}
        start = time.perf_counter()
        build = find_cache(self.cache_dir, metadata, [self.hookpoint],
                           rows=self.max_cached_tokens)
        if build is None:
            print(f"caching {self.model_name_or_path} {self.hookpoint} activations into "
                  f"{self.cache_dir} ...", flush=True)
            cache = open_or_build_cache(
                self.live(), self.cache_dir, metadata, max_rows=self.max_cached_tokens,
                rows_per_shard=16_384, accelerator=PartialState(cpu=True), seed=0)
        else:
            cache = CachedActivations(build, [self.hookpoint])
        rows = torch.cat([cache.next_block()[self.hookpoint] for _ in cache.shards]).float()
        print(f"{rows.shape[0]:,} cached activation rows of {self.model_name_or_path} "
              f"{self.hookpoint} ({time.perf_counter() - start:.0f} s)", flush=True)
        return rows


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The activation source, `--results_dir` and `--smoke`, shared by every benchmark."""
    group = parser.add_argument_group("activations and results")
    group.add_argument("--model_name_or_path", default=EMBEDDED_MODEL_NAME)
    group.add_argument("--hookpoint", default=HOOKPOINT)
    group.add_argument("--dataset_name", default=None,
                       help="default: Python's documentation (offline)")
    group.add_argument("--context_length", type=int, default=CONTEXT_LENGTH)
    group.add_argument("--max_cached_tokens", type=int, default=MAX_CACHED_TOKENS)
    group.add_argument("--cache_dir", default=ActivationSource.cache_dir,
                       help="activation cache root (built on first use)")
    group.add_argument("--results_dir", type=Path, default=RESULTS_DIR,
                       help="where the JSON (and PNG) results go")
    group.add_argument("--smoke", action="store_true",
                       help="a few tiny steps of everything (with a tiny --model_name_or_path: "
                            "the test suite's check that the script runs end to end)")


def add_interpretability_arguments(parser: argparse.ArgumentParser) -> None:
    """The sizes of the absorption and sparse-probing benchmarks (`interpretability_suite`)."""
    group = parser.add_argument_group("interpretability benchmarks")
    group.add_argument("--absorption_words", type=int, default=AbsorptionConfig.n_words)
    group.add_argument("--probing_per_class", type=int,
                       default=SparseProbingConfig.n_train_per_class)


def interpretability_suite(model: torch.nn.Module, tokenizer: Any, args: argparse.Namespace,
                           **autointerp: Any) -> BenchmarkSuite:
    """Absorption and sparse probing at the sizes of `add_interpretability_arguments` (tiny
    ones with `--smoke`), plus auto-interp when `autointerp` holds the suite's `autointerp`,
    `judge` and `corpus_ids` arguments."""
    smoke = {"n_icl_examples": 2, "max_k": 3} if args.smoke else {}
    probing = {"context_length": 32, "ks": [1, 5]} if args.smoke else {}
    benchmarks = ["absorption", "sparse_probing", *(["autointerp"] if autointerp else [])]
    return BenchmarkSuite(
        model, tokenizer, benchmarks,
        absorption=AbsorptionConfig(n_words=args.absorption_words, **smoke),
        sparse_probing=SparseProbingConfig(n_train_per_class=args.probing_per_class,
                                           n_test_per_class=max(args.probing_per_class // 3, 2),
                                           **probing),
        **autointerp)


def interpretability_scores(suite: BenchmarkSuite, sae: DeepSAEModel) -> dict[str, Any]:
    """One SAE's benchmark numbers under model-card names (`absorption_fraction`,
    `sparse_probing_top_1_accuracy`, ...), the seconds they took and each benchmark's details."""
    start = time.perf_counter()
    results = suite.evaluate(sae)
    return {**benchmark_scalars(results), "benchmark_s": time.perf_counter() - start,
            "details": {key: value.to_dict() for key, value in results.items()}}


def activation_source(args: argparse.Namespace) -> ActivationSource:
    return ActivationSource(**{field.name: getattr(args, field.name)
                               for field in dataclasses.fields(ActivationSource)})


def train_eval_split(activations: torch.Tensor, eval_tokens: int, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows shuffled for training (seeded) and the held-out tail (not trained on)."""
    if eval_tokens >= activations.shape[0]:
        raise ValueError(f"eval_tokens={eval_tokens} leaves no training rows out of "
                         f"{activations.shape[0]}")
    train, held_out = activations[:-eval_tokens], activations[-eval_tokens:]
    generator = torch.Generator().manual_seed(seed)
    return train[torch.randperm(train.shape[0], generator=generator)], held_out


def batches(rows: torch.Tensor, batch_size: int, count: int) -> list[torch.Tensor]:
    """`count` batches of `batch_size` consecutive rows, wrapping around (epochs) when needed."""
    per_epoch = rows.shape[0] // batch_size
    if per_epoch == 0:
        raise ValueError(f"{rows.shape[0]} rows hold no batch of {batch_size}")
    return [rows[(i % per_epoch) * batch_size:(i % per_epoch + 1) * batch_size]
            for i in range(count)]


def make_train_step(sae: DeepSAEModel, optimizers: list[torch.optim.Optimizer], *,
                    schedulers: list[Any] = (), dead: DeadLatentCounter | None = None,
                    max_grad_norm: float = 0.0, bf16: bool = False
                    ) -> Callable[[torch.Tensor], DeepSAEOutput]:
    """hf_deepsae's training step (as `hf_deepsae.training` runs it) for one SAE, on one device:
    forward (with the AuxK loss when `dead` counts dead latents), backward, `update_sae`."""
    def step(x: torch.Tensor) -> DeepSAEOutput:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = sae(x, dead_mask=None if dead is None else dead.dead_mask)
        out.loss.backward()
        if dead is not None:
            dead.update(out.latent_acts, out.latent_indices, n_tokens=x.shape[0])
        update_sae(sae, optimizers, schedulers, max_grad_norm)
        return out

    return step


def timed(function: Callable[[], Any]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def median_seconds(function: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call."""
    function()
    return statistics.median(timed(function) for _ in range(repeats))


def matmul_peak_gflops(dtype: torch.dtype, repeats: int = 5,
                       sizes: tuple[int, ...] | list[int] = (2048, 3072)) -> float:
    """This machine's GEMM throughput right now: the best of a few large square products."""
    best = 0.0
    for size in sizes:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        seconds = min(median_seconds(lambda a=a, b=b: a @ b, 1) for _ in range(repeats))
        best = max(best, 2 * size**3 / seconds / 1e9)
    return best


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU model and its bf16/fp16 matmul support (ISA flags
    and the probe's verdict), threads, emulation settings, and how busy the machine was."""
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "precision": device_precision("cpu").as_dict(),
        "environment": {name: os.environ[name] for name in EMULATION_VARIABLES
                        if name in os.environ},
        "load_average_1_5_15_at_start": LOAD_AVERAGE_AT_START,
        "load_average_1_5_15_at_end": os.getloadavg(),
    }


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A plain fixed-width table of `rows` restricted to `columns`."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    cells = [[cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in
              enumerate(columns)]
    print("  ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True)))
    for line in cells:
        print("  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True)))


def write_results(name: str, payload: dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """`<results_dir>/<name>.json` (default `benchmarks/results/`), with the machine facts."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=_json_value)
                    + "\n")
    print(f"wrote {path}")
    return path


def _json_value(value: Any) -> Any:
    """Numbers JSON doesn't know (numpy, torch scalars) as floats; paths and the rest as text."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
