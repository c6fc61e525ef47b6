"""The canonical Accelerate loop: build → `prepare` → stream → step → log → `save_state` → save.

One SAE (with its own optimizers, schedulers and dead-latent counter) per hookpoint, all fed by
the same forward pass of the frozen language model, which is never wrapped by `prepare`. Across
processes, CPU or GPU, each process reads its own shard of the corpus; by default (DDP) gradients
and dead-latent counters are all-reduced, so every process holds the same SAEs. `distributed.py`
says where SAEs live otherwise (`--distribute_hookpoints`, `--shard_latents`) and what crosses
processes; `failures.py` makes processes fail together instead of hanging.

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
from accelerate import Accelerator
from accelerate.utils import set_seed
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
from ..sites import Site, capture_activations, find_mlp_sites, resolve_sites
from .activation_cache import open_or_build_cache
from .checkpointing import find_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainingConfig, sae_config_kwargs
from .dead_latents import DeadLatentCounter
from .distributed import SAEParallelism
from .failures import check_same_on_every_process, fail_together, process_group_kwargs
from .optim import build_optimizers, build_scheduler, std_coefficient_at, update_sae


class Target(NamedTuple):
    """Where one SAE sits: its hookpoint (the module path it reconstructs the output of), the
    layer index when known, the site it reads and the site it reconstructs (the same for SAEs,
    MLP input and output for transcoders)."""

    hookpoint: str
    layer: int | None
    read: Site
    write: Site

    @property
    def log_prefix(self) -> str:
        return f"layer_{self.layer}" if self.layer is not None else self.hookpoint


@dataclass
class SAERun:
    """One SAE being trained, with everything that steps with it."""

    target: Target
    sae: Any
    optimizers: list
    schedulers: list
    dead: DeadLatentCounter
    index: int = 0
    """Position among the run's targets."""

    @property
    def name(self) -> str:
        return self.target.hookpoint

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
                accelerator: Accelerator, parallelism: SAEParallelism, resuming: bool
                ) -> tuple[list[SAERun], list[dict[str, torch.Tensor]] | None]:
    """Create the SAEs this process trains, with their optimizers, and `prepare` them.

    Each SAE's initial weights depend on `seed` and its position only (not on which process
    builds it). Unless resuming, the first batch of the main process initialises each SAE
    (`b_dec`, input scale; `prepare` broadcasts them in DDP); the batches are returned to be
    trained on first.
    """
    probe = torch.full((1, 2), tokenizer.eos_token_id, device=model.device)
    widths = {name: activations.shape[-1] for name, activations in capture_activations(
        model, probe, list(capture_sites(targets).values())).items()}
    first_batches = None if resuming else parallelism.exchange(next(stream))
    runs = []
    for index, target in enumerate(targets):
        if not parallelism.trains(index):
            continue
        set_seed(config.seed + index)
        sae_config = DeepSAEConfig(
            **sae_kwargs, d_in=widths[target.read],
            d_out=widths[target.write] if sae_kwargs["transcoder"] else None,
            base_model_name_or_path=model.name_or_path, hookpoint=target.hookpoint,
            layer=target.layer,
        )
        sae = parallelism.build_sae(sae_config)
        run = SAERun(target, sae, [], [], DeadLatentCounter(
            sae_config.n_total_latents, config.resolved_dead_threshold_tokens(),
            accelerator.device), index)
        if first_batches is not None:
            sae.initialize_from_activations(*run.inputs(first_batches[0]))
        lr = config.resolved_lr(sae_config.n_latents)
        optimizers = build_optimizers(sae, config, lr, muon_class=parallelism.muon_class(sae))
        schedulers = [build_scheduler(optimizer, config, num_steps) for optimizer in optimizers]
        run.sae, run.optimizers, run.schedulers = parallelism.prepare(sae, optimizers, schedulers)
        runs.append(run)
    parallelism.register_for_checkpointing({run.index: run for run in runs})
    return runs, first_batches


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


