"""Take SAEs trained here to the tools researchers already use: one subcommand per bridge.

    python examples/bridges.py sparsify --sae outputs/shallow --out exported/sparsify
    python examples/bridges.py saelens --sae outputs/shallow --out exported/saelens \
        --hook_name blocks.6.hook_mlp_out
    python examples/bridges.py circuit-tracer --sae outputs/transcoders --out exported/ct \
        --model_name HuggingFaceTB/SmolLM2-135M
    python examples/bridges.py saebench --sae outputs/deepsae --model_name pythia-70m-deduped \
        --eval_types core sparse_probing
    python examples/bridges.py neuronpedia --sae outputs/deepsae --interpret_dir outputs/interpret \
        --out exported/neuronpedia --model_id smollm2-135m --sae_set deepsae-mlp
    python examples/bridges.py releases

`--sae` takes anything `hf_deepsae.load_sae` does: a folder, a Hub repo, a named release, or a
folder/repo of one SAE per subfolder (`--subfolder` picks one; `circuit-tracer` takes them all,
one transcoder per layer). sparsify, SAELens and circuit-tracer need linear single-stage SAEs (a
deep decoder is not a `W_dec`); for deep and stacked SAEs in SAELens use
`hf_deepsae.interop.to_hooked_sae`. `saebench` runs SAEBench's evals through
`SAEBenchAdapter` (they download their model and datasets). `neuronpedia` turns what
`examples/interpret.py` wrote (its latent cache and `interpretation.json`) into Neuronpedia's
upload batches. The peers themselves are the `peers` extra (`pip install -e ".[peers]"`, see
`.ci/run`); the exports need none of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hf_deepsae import DeepSAEModel, list_releases, load_sae, load_saes
from hf_deepsae.activations import load_language_model
from hf_deepsae.hub import sae_subfolders
from hf_deepsae.interop import (
    to_circuit_tracer,
    to_neuronpedia,
    to_saelens,
    to_sparsify,
)
from hf_deepsae.interpret import (
    ContextWindows,
    LatentCache,
    LatentScore,
    SamplingConfig,
    compute_statistics,
    sample_examples,
)


def export_sparsify(args: argparse.Namespace) -> Path:
    return to_sparsify(load_sae(args.sae, args.subfolder), args.out)


def export_saelens(args: argparse.Namespace) -> Path:
    return to_saelens(load_sae(args.sae, args.subfolder), args.out, hook_name=args.hook_name,
                      hook_name_out=args.hook_name_out)


def export_circuit_tracer(args: argparse.Namespace) -> Path:
    saes = _all_saes(args.sae)
    by_layer = {sae.config.layer: sae for sae in saes.values()}
    if None in by_layer or len(by_layer) != len(saes):
        raise ValueError(f"{args.sae} must hold one transcoder per layer, each with its layer "
                         f"recorded; found layers {[sae.config.layer for sae in saes.values()]}")
    return to_circuit_tracer(by_layer, args.out, model_name=args.model_name,
                             allow_topk=args.allow_topk)


def run_saebench(args: argparse.Namespace) -> Path:
    from sae_bench.custom_saes.run_all_evals_custom_saes import run_evals

    from hf_deepsae.interop import SAEBenchAdapter

    sae = load_sae(args.sae, args.subfolder)
    adapter = SAEBenchAdapter(sae, args.model_name, hook_layer=args.hook_layer,
                              hook_name=args.hook_name)
    run_evals(args.model_name, [(args.name, adapter)], llm_batch_size=args.llm_batch_size,
              llm_dtype=args.llm_dtype, device=args.device, eval_types=args.eval_types)
    return Path("eval_results")


def export_neuronpedia(args: argparse.Namespace) -> Path:
    """Neuronpedia batches from `examples/interpret.py`'s cache and scores, examples re-drawn."""
    sae = load_sae(args.sae, args.subfolder).eval()
    interpret_dir = Path(args.interpret_dir)
    report = json.loads((interpret_dir / "interpretation.json").read_text())
    cache = LatentCache.load(interpret_dir / "latents" / report["hookpoint"])
    sampling = SamplingConfig(**report["settings"]["sampling"])
    scores = [LatentScore(**score) for score in report["scores"]["latents"]]
    statistics = compute_statistics(cache)
    latents = args.latents or [score.latent for score in scores] or \
        (~statistics.dead).nonzero()[:args.max_latents, 0].tolist()
    windows = ContextWindows(cache, sampling.example_ctx_len)
    examples = [sample_examples(windows, latent, sampling, statistics.top_tokens_of(latent))
                for latent in latents]
    model, tokenizer = load_language_model(args.model_name_or_path or report["model"])
    return to_neuronpedia(
        args.out, sae, cache, examples, tokenizer, model_id=args.model_id, sae_set=args.sae_set,
        layer=args.layer, dataset=cache.config.get("dataset_repo", ""),
        unembedding=model.get_output_embeddings().weight, scores=scores,
        explanation_model=report["settings"]["arguments"].get("judge_model", ""))


