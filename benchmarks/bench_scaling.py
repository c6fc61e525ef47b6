"""Memory and speed vs width and sparsity, and memory of streaming training vs tokens seen.

    python benchmarks/bench_scaling.py                       # widths 4k..64k, k 16..256, stream
    python benchmarks/bench_scaling.py --batch_size 1024 --stream_tokens 32768   # quicker
    python benchmarks/bench_scaling.py --smoke --model_name_or_path tiny ...      # seconds

1. `n_latents` ∈ 4k…64k at k = 32 and 2. `k` ∈ 16…256 at 16k latents: each point trains in a
   fresh process (so its peak RSS is its own) on the cached SmolLM2-135M layer-6 activations and
   reports tokens/s, peak RSS, and the time of the step's parts at that shape: the encoder GEMM
   (O(B·n·d)), top-k selection (O(B·n)), the sparse decode forward (O(B·k·d): flat in n_latents)
   and forward+backward (O(B·k·d) plus writing the dense `[n, d]` weight gradient, O(n·d), which
   Adam's update of that weight costs anyway), next to a dense decode `z @ W_dec` (O(B·n·d)).
3. Streaming: a live SmolLM2-135M feeds `ActivationStream` (bounded shuffle buffer) and the SAE
   trains on it; RSS is sampled after every step. The curve must stay flat in tokens seen.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib
import torch
from common import (
    BATCH_SIZE,
    ActivationSource,
    activation_source,
    add_common_arguments,
    batches,
    make_train_step,
    median_seconds,
    peak_rss_mib,
    print_table,
    rss_mib,
    timed,
    write_results,
)

from hf_deepsae import DeepSAEConfig, DeepSAEModel
from hf_deepsae.activations import ActivationStream
from hf_deepsae.sparsity import sparse_decode, topk_select
from hf_deepsae.training import TrainingConfig, build_optimizers, default_lr

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SMOKE = {"widths": [64], "ks": [4], "k_sweep_latents": 64, "batch_size": 64, "steps": 2,
         "stream_tokens": 256}


def measure_point(source: ActivationSource, n_latents: int, k: int, batch_size: int,
                  steps: int) -> dict:
    """Train `steps` steps at one shape in this (fresh) process; time the step and its parts."""
    activations = source.cached()
    baseline = rss_mib()
    torch.manual_seed(0)
    sae = DeepSAEModel(DeepSAEConfig(d_in=activations.shape[1], n_latents=n_latents, k=k))
    sae.initialize_from_activations(activations[:batch_size])
    step = make_train_step(sae, build_optimizers(sae, TrainingConfig(optimizer="adam"),
                                                 default_lr(n_latents)))
    step_times = [timed(lambda x=x: step(x)) for x in batches(activations, batch_size, steps + 1)]
    training_peak_rss = peak_rss_mib()  # before the part timings below allocate their own tensors
    stage, x = sae.stages[0], activations[:batch_size]
    with torch.no_grad():
        pre_acts = stage.encoder(x)
    indices = topk_select(pre_acts, k)
    values = torch.rand(batch_size, k, requires_grad=True)
    grad = torch.randn(batch_size, activations.shape[1])
    dense = torch.zeros(batch_size, n_latents).scatter_(1, indices, values.detach())

    def sparse_decode_step() -> None:
        sparse_decode(values, indices, stage.W_dec).backward(grad)

    def dense_decode_step() -> None:
        (dense.requires_grad_() @ stage.W_dec).backward(grad)

    with torch.no_grad():
        parts = {
            "encoder_gemm_s": median_seconds(lambda: stage.encoder(x), 3),
            "topk_s": median_seconds(lambda: topk_select(pre_acts, k), 3),
            "sparse_decode_fwd_s": median_seconds(
                lambda: sparse_decode(values, indices, stage.W_dec), 3),
        }
    parts["sparse_decode_fwd_bwd_s"] = median_seconds(sparse_decode_step, 3)
    parts["dense_decode_fwd_bwd_s"] = median_seconds(dense_decode_step, 3)
    step_seconds = statistics.median(step_times[1:])  # the first step allocates
    return {"n_latents": n_latents, "k": k, "batch_size": batch_size,
            "median_step_s": step_seconds, "tokens_per_s": batch_size / step_seconds,
            "peak_rss_mib": training_peak_rss,
            "peak_rss_over_baseline_mib": training_peak_rss - baseline, **parts}


def sweep(source: ActivationSource, points: list[tuple[int, int]], batch_size: int, steps: int,
          fresh_processes: bool = True) -> list[dict]:
    """Each point in a fresh spawned process, one after another (peak RSS per point); or all in
    this process (a smoke run: peak RSS is then the process's so far)."""
    rows = []
    context = multiprocessing.get_context("spawn")
    for n_latents, k in points:
        if fresh_processes:
            with ProcessPoolExecutor(1, mp_context=context) as pool:
                row = pool.submit(measure_point, source, n_latents, k, batch_size, steps).result()
        else:
            row = measure_point(source, n_latents, k, batch_size, steps)
        print(f"n_latents={n_latents} k={k}: {row['tokens_per_s']:.0f} tokens/s, "
              f"peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
        rows.append(row)
    return rows


def stream_memory(source: ActivationSource, tokens: int, batch_size: int, n_latents: int
                  ) -> list[dict]:
    """RSS after every step of training on live language-model activations."""
    live = source.live()
    stream = ActivationStream(live, batch_size=batch_size, buffer_size=4 * batch_size)
    torch.manual_seed(0)
    sae = DeepSAEModel(DeepSAEConfig(d_in=live.next_block()[source.hookpoint].shape[-1],
                                     n_latents=n_latents, k=32))
    step = make_train_step(sae, build_optimizers(sae, TrainingConfig(optimizer="adam"),
                                                 default_lr(n_latents)))
    samples, seen, start = [], 0, time.perf_counter()
    while seen < tokens:
        x = next(stream)[source.hookpoint]
        if seen == 0:
            sae.initialize_from_activations(x)
        step(x)
        seen += x.shape[0]
        samples.append({"tokens_seen": seen, "rss_mib": rss_mib(),
                        "elapsed_s": time.perf_counter() - start})
    return samples


def plot(width_rows: list[dict], k_rows: list[dict], stream: list[dict], results_dir: Path
         ) -> None:
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    parts = ["encoder_gemm_s", "topk_s", "sparse_decode_fwd_s", "sparse_decode_fwd_bwd_s",
             "dense_decode_fwd_bwd_s", "median_step_s"]
    for axis, rows, key in ((axes[0], width_rows, "n_latents"), (axes[1], k_rows, "k")):
        for part in parts:
            axis.plot([row[key] for row in rows], [row[part] for row in rows], marker="o",
                      label=part.removesuffix("_s").replace("_", " "))
        axis.set(xscale="log", yscale="log", xlabel=key, ylabel="seconds per step",
                 title=f"step parts vs {key}")
        axis.legend(fontsize=8)
    if stream:
        axes[2].plot([s["tokens_seen"] for s in stream], [s["rss_mib"] for s in stream])
        axes[2].set(xlabel="tokens seen", ylabel="RSS (MiB)", ylim=(0, None),
                    title="streaming from the language model: memory")
    figure.tight_layout()
    path = results_dir / "scaling.png"
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+",
                        default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--k_sweep_latents", type=int, default=16384)
    parser.add_argument("--batch_size", type=int, default=BATCH_SIZE)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per point")
    parser.add_argument("--stream_tokens", type=int, default=131_072,
                        help="tokens of live-model streaming training (0 skips it)")
    add_common_arguments(parser)
    if parser.parse_known_args()[0].smoke:
        parser.set_defaults(**SMOKE)
    args = parser.parse_args()

    source = activation_source(args)
    source.cached()  # build the cache once, before the workers read it
    print(f"load average {os.getloadavg()}")
    width_rows = sweep(source, [(n, 32) for n in args.widths], args.batch_size, args.steps,
                       fresh_processes=not args.smoke)
    k_rows = sweep(source, [(args.k_sweep_latents, k) for k in args.ks], args.batch_size,
                   args.steps, fresh_processes=not args.smoke)
    stream = stream_memory(source, args.stream_tokens, args.batch_size,
                           args.k_sweep_latents) if args.stream_tokens else []
    columns = ["n_latents", "k", "tokens_per_s", "median_step_s", "encoder_gemm_s", "topk_s",
               "sparse_decode_fwd_s", "sparse_decode_fwd_bwd_s", "dense_decode_fwd_bwd_s",
               "peak_rss_mib"]
    print()
    print_table(width_rows + k_rows, columns)
    growth = None
    if len(stream) >= 4:
        half = len(stream) // 2
        first, second = ([s["rss_mib"] for s in part] for part in (stream[:half], stream[half:]))
        growth = max(second) - max(first)
        print(f"\nstreaming {stream[-1]['tokens_seen']} tokens: RSS between "
              f"{min(first + second):.0f} and {max(first + second):.0f} MiB; peak of the second "
              f"half minus peak of the first: {growth:+.0f} MiB")
    write_results("scaling", {"settings": vars(args), "widths": width_rows, "ks": k_rows,
                              "stream": stream, "stream_peak_rss_growth_mib": growth},
                  args.results_dir)
    plot(width_rows, k_rows, stream, args.results_dir)


if __name__ == "__main__":
    main()
