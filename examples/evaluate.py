"""Evaluate SAEs the way the field compares them: FVU, L0, dead/dense latents, CE-loss score, KL.

    python examples/evaluate.py                          # the SAEs examples/train.py wrote
    accelerate launch examples/evaluate.py --sae outputs/deepsae --output_dir outputs/evaluation

`--sae` takes SAE folders or Hub ids, or folders/repos holding one SAE per subfolder (as
`train.py` and `hf_deepsae.hub.save_saes` write them); several may be given. Each SAE is spliced
into its base model where it was trained. Model, dataset and context length default to what the
SAEs were trained on (`config.training_config`), and evaluation reads the first chunks of that
dataset: the chunks `train.py` held out, as long as `--n_tokens` stays within its `--eval_tokens`.

Prints a table, writes `metrics.json` and the plots `feature_density.png` (log-scale firing
frequencies) and, for several SAEs, `fvu_vs_l0.png` to `--output_dir`. `--save_to_sae` also
records the numbers in each local SAE's `config.metrics` and re-renders its model card. Under
`accelerate launch`, every process evaluates its share of the chunks and the results are gathered.

`--benchmarks` picks what runs (default `core`, the metrics above):

    python examples/evaluate.py --sae outputs/deepsae \
        --benchmarks core absorption sparse_probing autointerp

- `absorption`: feature absorption and first-letter F1 on the model's own vocabulary
  (`--absorption_*` flags, `hf_deepsae.evaluation.AbsorptionConfig`);
- `sparse_probing`: k-sparse probes over latents vs probes on raw activations, on offline tasks
  or on `--probing_dataset` (a Hub id or local file with `--probing_text_column` and
  `--probing_label_column`) (`--sparse_probing_*` flags);
- `autointerp`: explanations and detection/fuzzing scores of sampled latents by a judge: a server
  (`--judge_base_url http://localhost:8000/v1 --judge_model <name>`, any OpenAI-compatible one)
  or the offline default local model (`--autointerp_*`, `--judge_*` flags).

These run on the main process after the core metrics; their full results go to `metrics.json`
under `benchmarks`, their headline numbers to the table and (with `--save_to_sae`) the card.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import typing
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from datasets import Dataset
from datasets.distributed import split_dataset_by_node
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from hf_deepsae import DeepSAEModel
from hf_deepsae.activations import (
    EMBEDDED_MODEL_NAME,
    load_language_model,
    load_text_dataset,
    tokenize_and_chunk,
)
from hf_deepsae.evaluation import (
    BENCHMARKS,
    AbsorptionConfig,
    BenchmarkSuite,
    SAEEvaluationResult,
    SAEEvaluator,
    SparseProbingConfig,
    benchmark_scalars,
    load_classification_task,
    plot_feature_density,
    plot_fvu_vs_l0,
)
from hf_deepsae.evaluation.autointerp import AutoInterpConfig
from hf_deepsae.hub import load_saes, sae_subfolders, save_sae, save_saes
from hf_deepsae.interpret.judges import JudgeConfig
from hf_deepsae.token_mask import TokenMask
from hf_deepsae.training import TrainingConfig

CONFIG_FLAGS = {"absorption": AbsorptionConfig, "sparse_probing": SparseProbingConfig,
                "autointerp": AutoInterpConfig}
"""Benchmark configs whose fields become `--<benchmark>_<field>` flags."""

DATA_FIELDS = (
    "dataset_name",
    "dataset_config_name",
    "data_files",
    "dataset_split",
    "text_column",
    "streaming",
    "context_length",
    "lm_batch_size",
    "lm_dtype",
    "mask_bos",
    "mask_special_tokens",
    "mask_positions_below",
)
"""Fields shared with `TrainingConfig`: unset here, they take the SAE's training values."""


def _as_trained(help_text: str) -> Any:
    return dataclasses.field(default=None, metadata={"help": f"{help_text} Default: as trained."})