def print_releases(args: argparse.Namespace) -> None:
    for release in list_releases().values():
        ids = ", ".join(release.sae_ids) or "any subfolder"
        print(f"{release.name}: {release.repo_id} ({release.format}; ids: {ids})\n"
              f"    {release.description}")


def _all_saes(path_or_repo: str) -> dict[str, DeepSAEModel]:
    if sae_subfolders(path_or_repo) is None:  # a folder or repo of one SAE
        return {Path(path_or_repo).name: load_sae(path_or_repo)}
    return load_saes(path_or_repo)


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = main.add_subparsers(dest="command", required=True)

    def command(name: str, run, help: str, sae: bool = True, out: bool = True
                ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.set_defaults(run=run)
        if sae:
            sub.add_argument("--sae", required=True, help="SAE folder, Hub repo or release")
            sub.add_argument("--subfolder", help="SAE subfolder (or release sae_id)")
        if out:
            sub.add_argument("--out", required=True, help="output folder")
        return sub

    command("sparsify", export_sparsify, "write a sparsify checkpoint (top-k, linear)")
    saelens = command("saelens", export_saelens, "write a SAELens checkpoint (linear)")
    saelens.add_argument("--hook_name", help="TransformerLens hook read: blocks.6.hook_mlp_out")
    saelens.add_argument("--hook_name_out", help="transcoders: the hook written")
    tracer = command("circuit-tracer", export_circuit_tracer,
                     "write a circuit-tracer transcoder set (one transcoder per layer)")
    tracer.add_argument("--model_name", help="base model name for circuit-tracer's config.yaml")
    tracer.add_argument("--allow_topk", action="store_true",
                        help="write top-k transcoders (circuit-tracer's loader reads them as "
                             "ReLU; load with hf_deepsae.interop.load_circuit_tracer_set)")
    bench = command("saebench", run_saebench, "run SAEBench's evals (downloads)", out=False)
    bench.add_argument("--model_name", required=True, help="SAEBench model, e.g. gemma-2-2b")
    bench.add_argument("--eval_types", nargs="+", default=["core"])
    bench.add_argument("--hook_layer", type=int)
    bench.add_argument("--hook_name")
    bench.add_argument("--name", default="hf_deepsae", help="name of the SAE in the results")
    bench.add_argument("--llm_batch_size", type=int, default=32)
    bench.add_argument("--llm_dtype", default="float32")
    bench.add_argument("--device", default="cpu")
    neuronpedia = command("neuronpedia", export_neuronpedia,
                          "write Neuronpedia upload batches from examples/interpret.py's output")
    neuronpedia.add_argument("--interpret_dir", required=True, help="interpret.py's --out")
    neuronpedia.add_argument("--model_id", required=True, help="Neuronpedia model id")
    neuronpedia.add_argument("--sae_set", required=True, help="Neuronpedia SAE set id")
    neuronpedia.add_argument("--layer", type=int, help="default: the SAE's layer")
    neuronpedia.add_argument("--latents", type=int, nargs="+",
                             help="default: the scored latents, else --max_latents live ones")
    neuronpedia.add_argument("--max_latents", type=int, default=1000)
    neuronpedia.add_argument("--model_name_or_path", help="default: interpret.py's model")
    command("releases", print_releases, "list the registered releases", sae=False, out=False)
    return main


def main(argv: list[str] | None = None) -> Any:
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    result = args.run(args)
    if result is not None:
        print(f"Wrote {result}")
    return result


if __name__ == "__main__":
    main()