def _train_step(run: SAERun, batches: list[dict[str, torch.Tensor]], config: TrainingConfig,
                accelerator: Accelerator, parallelism: SAEParallelism, std_coefficient: float
                ) -> torch.Tensor:
    """Forward/backward the batches (their losses averaged: one process's in DDP, every
    process's in the distributed modes); on the last micro-batch, the optimizer step. Returns
    the metrics, averaged over the batches."""
    metrics, fired = torch.zeros(len(METRICS)), torch.zeros((), dtype=torch.int32)
    for batch in batches:
        inputs, target = run.inputs(batch)
        with accelerator.autocast():
            out = run.sae(inputs, target=target, dead_mask=run.dead.dead_mask,
                          std_coefficient=std_coefficient)
        accelerator.backward(out.loss / len(batches))
        fired = fired + run.dead.fired(out.latent_acts, out.latent_indices)
        l0 = (out.latent_acts != 0).sum(-1).float().mean()
        metrics = metrics.to(l0.device) + torch.stack(
            [out.loss, out.fvu, l0, out.aux_loss, out.pre_act_std]).detach().float() / len(batches)
    run.dead.advance(parallelism.reduce_fired(fired),
                     n_tokens=config.batch_size * accelerator.num_processes)
    if accelerator.sync_gradients:
        update_sae(accelerator.unwrap_model(run.sae), run.optimizers, run.schedulers,
                   config.max_grad_norm, parallelism.clip_grad_norm(run.sae))
    return metrics


LOGGED = (*METRICS, "dead_fraction", "lr")


def _log(runs: list[SAERun], targets: list[Target], sums: dict[str, torch.Tensor],
         window_steps: int, step: int, stream: ActivationStream, accelerator: Accelerator,
         parallelism: SAEParallelism) -> dict[str, float]:
    """Average the window's metrics over steps and processes; log them; stop on a NaN loss."""
    local = torch.zeros(len(targets), len(LOGGED), device=accelerator.device)
    for run in runs:
        local[run.index] = torch.cat([sums[run.name].to(local.device) / window_steps, torch.tensor(
            [run.dead.dead_fraction(), run.schedulers[0].get_last_lr()[0]], device=local.device)])
    logs: dict[str, float] = {}
    for target, values in zip(targets, accelerator.reduce(
            local, parallelism.metrics_reduction).tolist(), strict=True):
        means = dict(zip(LOGGED, values, strict=True))
        if not all(math.isfinite(means[name]) for name in METRICS):
            raise RuntimeError(
                f"{target.hookpoint}: the loss became non-finite between steps "
                f"{step - window_steps} and {step} ({means}); lower --lr or --max_grad_norm, or "
                "use --mixed_precision no")
        logs.update({f"{target.log_prefix}/{name}": value for name, value in means.items()})
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