@dataclasses.dataclass
class EvaluationArguments:
    """What to evaluate, on what, and where the results go."""

    sae: list[str] = dataclasses.field(
        default_factory=lambda: [TrainingConfig.output_dir],
        metadata={"help": "SAE folders or Hub ids, or folders/repos with one SAE per subfolder."},
    )
    model_name_or_path: str | None = dataclasses.field(
        default=None,
        metadata={"help": "The language model. Default: the SAEs' base_model_name_or_path."},
    )
    dataset_name: str | None = _as_trained("Hub dataset id, local file/folder, or builder name.")
    dataset_config_name: str | None = _as_trained("Configuration (subset) of the Hub dataset.")
    data_files: list[str] | None = _as_trained("Data files for a builder dataset.")
    dataset_split: str | None = _as_trained("Split to read.")
    text_column: str | None = _as_trained("Column holding the documents.")
    streaming: bool | None = _as_trained("Stream the dataset.")
    context_length: int | None = _as_trained("Tokens per packed chunk.")
    lm_batch_size: int | None = _as_trained("Chunks per forward pass.")
    lm_dtype: str | None = _as_trained("dtype of the language model.")
    mask_bos: bool | None = _as_trained(
        "Leave each chunk's first position and BOS tokens out of the activation metrics.")
    mask_special_tokens: bool | None = _as_trained(
        "Leave every special token out of the activation metrics.")
    mask_positions_below: int | None = _as_trained(
        "Leave the first N positions of each chunk out of the activation metrics.")
    n_tokens: int | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Tokens to read (whole chunks; the activation metrics leave out those the "
            "token mask does). Default: the training run's eval_tokens."
        },
    )
    jointly: bool = dataclasses.field(
        default=False, metadata={"help": "Splice all SAEs at once for CE/KL (else one at a time)."}
    )
    no_language_model: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Only activation metrics: skip CE-loss score and KL (needed for encoders)."
        },
    )
    allow_base_model_mismatch: bool = dataclasses.field(
        default=False,
        metadata={"help": "Evaluate SAEs on a model other than the one they were trained on."},
    )
    output_dir: str = dataclasses.field(
        default="outputs/evaluation", metadata={"help": "Where metrics.json and the PNG plots go."}
    )
    save_to_sae: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Record the metrics in each (local) SAE's config.metrics and model card."
        },
    )
    benchmarks: list[str] = dataclasses.field(
        default_factory=lambda: ["core"],
        metadata={"help": "What to run: core (FVU, L0, CE...) and/or the interpretability "
                          f"benchmarks {', '.join(BENCHMARKS)}.",
                  "choices": ["core", *BENCHMARKS]},
    )
    probing_dataset: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Sparse-probing task: Hub dataset id or local file. Default: offline "
                          "tasks (Python docs, stdlib docstrings and code, the Bible)."},
    )
    probing_dataset_config_name: str | None = dataclasses.field(
        default=None, metadata={"help": "Configuration (subset) of --probing_dataset."}
    )
    probing_dataset_split: str = dataclasses.field(
        default="train", metadata={"help": "Split of --probing_dataset."}
    )
    probing_text_column: str = dataclasses.field(
        default="text", metadata={"help": "Text column of --probing_dataset."}
    )
    probing_label_column: str = dataclasses.field(
        default="label", metadata={"help": "Label column of --probing_dataset."}
    )


def prefixed(config_class: type, prefix: str) -> type:
    """A copy of the dataclass `config_class` with fields named `<prefix>_<field>`, so that several
    configs share one command line and keep their defaults and help in one place."""
    types = typing.get_type_hints(config_class)
    fields = []
    for field in dataclasses.fields(config_class):
        default = ({"default_factory": field.default_factory}
                   if field.default_factory is not dataclasses.MISSING
                   else {"default": field.default})
        fields.append((f"{prefix}_{field.name}", types[field.name],
                       dataclasses.field(metadata=field.metadata, **default)))
    return dataclasses.make_dataclass(f"{config_class.__name__}Flags", fields)


