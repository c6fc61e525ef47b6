"""Interpret an SAE's latents: delphi-layout cache, statistics, examples, browser, scores.

    python examples/interpret.py                     # the SAE examples/train.py wrote
    python examples/interpret.py --sae <hub repo> --subfolder model.layers.6.mlp.down_proj \
        --out outputs/interpret --n_tokens 1_000_000 --sample_latents 100

The SAE runs on its own base model and hookpoint (`base_model_name_or_path`, `hookpoint` in its
config) over the first `--n_tokens` tokens of the dataset it was trained on (default: Python's
documentation, offline). Writes to `--out`:

- `latents/<hookpoint>/`: the latent cache in EleutherAI delphi's layout, and
  `neighbours/<hookpoint>-decoder_similarity.json`, so delphi can run on it unchanged
  (`python -m delphi ... --name <run>` with this folder as `results/<run>`);
- `browser.html`: the latent browser (open it from disk);
- `interpretation.json`: statistics of every latent, and explanations and detection scores of the
  chosen latents (`--latents`, else `--sample_latents` random live ones) with their summary.
  Dead latents are counted in both summaries.

The judge (explainer, detector, fuzzer) is `--judge_model`, any causal LM; the default
SmolLM2-135M-Instruct runs offline but is too small to judge. A real judge runs on any
OpenAI-compatible server (vLLM, TGI, llama.cpp, `transformers serve`, hosted APIs):

    python examples/interpret.py --sae outputs/deepsae --judge_base_url http://localhost:8000/v1 \
        --judge_model Qwen/Qwen2.5-7B-Instruct --judge_cache outputs/judge.sqlite

with `--judge_max_workers` latents judged at once, retries, a token/cost count (`usage` in
`interpretation.json`) and a reply cache that makes reruns free.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from hf_deepsae import DeepSAEModel, load_sae
from hf_deepsae.activations import (
    load_language_model,
    load_text_dataset,
    tokenize_and_chunk,
)
from hf_deepsae.interpret import (
    ContextWindows,
    SamplingConfig,
    ScoringConfig,
    build_latent_cache,
    compute_statistics,
    decoder_directions,
    nearest_latents,
    render_browser,
    sample_examples,
    score_latents,
    summarize,
)
from hf_deepsae.interpret.judges import JudgeConfig, load_judge
from hf_deepsae.training import TrainingConfig

DATA_FIELDS = ("dataset_name", "dataset_config_name", "data_files", "dataset_split", "text_column")


@dataclasses.dataclass
class InterpretArguments:
    """What to interpret, on which text, and where the results go."""

    sae: str = dataclasses.field(default=TrainingConfig.output_dir, metadata={
        "help": "SAE folder or Hub repo, or a folder/repo with one SAE per subfolder."})
    out: str = dataclasses.field(default="outputs/interpret", metadata={
        "help": "Output folder."})
    subfolder: str | None = dataclasses.field(default=None, metadata={
        "help": "The SAE's subfolder in a folder/repo holding one SAE per hookpoint."})
    model_name_or_path: str | None = dataclasses.field(default=None, metadata={
        "help": "The language model. Default: the SAE's base_model_name_or_path."})
    dataset_name: str | None = dataclasses.field(default=None, metadata={
        "help": "Hub dataset id, local file/folder or builder. Default: as trained."})
    dataset_config_name: str | None = dataclasses.field(default=None, metadata={
        "help": "Configuration (subset) of the Hub dataset. Default: as trained."})
    data_files: list[str] | None = dataclasses.field(default=None, metadata={
        "help": "Data files for a builder dataset. Default: as trained."})
    dataset_split: str | None = dataclasses.field(default=None, metadata={
        "help": "Split to read. Default: as trained, else train."})
    text_column: str | None = dataclasses.field(default=None, metadata={
        "help": "Column holding the documents. Default: as trained, else text."})
    n_tokens: int = dataclasses.field(default=65_536, metadata={
        "help": "Tokens to cache (whole chunks)."})
    context_length: int = dataclasses.field(default=256, metadata={
        "help": "Tokens per cached sequence (a multiple of --example_ctx_len)."})
    lm_batch_size: int = dataclasses.field(default=8, metadata={
        "help": "Sequences per forward pass."})
    n_splits: int = dataclasses.field(default=5, metadata={
        "help": "Shards of the cache over the latent range."})
    latents: list[int] | None = dataclasses.field(default=None, metadata={
        "help": "Latents to explain, score and show. Default: --sample_latents random live ones."})
    sample_latents: int = dataclasses.field(default=20, metadata={
        "help": "How many live latents to draw when --latents is not given."})
    no_scoring: bool = dataclasses.field(default=False, metadata={
        "help": "Skip explanations and scores (cache, statistics and browser only)."})
    device: str | None = dataclasses.field(default=None, metadata={
        "help": "Device of the models. Default: cuda if available, else cpu."})


def load_corpus(args: InterpretArguments, sae: DeepSAEModel, tokenizer: Any
                ) -> tuple[torch.Tensor, dict[str, Any]]:
    """`[n_sequences, context_length]` ids of the first chunks, and delphi's dataset fields."""
    trained = sae.config.training_config or {}
    data = {name: getattr(args, name) if getattr(args, name) is not None else trained.get(name)
            for name in DATA_FIELDS}
    data["dataset_split"] = data["dataset_split"] or "train"
    data["text_column"] = data["text_column"] or "text"
    dataset = load_text_dataset(data["dataset_name"], config_name=data["dataset_config_name"],
                                data_files=data["data_files"], split=data["dataset_split"],
                                text_column=data["text_column"])
    chunks = tokenize_and_chunk(dataset, tokenizer, args.context_length, data["text_column"])
    n_sequences = min(len(chunks), max(args.n_tokens // args.context_length, 1))
    delphi_fields = {"dataset_repo": data["dataset_name"] or "pydoc_data.topics",
                     "dataset_name": data["dataset_config_name"] or "",
                     "dataset_split": f"{data['dataset_split']}[:{n_sequences} chunks]",
                     "dataset_column": data["text_column"]}
    return chunks[:n_sequences]["input_ids"], delphi_fields


def choose_latents(args: InterpretArguments, dead: torch.Tensor, seed: int) -> list[int]:
    """`--latents`, else `--sample_latents` live latents drawn at random."""
    if args.latents is not None:
        return sorted(set(args.latents))
    alive = (~dead).nonzero()[:, 0]
    generator = torch.Generator().manual_seed(seed)
    return sorted(alive[torch.randperm(len(alive), generator=generator)[:args.sample_latents]]
                  .tolist())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, sampling, scoring, judge_config = HfArgumentParser(
        (InterpretArguments, SamplingConfig, ScoringConfig, JudgeConfig)
    ).parse_args_into_dataclasses(args=list(sys.argv[1:] if argv is None else argv))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sae = load_sae(args.sae, args.subfolder).to(device).eval()
    base_model = args.model_name_or_path or sae.config.base_model_name_or_path
    if base_model is None:
        raise ValueError(f"{args.sae} records no base_model_name_or_path; pass "
                         f"--model_name_or_path")
    model, tokenizer = load_language_model(base_model, device=device, verbose=True)
    input_ids, dataset_fields = load_corpus(args, sae, tokenizer)

    cache = build_latent_cache(model, sae, input_ids, args.lm_batch_size,
                               {**dataset_fields, "model_name": base_model,
                                "sae_name_or_path": args.sae})
    hookpoint = cache.config["hookpoint"]
    out = Path(args.out)
    cache.save(out / "latents" / hookpoint, n_splits=args.n_splits)
    statistics = compute_statistics(cache)
    neighbours = nearest_latents(decoder_directions(sae, statistics.mean_activation),
                                 sampling.n_neighbours, candidates=~statistics.dead)
    delphi_neighbours = {
        str(latent): [[similarity, index] for index, similarity
                      in zip(indices, similarities, strict=True) if index >= 0]
        for latent, (indices, similarities)
        in enumerate(zip(neighbours[0].tolist(), neighbours[1].tolist(), strict=True))
    }
    (out / "neighbours").mkdir(parents=True, exist_ok=True)
    (out / "neighbours" / f"{hookpoint}-decoder_similarity.json").write_text(
        json.dumps(delphi_neighbours))

    windows = ContextWindows(cache, sampling.example_ctx_len)
    examples = [sample_examples(windows, latent, sampling, statistics.top_tokens_of(latent),
                                neighbours)
                for latent in choose_latents(args, statistics.dead, sampling.seed)]
    scores, usage = [], None
    if not args.no_scoring:
        judge, judge_name = load_judge(judge_config, model, tokenizer)
        scores = score_latents(tqdm(examples, desc=f"Explaining and scoring with {judge_name}"),
                               judge, judge, tokenizer, statistics, scoring,
                               max_workers=judge_config.max_workers)
        usage = getattr(judge.chat, "usage", None)

    info = {"SAE": args.sae, "architecture": sae.config.architecture, "model": base_model,
            "hookpoint": hookpoint, "corpus": dataset_fields["dataset_repo"]}
    render_browser(out / "browser.html", examples, statistics, tokenizer, scores, neighbours,
                   title=f"Latents of {args.sae}", info=info)
    result = {
        **info,
        "settings": {"arguments": dataclasses.asdict(args),
                     "sampling": dataclasses.asdict(sampling),
                     "scoring": dataclasses.asdict(scoring),
                     "judge": dataclasses.asdict(judge_config)},
        "statistics": {"summary": statistics.summary(), "latents": statistics.columns()},
        "scores": {"summary": summarize(scores, statistics),
                   "latents": [score.to_dict() for score in scores],
                   "usage": None if usage is None else usage.to_dict()},
    }
    (out / "interpretation.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({"statistics": result["statistics"]["summary"],
                      "scores": result["scores"]["summary"]}, indent=2))
    print(f"Wrote {out / 'latents' / hookpoint}, {out / 'browser.html'} and "
          f"{out / 'interpretation.json'}")
    return result


if __name__ == "__main__":
    main()
