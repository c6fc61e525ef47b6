"""The canonical Accelerate loop: build → `prepare` → stream → step → log → `save_state` → save.

One SAE (with its own optimizers, schedulers and dead-latent counter) per hookpoint, all fed by
the same forward pass of the frozen language model, which is never wrapped by `prepare`. DDP
across processes, CPU or GPU: each process reads its own shard of the corpus, gradients and
dead-latent counters are all-reduced, so every process holds the same SAEs.

NaN policy: activation rows holding NaN/inf are dropped before training and counted
(`nonfinite_rows` in the logs and the saved metrics); a non-finite *loss* stops the run with the
offending steps, since the weights are then already ruined.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, parse_flag_from_env, set_seed
from datasets import Dataset
from datasets.distributed import split_dataset_by_node
from huggingface_hub import get_token
from tqdm.auto import tqdm

from ..activations import (
    ActivationStream,
    ModelActivations,
    TokenChunks,
    load_language_model,
    load_text_dataset,
    tokenize_and_chunk,
)
from ..configuration_deepsae import TOPK_KINDS, DeepSAEConfig
from ..evaluation import ActivationMetrics, ActivationMetricsResult
from ..hub import push_saes_to_hub, save_saes
from ..modeling_deepsae import DeepSAEModel
from ..precision import adopt_device_precision, device_precision, orthogonalization_dtype
from ..sites import Site, capture_activations, find_mlp_sites, resolve_sites
from ..sparsity import selection_dtype
from .activation_cache import open_or_build_cache
from .checkpointing import find_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainingConfig, sae_config_kwargs
from .dead_latents import DeadLatentCounter
from .optim import build_optimizers, build_scheduler, std_coefficient_at, update_sae


class Target(NamedTuple):
    """Where one SAE sits: its hookpoint (the module path it reconstructs the output of), the
    layer index when known, the site it reads and the site it reconstructs (the same for SAEs,
    MLP input and output for transcoders)."""

    hookpoint: str
    layer: int | None
    read: Site
    write: Site


@dataclass
class SAERun:
    """One SAE being trained, with everything that steps with it."""

    target: Target
    sae: Any
    optimizers: list
    schedulers: list
    dead: DeadLatentCounter

    @property
    def name(self) -> str:
        return self.target.hookpoint

    @property
    def log_prefix(self) -> str:
        return f"layer_{self.target.layer}" if self.target.layer is not None else self.name

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(SAE input, transcoder target or None) from a batch keyed by `site_name`."""
        read, write = self.target.read, self.target.write
        return batch[site_name(read)], None if write == read else batch[site_name(write)]


def site_name(site: Site) -> str:
    """A string key for a `Site` (safetensors keys and logs need strings)."""
    return f"{site.path}:{site.side}"


def capture_sites(targets: list[Target]) -> dict[str, Site]:
    """Every site the targets read or reconstruct, keyed by `site_name`."""
    return {site_name(site): site for target in targets for site in (target.read, target.write)}