def unprefixed(flags: Any, config_class: type, prefix: str) -> Any:
    """The `config_class` instance that `prefixed` flags describe."""
    return config_class(**{field.name: getattr(flags, f"{prefix}_{field.name}")
                           for field in dataclasses.fields(config_class)})


def load_sae_sources(paths: list[str]) -> dict[str, tuple[str, dict[str, DeepSAEModel]]]:
    """`{path: (kind, {name: sae})}`, kind `"single"` or `"collection"` (one SAE per subfolder)."""
    sources = {}
    for path in paths:
        try:
            subfolders = sae_subfolders(path)
        except OSError as error:  # neither a local folder nor a Hub repo
            raise ValueError(
                f"no SAE at {path!r}: not a local SAE folder, nor a Hub repo of SAEs ({error}); "
                f"examples/train.py saves to {TrainingConfig.output_dir}"
            ) from error
        if subfolders is None:
            sources[path] = ("single", {Path(path).name: DeepSAEModel.from_pretrained(path)})
        elif subfolders:
            sources[path] = ("collection", load_saes(path))
        else:
            raise ValueError(f"{path} holds no SAE: no config.json in it or its subfolders")
    return sources


def display_names(
    sources: dict[str, tuple[str, dict[str, DeepSAEModel]]],
) -> dict[tuple[str, str], str]:
    """`{(path, name): label}`: the SAE's own name, prefixed by its path only where names clash."""
    keys = [(path, name) for path, (_, saes) in sources.items() for name in saes]
    clashes = {name for _, name in keys if sum(other == name for _, other in keys) > 1}
    return {(path, name): f"{path}:{name}" if name in clashes else name for path, name in keys}


def resolve(args: EvaluationArguments, saes: dict[str, DeepSAEModel]) -> dict[str, Any]:
    """Model and data settings: flags, else the SAEs' training record, else TrainingConfig's."""
    trained = next(iter(saes.values())).config.training_config or {}
    defaults = {field.name: field.default for field in dataclasses.fields(TrainingConfig)}
    settings = {
        name: value
        if (value := getattr(args, name)) is not None
        else trained.get(name, defaults[name])
        for name in DATA_FIELDS
    }
    base_models = {sae.config.base_model_name_or_path for sae in saes.values()} - {None}
    if args.model_name_or_path is None and len(base_models) > 1:
        raise ValueError(
            f"the SAEs come from different base models {sorted(base_models)}; pick "
            "one with --model_name_or_path (and evaluate the others separately)"
        )
    settings["model_name_or_path"] = args.model_name_or_path or next(
        iter(base_models), trained.get("model_name_or_path", EMBEDDED_MODEL_NAME)
    )
    settings["n_tokens"] = args.n_tokens or trained.get("eval_tokens", defaults["eval_tokens"])
    return settings


def evaluation_chunks(settings: dict[str, Any], tokenizer: Any, accelerator: Accelerator) -> Any:
    """This process's share of the first `n_tokens` tokens' worth of chunks."""
    with accelerator.main_process_first():
        dataset = load_text_dataset(
            settings["dataset_name"],
            config_name=settings["dataset_config_name"],
            data_files=settings["data_files"],
            split=settings["dataset_split"],
            text_column=settings["text_column"],
            streaming=settings["streaming"],
        )
        chunks = tokenize_and_chunk(
            dataset, tokenizer, settings["context_length"], settings["text_column"]
        )
    n_chunks = math.ceil(settings["n_tokens"] / settings["context_length"])
    if isinstance(chunks, Dataset):
        if len(chunks) < n_chunks:
            raise ValueError(
                f"the dataset has {len(chunks) * settings['context_length']:,} tokens in "
                f"{len(chunks)} chunks of {settings['context_length']}, fewer than --n_tokens "
                f"{settings['n_tokens']:,}; lower --n_tokens or --context_length, or use more text"
            )
        chunks = chunks.select(range(n_chunks))
    else:
        chunks = chunks.take(n_chunks)
    return split_dataset_by_node(chunks, accelerator.process_index, accelerator.num_processes)


