"""What every benchmark shares: the cached real activations, timing, machine facts and results.

The activations are SmolLM2-135M-Instruct's layer-6 MLP output (`model.layers.6.mlp.down_proj`)
over the offline default corpus (Python's documentation topics), computed once with the project's
own pipeline (`activations.load_language_model` → `tokenize_and_chunk` → `ModelActivations`, i.e.
`splice.capture_activations`) and written with `training.activation_cache`; later runs read the
safetensors shards back. The last `eval_tokens` rows (whole, distinct token chunks) are held out.
"""

from __future__ import annotations

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
from hf_deepsae.modeling_deepsae import DeepSAEOutput
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


def language_model_source(seed: int = 0, lm_batch_size: int = 8) -> ModelActivations:
    """Live activations at `HOOKPOINT` over the default corpus (loads the language model)."""
    model, tokenizer = load_language_model(EMBEDDED_MODEL_NAME, dtype=torch.float32)
    chunks = tokenize_and_chunk(load_text_dataset(), tokenizer, CONTEXT_LENGTH)
    return ModelActivations(model, {HOOKPOINT: HOOKPOINT}, TokenChunks(chunks, lm_batch_size, seed))


def cached_activations(cache_dir: Path = DEFAULT_CACHE_DIR) -> torch.Tensor:
    """All cached activation rows `[rows, 576]` (float32), building the cache on first use.

    The cache holds one pass over the whole corpus (chunks in a seeded random order), so the tail
    rows used for held-out evaluation come from chunks spread over the corpus. It lives in the
    folder `hf_deepsae.training.activation_cache` names after these settings under `cache_dir`.
    """
    metadata = {"model_name_or_path": EMBEDDED_MODEL_NAME, "dataset_name": None,
                "context_length": CONTEXT_LENGTH}
    build = find_cache(cache_dir, metadata, [HOOKPOINT], rows=MAX_CACHED_TOKENS)
    if build is None:
        print(f"caching {EMBEDDED_MODEL_NAME} {HOOKPOINT} activations into {cache_dir} ...")
        start = time.perf_counter()
        cache = open_or_build_cache(language_model_source(), cache_dir, metadata,
                                    max_rows=MAX_CACHED_TOKENS, rows_per_shard=16_384,
                                    accelerator=PartialState(), seed=0)
        print(f"cached in {time.perf_counter() - start:.0f} s")
    else:
        cache = CachedActivations(build, [HOOKPOINT])
    return torch.cat([cache.next_block()[HOOKPOINT] for _ in cache.shards]).float()


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


def matmul_peak_gflops(dtype: torch.dtype, repeats: int = 5) -> float:
    """This machine's GEMM throughput right now: the best of a few large square products."""
    best = 0.0
    for size in (2048, 3072):
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
    """What the numbers were measured on, including how busy the machine was."""
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
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


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """`benchmarks/results/<name>.json`, with the machine facts added."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=float) + "\n")
    print(f"wrote {path}")
    return path