def check_output_dir(path: str | Path) -> Path:
    """Create `path` and prove it writable now, not after an hour of training."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"output_dir {str(folder)!r} is not writable ({error}); pick another "
                         "--output_dir") from None
    return folder


def _check_early(config: TrainingConfig, sae_kwargs: dict[str, Any]) -> None:
    """Input mistakes that need neither the model nor the data."""
    if sae_kwargs["sparsity"] in TOPK_KINDS and config.batch_size < sae_kwargs["k"]:
        raise ValueError(f"batch_size={config.batch_size} is smaller than k={sae_kwargs['k']}; "
                         "use a batch of at least k tokens (thousands is typical)")
    if config.push_to_hub and get_token() is None:
        raise ValueError("--push_to_hub needs a Hub login: run `hf auth login` or set HF_TOKEN")


def _split_chunks(chunks: Any, config: TrainingConfig, accelerator: Accelerator) -> tuple[Any, Any]:
    """(this process's training chunks, the held-out evaluation chunks)."""
    n_eval = math.ceil(config.eval_tokens / config.context_length)
    if isinstance(chunks, Dataset):
        if len(chunks) < n_eval + accelerator.num_processes:
            raise ValueError(
                f"the corpus has {len(chunks)} chunks of {config.context_length} tokens: too few "
                f"for {n_eval} held-out chunks (--eval_tokens) plus one per process; use more "
                "text or lower --eval_tokens/--context_length")
        eval_chunks, train_chunks = chunks.select(range(n_eval)), chunks.select(
            range(n_eval, len(chunks)))
    else:
        eval_chunks, train_chunks = chunks.take(n_eval), chunks.skip(n_eval)
    shard = split_dataset_by_node(train_chunks, accelerator.process_index,
                                  accelerator.num_processes)
    return shard, eval_chunks


def resolve_targets(model: Any, config: TrainingConfig, transcoder: bool) -> list[Target]:
    """One `Target` per entry of `--hookpoints` (or else `--layers`); raises on bad ones."""
    keys: list[int | str] = list(config.hookpoints or config.layers)
    try:
        layer_of = {path: layer for layer, path in find_mlp_sites(model).items()}
    except ValueError:  # an unknown architecture: explicit hookpoints still work
        layer_of = {}
    targets = []
    for key in keys:
        read, write = resolve_sites(model, key, transcoder=transcoder)
        targets.append(Target(write.path, layer_of.get(write.path), read, write))
    if len({target.hookpoint for target in targets}) != len(targets):
        raise ValueError(f"--layers/--hookpoints name the same site twice: {keys}")
    return targets


def _build_runs(model: Any, tokenizer: Any, stream: ActivationStream, config: TrainingConfig,
                sae_kwargs: dict[str, Any], targets: list[Target], num_steps: int,
                accelerator: Accelerator, resuming: bool
                ) -> tuple[list[SAERun], dict[str, torch.Tensor] | None]:
    """Create the SAEs with their optimizers and `prepare` them.

    Unless resuming, the first batch initialises each SAE (`b_dec`, input scale) before `prepare`,
    which broadcasts the main process's weights; the batch is returned to be trained on first.
    """
    probe = torch.full((1, 2), tokenizer.eos_token_id, device=model.device)
    widths = {name: activations.shape[-1] for name, activations in capture_activations(
        model, probe, list(capture_sites(targets).values())).items()}
    first_batch = None if resuming else next(stream)
    set_seed(config.seed)
    runs = []
    for target in targets:
        sae_config = DeepSAEConfig(
            **sae_kwargs, d_in=widths[target.read],
            d_out=widths[target.write] if sae_kwargs["transcoder"] else None,
            base_model_name_or_path=model.name_or_path, hookpoint=target.hookpoint,
            layer=target.layer,
        )
        sae = DeepSAEModel(sae_config).to(accelerator.device)
        run = SAERun(target, sae, [], [], DeadLatentCounter(
            sae_config.n_total_latents, config.resolved_dead_threshold_tokens(),
            accelerator.device))
        if first_batch is not None:
            sae.initialize_from_activations(*run.inputs(first_batch))
        lr = config.resolved_lr(sae_config.n_latents)
        optimizers = build_optimizers(sae, config, lr)
        schedulers = [build_scheduler(optimizer, config, num_steps) for optimizer in optimizers]
        run.sae, *prepared = accelerator.prepare(sae, *optimizers, *schedulers)
        run.optimizers, run.schedulers = prepared[:len(optimizers)], prepared[len(optimizers):]
        accelerator.register_for_checkpointing(run.dead)
        runs.append(run)
    return runs, first_batch


def _activation_source(model: Any, targets: list[Target], shard: Any, config: TrainingConfig,
                       accelerator: Accelerator) -> Any:
    """Activations from the model, or from the on-disk cache (built on first use)."""
    chunks = TokenChunks(shard, config.lm_batch_size, config.seed)
    source = ModelActivations(model, capture_sites(targets), chunks)
    if config.activation_cache_dir is None:
        return source
    metadata = {name: getattr(config, name) for name in (
        "model_name_or_path", "lm_dtype", "dataset_name", "dataset_config_name", "data_files",
        "dataset_split", "text_column", "streaming", "context_length", "eval_tokens")}
    return open_or_build_cache(
        source, config.activation_cache_dir, metadata,
        max_rows=math.ceil(config.total_tokens / accelerator.num_processes),
        rows_per_shard=max(config.batch_size, config.shuffle_buffer_size // 4),
        accelerator=accelerator, seed=config.seed)


METRICS = ("loss", "fvu", "l0", "aux_loss", "pre_act_std")


def _train_step(run: SAERun, batch: dict[str, torch.Tensor], config: TrainingConfig,
                accelerator: Accelerator, std_coefficient: float) -> torch.Tensor:
    """Forward/backward one batch; on the last micro-batch, the optimizer step. Returns metrics."""
    inputs, target = run.inputs(batch)
    out = run.sae(inputs, target=target, dead_mask=run.dead.dead_mask,
                  std_coefficient=std_coefficient)
    accelerator.backward(out.loss)
    run.dead.update(out.latent_acts, out.latent_indices,
                    n_tokens=config.batch_size * accelerator.num_processes,
                    reduce=lambda fired: accelerator.reduce(fired, "sum"))
    if accelerator.sync_gradients:
        update_sae(accelerator.unwrap_model(run.sae), run.optimizers, run.schedulers,
                   config.max_grad_norm, accelerator.clip_grad_norm_)
    l0 = (out.latent_acts != 0).sum(-1).float().mean()
    return torch.stack([out.loss, out.fvu, l0, out.aux_loss, out.pre_act_std]).detach().float()


def _log(runs: list[SAERun], sums: dict[str, torch.Tensor], window_steps: int, step: int,
         stream: ActivationStream, accelerator: Accelerator) -> dict[str, float]:
    """Average the window's metrics over steps and processes; log them; stop on a NaN loss."""
    logs: dict[str, float] = {}
    for run in runs:
        means = (accelerator.reduce(sums[run.name], "mean") / window_steps).tolist()
        if not all(math.isfinite(value) for value in means):
            raise RuntimeError(
                f"{run.name}: the loss became non-finite between steps {step - window_steps} and "
                f"{step} ({dict(zip(METRICS, means, strict=True))}); lower --lr or "
                "--max_grad_norm, or use --mixed_precision no")
        prefix = run.log_prefix
        logs.update({f"{prefix}/{name}": value for name, value in zip(METRICS, means, strict=True)})
        logs[f"{prefix}/dead_fraction"] = run.dead.dead_fraction()
        logs[f"{prefix}/lr"] = run.schedulers[0].get_last_lr()[0]
    logs["nonfinite_rows"] = stream.nonfinite_rows
    accelerator.log(logs, step=step)
    return logs


@torch.no_grad()
def evaluate_runs(runs: list[SAERun], model: Any, eval_chunks: Any, config: TrainingConfig,
                  accelerator: Accelerator) -> dict[str, ActivationMetricsResult]:
    """FVU, L0, dead/dense fractions… of every SAE on `eval_tokens` held-out tokens."""
    capture = capture_sites([run.target for run in runs])
    source = ModelActivations(model, capture, TokenChunks(eval_chunks, config.lm_batch_size, 0))
    saes = {run.name: accelerator.unwrap_model(run.sae).eval() for run in runs}
    metrics = {run.name: ActivationMetrics(saes[run.name].config.n_total_latents) for run in runs}
    rows = 0
    while rows < config.eval_tokens and source.epoch == 0:
        block = source.next_block()
        finite = torch.stack([torch.isfinite(x).all(-1) for x in block.values()]).all(0)
        block = {name: x[finite][: config.eval_tokens - rows] for name, x in block.items()}
        for run in runs:
            inputs, target = run.inputs(block)
            out = saes[run.name](inputs, target=target)
            metrics[run.name].update(inputs if target is None else target, out.reconstruction,
                                     out.latent_acts, out.latent_indices)
        rows += int(finite.sum())
    return {name: metric.compute() for name, metric in metrics.items()}


def precision_choices(config: TrainingConfig, sae_kwargs: dict[str, Any],
                      accelerator: Accelerator, lm_dtype: torch.dtype) -> dict[str, str | None]:
    """The dtype of every part of this run, "auto" resolved by `hf_deepsae.precision`."""
    device = accelerator.device
    with accelerator.autocast():
        selection = selection_dtype(sae_kwargs["topk_selection_dtype"], device, torch.float32)
    muon = config.muon_orthogonalization_dtype
    muon_dtype = orthogonalization_dtype(device) if muon == "auto" else getattr(torch, muon)
    return {
        "mixed_precision": accelerator.mixed_precision,
        "muon_orthogonalization_dtype": _name(muon_dtype) if config.optimizer == "muon" else None,
        "topk_selection_dtype": _name(selection) if sae_kwargs["sparsity"] == "topk" else None,
        "lm_dtype": _name(lm_dtype),
    }


def _agree_on_precision(state: PartialState) -> None:
    """Every process adopts the main process's precision findings (DDP steps the same weights
    everywhere, so every process must choose the same dtypes)."""
    if state.num_processes > 1:
        found = [device_precision(state.device) if state.is_main_process else None]
        adopt_device_precision(state.device, broadcast_object_list(found)[0])


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tracker_config(config: TrainingConfig, sae_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters as trackers accept them (scalars and strings only)."""
    values = {**dataclasses.asdict(config), **sae_kwargs}
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in values.items()}


def train(config: TrainingConfig, sae_arguments: Any = None) -> dict[str, DeepSAEModel]:
    """Train one SAE per hookpoint as `config` says; returns `{hookpoint: trained SAE}`.

    The main process also saves each SAE to `output_dir/<hookpoint>` with a model card, its
    training config and held-out metrics in `config.metrics`, and prints where and how good.
    `sae_arguments` is an `SAEArguments`, a dict of overrides of `DEFAULT_SAE_RECIPE`, or None.
    Works unchanged under `accelerate launch` (DDP, CPU or GPU) and plain `python`.
    """
    sae_kwargs = sae_config_kwargs(sae_arguments)
    _check_early(config, sae_kwargs)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator will
    _agree_on_precision(state)
    accelerator = Accelerator(
        mixed_precision=config.resolved_mixed_precision(state.device),
        log_with=config.log_with,
        project_dir=config.output_dir, step_scheduler_with_optimizer=False,
        gradient_accumulation_steps=config.gradient_accumulation_steps)
    output_dir = check_output_dir(config.output_dir)
    checkpoint = (find_checkpoint(output_dir, config.resume_from_checkpoint)
                  if config.resume_from_checkpoint else None)
    tokens_per_step = config.batch_size * config.gradient_accumulation_steps * \
        accelerator.num_processes
    num_steps = config.total_tokens // tokens_per_step
    if num_steps == 0:
        raise ValueError(f"total_tokens={config.total_tokens} is less than one step "
                         f"({tokens_per_step} tokens over {accelerator.num_processes} processes)")

    with accelerator.main_process_first():
        dataset = load_text_dataset(
            config.dataset_name, config_name=config.dataset_config_name,
            data_files=config.data_files, split=config.dataset_split,
            text_column=config.text_column, streaming=config.streaming)
    model, tokenizer = load_language_model(config.model_name_or_path, dtype=config.lm_dtype,
                                           device=accelerator.device)
    targets = resolve_targets(model, config, sae_kwargs["transcoder"])
    dtypes = precision_choices(config, sae_kwargs, accelerator, model.dtype)
    accelerator.print(f"Precision on {device_precision(accelerator.device).summary()}: "
                      + ", ".join(f"{name} {value}" for name, value in dtypes.items()))
    with accelerator.main_process_first():
        chunks = tokenize_and_chunk(dataset, tokenizer, config.context_length, config.text_column)
    shard, eval_chunks = _split_chunks(chunks, config, accelerator)
    stream = ActivationStream(_activation_source(model, targets, shard, config, accelerator),
                              config.batch_size, config.shuffle_buffer_size, seed=config.seed,
                              device=accelerator.device)
    runs, pending = _build_runs(model, tokenizer, stream, config, sae_kwargs, targets,
                                num_steps, accelerator, resuming=checkpoint is not None)
    step = 0
    if checkpoint is not None:
        step, data_state = load_checkpoint(accelerator, checkpoint)
        stream.load_state_dict(data_state)
        accelerator.print(f"Resumed from {checkpoint} at step {step}/{num_steps}")
    accelerator.init_trackers("logs", config=_tracker_config(config, sae_kwargs))

    progress = tqdm(total=num_steps, initial=step, desc="Training SAE", unit="step",
                    disable=not accelerator.is_main_process)
    sums: dict[str, torch.Tensor] = {run.name: torch.zeros(len(METRICS)) for run in runs}
    window_steps, window_start = 0, time.perf_counter()
    while step < num_steps:
        for _ in range(config.gradient_accumulation_steps):
            batch = pending if pending is not None else next(stream)
            pending = None
            with accelerator.accumulate(*[run.sae for run in runs]):
                for run in runs:
                    coefficient = std_coefficient_at(
                        accelerator.unwrap_model(run.sae).config.std_coefficient,
                        config.std_coefficient_schedule, step, num_steps)
                    metrics = _train_step(run, batch, config, accelerator, coefficient)
                    sums[run.name] = sums[run.name].to(metrics.device) + metrics \
                        / config.gradient_accumulation_steps
        step += 1
        window_steps += 1
        progress.update(1)
        if step % config.logging_steps == 0 or step == num_steps:
            logs = _log(runs, sums, window_steps, step, stream, accelerator)
            speed = window_steps * tokens_per_step / (time.perf_counter() - window_start)
            first = runs[0].log_prefix
            progress.set_postfix({"tok/s": f"{speed:,.0f}", "fvu": f"{logs[f'{first}/fvu']:.3f}",
                                  "l0": f"{logs[f'{first}/l0']:.1f}",
                                  "dead": f"{logs[f'{first}/dead_fraction']:.1%}"})
            sums = {name: torch.zeros_like(total) for name, total in sums.items()}
            window_steps, window_start = 0, time.perf_counter()
        if config.checkpointing_steps and step % config.checkpointing_steps == 0 \
                and step < num_steps:
            save_checkpoint(accelerator, output_dir, step, stream.state_dict(),
                            config.save_total_limit)
    progress.close()
    return _finish(runs, model, eval_chunks, stream, config, num_steps, accelerator, output_dir,
                   precision_record={**dtypes, "device": device_precision(
                       accelerator.device).summary()})


def _finish(runs: list[SAERun], model: Any, eval_chunks: Any, stream: ActivationStream,
            config: TrainingConfig, num_steps: int, accelerator: Accelerator, output_dir: Path,
            precision_record: dict[str, Any]) -> dict[str, DeepSAEModel]:
    """Evaluate on held-out tokens, record config + metrics in each SAE, save (and push)."""
    accelerator.wait_for_everyone()
    saes = {run.name: accelerator.unwrap_model(run.sae) for run in runs}
    if accelerator.is_main_process:
        results = evaluate_runs(runs, model, eval_chunks, config, accelerator)
        for run in runs:
            sae = saes[run.name]
            sae.config.training_config = {
                **dataclasses.asdict(config), "lr": config.resolved_lr(sae.config.n_latents),
                "dead_threshold_tokens": config.resolved_dead_threshold_tokens(),
                "num_processes": accelerator.num_processes, "num_steps": num_steps,
                "precision": precision_record}
            sae.config.metrics = {
                **results[run.name].scalars(), "dead_fraction_training": run.dead.dead_fraction(),
                "nonfinite_rows_skipped": stream.nonfinite_rows,
                "train_tokens": num_steps * config.batch_size * config.gradient_accumulation_steps
                * accelerator.num_processes}
        save_saes(saes, output_dir, density_plots={
            name: result.feature_density for name, result in results.items()})
        for run in runs:
            metrics = saes[run.name].config.metrics
            accelerator.print(
                f"Saved the SAE for {run.name} to {output_dir / run.name}\n"
                f"  held-out ({metrics['n_tokens']:,} tokens): FVU {metrics['fvu']:.4f}, "
                f"L0 {metrics['l0']:.1f}, never fired {metrics['dead_fraction']:.1%}; "
                f"dead in training (silent for {config.resolved_dead_threshold_tokens():,} "
                f"tokens) {metrics['dead_fraction_training']:.1%}")
        if config.push_to_hub:
            commit = push_saes_to_hub(saes, config.hub_model_id or output_dir.resolve().name)
            accelerator.print(f"Pushed to {commit.repo_url}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return saes