def print_table(scalars: dict[str, dict[str, float]], print_fn: Any = print) -> None:
    columns = [
        ("tokens", "n_tokens", "{:,}"),
        ("FVU", "fvu", "{:.4f}"),
        ("L0", "l0", "{:.1f}"),
        ("dead", "dead_fraction", "{:.1%}"),
        ("dense", "dense_fraction", "{:.1%}"),
        ("cos", "cosine_similarity", "{:.3f}"),
        ("CE score", "ce_loss_score", "{:.3f}"),
        ("CE +", "ce_loss_increase", "{:.4g}"),
        ("KL", "kl_spliced", "{:.4g}"),
        ("KL score", "kl_score", "{:.3f}"),
    ]
    rows = [["SAE", *(title for title, _, _ in columns)]]
    for name, values in scalars.items():
        rows.append(
            [name, *(fmt.format(values[key]) if key in values else "—" for _, key, fmt in columns)]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print_fn(
            "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            )
        )


def save_to_saes(
    sources: dict[str, tuple[str, dict[str, DeepSAEModel]]],
    result: SAEEvaluationResult | None,
    names: dict[tuple[str, str], str],
    benchmark_results: dict[str, dict[str, Any]],
) -> None:
    """Merge the numbers into each local SAE's `config.metrics`; rewrite its folder and card."""
    scalars = result.scalars() if result is not None else {}
    for path, (kind, saes) in sources.items():
        density = {}
        for name, sae in saes.items():
            key = names[(path, name)]
            sae.config.metrics = {**(sae.config.metrics or {}), **scalars.get(key, {}),
                                  **benchmark_scalars(benchmark_results.get(key, {}))}
            density[name] = None if result is None else result.activations[key].feature_density
        if kind == "single":
            ((name, sae),) = saes.items()
            save_sae(sae, path, density_plot=density[name])
        else:
            save_saes(saes, path, density_plots=None if result is None else density)


def autointerp_corpus(settings: dict[str, Any], tokenizer: Any, config: AutoInterpConfig) -> Any:
    """`[n, context_length]` token ids: the first `config.n_tokens` tokens of the data."""
    dataset = load_text_dataset(
        settings["dataset_name"], config_name=settings["dataset_config_name"],
        data_files=settings["data_files"], split=settings["dataset_split"],
        text_column=settings["text_column"], streaming=settings["streaming"])
    chunks = tokenize_and_chunk(dataset, tokenizer, config.context_length,
                                settings["text_column"])
    n_chunks = max(config.n_tokens // config.context_length, 1)
    rows = list(chunks.take(n_chunks) if not isinstance(chunks, Dataset)
                else chunks.select(range(min(n_chunks, len(chunks)))))
    return torch.stack([torch.as_tensor(row["input_ids"]) for row in rows])


def run_benchmarks(args: EvaluationArguments, configs: dict[str, Any], judge: JudgeConfig,
                   settings: dict[str, Any], model: Any, tokenizer: Any,
                   saes: dict[str, DeepSAEModel]) -> dict[str, dict[str, Any]]:
    """`{sae: {benchmark: result}}` for the interpretability benchmarks in `--benchmarks`."""
    chosen = [name for name in args.benchmarks if name in BENCHMARKS]
    tasks = None
    if args.probing_dataset is not None:
        tasks = [load_classification_task(
            args.probing_dataset, text_column=args.probing_text_column,
            label_column=args.probing_label_column,
            config_name=args.probing_dataset_config_name, split=args.probing_dataset_split)]
    corpus = (autointerp_corpus(settings, tokenizer, configs["autointerp"])
              if "autointerp" in chosen else None)
    suite = BenchmarkSuite(
        model, tokenizer, chosen, absorption=configs["absorption"],
        sparse_probing=configs["sparse_probing"], probing_tasks=tasks,
        autointerp=configs["autointerp"], judge=judge, corpus_ids=corpus)
    return {name: suite.evaluate(sae) for name, sae in saes.items()}


def main(argv: list[str] | None = None) -> SAEEvaluationResult | None:
    """Run the evaluation; returns the core metrics (None without `core`), and writes every
    result to `metrics.json`."""
    flag_classes = [prefixed(config, prefix) for prefix, config in CONFIG_FLAGS.items()]
    args, *flags, judge = HfArgumentParser(
        (EvaluationArguments, *flag_classes, JudgeConfig)
    ).parse_args_into_dataclasses(args=list(sys.argv[1:] if argv is None else argv))
    configs = {prefix: unprefixed(values, config, prefix)
               for (prefix, config), values in zip(CONFIG_FLAGS.items(), flags, strict=True)}
    accelerator = Accelerator()
    sources = load_sae_sources(args.sae)
    remote = [path for path in sources if not Path(path).is_dir()]
    if args.save_to_sae and remote:
        raise ValueError(f"--save_to_sae writes into local SAE folders; {remote} are not local")
    names = display_names(sources)
    saes = {
        names[(path, name)]: sae.to(accelerator.device).eval()
        for path, (_, group) in sources.items()
        for name, sae in group.items()
    }
    settings = resolve(args, saes)
    model, tokenizer = load_language_model(
        settings["model_name_or_path"],
        dtype=settings["lm_dtype"],
        device=accelerator.device,
        verbose=accelerator.is_main_process,
    )
    result = None
    if "core" in args.benchmarks:
        evaluator = SAEEvaluator(
            model,
            saes,
            language_model_metrics=not args.no_language_model,
            jointly=args.jointly,
            allow_base_model_mismatch=args.allow_base_model_mismatch,
            token_mask=TokenMask.from_fields(settings),
            tokenizer=tokenizer,
        )
        chunks = evaluation_chunks(settings, tokenizer, accelerator)
        progress = tqdm(
            total=math.ceil(settings["n_tokens"] / settings["context_length"])
            * settings["context_length"],
            desc=f"Evaluating {len(saes)} SAE{'s' if len(saes) > 1 else ''}",
            unit="tok",
            unit_scale=True,
            disable=not accelerator.is_main_process,
        )
        for batch in chunks.iter(batch_size=settings["lm_batch_size"]):
            input_ids = torch.as_tensor(batch["input_ids"])
            evaluator.update(input_ids)
            progress.update(input_ids.numel() * accelerator.num_processes)
        progress.close()
        (metrics, masked_tokens), *others = gather_object(
            [(evaluator.metrics, evaluator.masked_tokens)])
        for other, masked in others:
            metrics.merge(other)
            masked_tokens += masked
        result = metrics.compute(min_tokens=settings["n_tokens"] - masked_tokens)
    if accelerator.is_main_process:
        benchmark_results = (run_benchmarks(args, configs, judge, settings, model, tokenizer, saes)
                             if set(args.benchmarks) & set(BENCHMARKS) else {})
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        record = {"sae": args.sae, "settings": settings,
                  "results": result.to_dict() if result is not None else {},
                  "benchmarks": {name: {benchmark: value.to_dict()
                                        for benchmark, value in results.items()}
                                 for name, results in benchmark_results.items()}}
        (output_dir / "metrics.json").write_text(json.dumps(record, indent=2, default=float))
        if result is not None:
            densities = {name: m.feature_density for name, m in result.activations.items()}
            plot_feature_density(densities, output_dir / "feature_density.png")
            if len(result.activations) > 1:
                plot_fvu_vs_l0(result.activations, output_dir / "fvu_vs_l0.png")
            print_table(result.scalars(), accelerator.print)
        for name, results in benchmark_results.items():
            accelerator.print(f"{name}: " + ", ".join(
                f"{key} {value:.4g}" for key, value in benchmark_scalars(results).items()))
        if args.save_to_sae:
            save_to_saes(sources, result, names, benchmark_results)
        accelerator.print(f"Wrote {output_dir / 'metrics.json'} and the plots to {output_dir}")
    return result


if __name__ == "__main__":
    main()