def _tracker_config(config: TrainingConfig, sae_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters as trackers accept them (scalars and strings only)."""
    values = {**dataclasses.asdict(config), **sae_kwargs}
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in values.items()}


def train(config: TrainingConfig, sae_arguments: Any = None) -> dict[str, DeepSAEModel]:
    """Train one SAE per hookpoint as `config` says; returns `{hookpoint: trained SAE}`.

    The main process also saves each SAE to `output_dir/<hookpoint>` with a model card, its
    training config and held-out metrics in `config.metrics`, and prints where and how good.
    `sae_arguments` is an `SAEArguments`, a dict of overrides of `DEFAULT_SAE_RECIPE`, or None.
    Works unchanged under `accelerate launch` (DDP, CPU or GPU) and plain `python`. With
    `--distribute_hookpoints`/`--shard_latents` on several processes, the other processes return
    `{}` (the main process gathers and saves every SAE).
    """
    sae_kwargs = sae_config_kwargs(sae_arguments)
    _check_early(config, sae_kwargs)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, log_with=config.log_with,
        project_dir=config.output_dir, step_scheduler_with_optimizer=False,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        kwargs_handlers=[process_group_kwargs(config.ddp_timeout)])
    with fail_together(accelerator):
        return _train(config, sae_kwargs, accelerator)


def _train(config: TrainingConfig, sae_kwargs: dict[str, Any], accelerator: Accelerator
           ) -> dict[str, DeepSAEModel]:
    """`train`'s body, once the accelerator (and its process group) exists."""
    check_same_on_every_process(accelerator, "the training configuration",
                                {**dataclasses.asdict(config), **sae_kwargs})
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
                                           device=accelerator.device,
                                           device_map=config.lm_device_map)
    targets = resolve_targets(model, config, sae_kwargs["transcoder"])
    parallelism = SAEParallelism(
        accelerator, shard_latents=config.shard_latents,
        distribute_hookpoints=config.distribute_hookpoints,
        sae_sites=[{site_name(target.read), site_name(target.write)} for target in targets])
    with accelerator.main_process_first():
        chunks = tokenize_and_chunk(dataset, tokenizer, config.context_length, config.text_column)
    shard, eval_chunks = _split_chunks(chunks, config, accelerator)
    stream = ActivationStream(_activation_source(model, targets, shard, config, accelerator),
                              config.batch_size, config.shuffle_buffer_size, seed=config.seed,
                              device=accelerator.device)
    runs, pending = _build_runs(model, tokenizer, stream, config, sae_kwargs, targets, num_steps,
                                accelerator, parallelism, resuming=checkpoint is not None)
    step = 0
    if checkpoint is not None:
        step, data_state = load_checkpoint(accelerator, checkpoint)
        check_same_on_every_process(accelerator, "the checkpoint to resume", {"step": step})
        stream.load_state_dict(data_state)
        accelerator.print(f"Resumed from {checkpoint} at step {step}/{num_steps}")
    accelerator.init_trackers("logs", config=_tracker_config(config, sae_kwargs))

    progress = tqdm(total=num_steps, initial=step, desc="Training SAE", unit="step",
                    disable=not accelerator.is_main_process)
    sums: dict[str, torch.Tensor] = {run.name: torch.zeros(len(METRICS)) for run in runs}
    window_steps, window_start = 0, time.perf_counter()
    while step < num_steps:
        for _ in range(config.gradient_accumulation_steps):
            batches = pending if pending is not None else parallelism.exchange(next(stream))
            pending = None
            with accelerator.accumulate(*[run.sae for run in runs]):
                for run in runs:
                    coefficient = std_coefficient_at(
                        accelerator.unwrap_model(run.sae).config.std_coefficient,
                        config.std_coefficient_schedule, step, num_steps)
                    metrics = _train_step(run, batches, config, accelerator, parallelism,
                                          coefficient)
                    sums[run.name] = sums[run.name].to(metrics.device) + metrics \
                        / config.gradient_accumulation_steps
        step += 1
        window_steps += 1
        progress.update(1)
        if step % config.logging_steps == 0 or step == num_steps:
            logs = _log(runs, targets, sums, window_steps, step, stream, accelerator, parallelism)
            speed = window_steps * tokens_per_step / (time.perf_counter() - window_start)
            first = targets[0].log_prefix
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
    return _finish(runs, targets, parallelism, model, eval_chunks, stream, config, num_steps,
                   accelerator, output_dir)


def _finish(runs: list[SAERun], targets: list[Target], parallelism: SAEParallelism, model: Any,
            eval_chunks: Any, stream: ActivationStream, config: TrainingConfig, num_steps: int,
            accelerator: Accelerator, output_dir: Path) -> dict[str, DeepSAEModel]:
    """Evaluate on held-out tokens, record config + metrics in each SAE, save (and push)."""
    accelerator.wait_for_everyone()
    results = evaluate_runs(runs, model, eval_chunks, config, accelerator) \
        if parallelism.evaluates_here and runs else {}
    finished = {targets[index].hookpoint: value for index, value in parallelism.gather_saes(
        {run.index: run for run in runs},
        {run.index: (results.get(run.name), run.dead.dead_fraction()) for run in runs}).items()}
    saes = {name: sae for name, (sae, _) in finished.items()}
    if accelerator.is_main_process:
        results = {name: result for name, (_, (result, _)) in finished.items()}
        for sae, (result, dead_fraction) in finished.values():
            sae.config.training_config = {
                **dataclasses.asdict(config), "lr": config.resolved_lr(sae.config.n_latents),
                "dead_threshold_tokens": config.resolved_dead_threshold_tokens(),
                "num_processes": accelerator.num_processes, "num_steps": num_steps}
            sae.config.metrics = {
                **result.scalars(), "dead_fraction_training": dead_fraction,
                "nonfinite_rows_skipped": stream.nonfinite_rows,
                "train_tokens": num_steps * config.batch_size * config.gradient_accumulation_steps
                * accelerator.num_processes}
        save_saes(saes, output_dir, density_plots={
            name: result.feature_density for name, result in results.items()})
        for name, sae in saes.items():
            metrics = sae.config.metrics
            accelerator.print(
                f"Saved the SAE for {name} to {output_dir / name}\n"
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
