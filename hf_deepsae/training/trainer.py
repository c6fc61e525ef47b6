"""The canonical Accelerate loop: build → `prepare` → stream → step → log → checkpoint → save.

One SAE (with its own optimizers, schedulers and dead-latent counter) per hookpoint, all fed by
the same forward pass of the frozen language model, which is never wrapped by `prepare`. Across
processes, CPU or GPU, each process reads its own shard of the corpus; by default (DDP) gradients
and dead-latent counters are all-reduced, so every process holds the same SAEs. `distributed.py`
says where SAEs live otherwise (`--distribute_hookpoints`, `--shard_latents`) and what crosses
processes; `failures.py` makes processes fail together instead of hanging.

NaN policy: activation rows holding NaN/inf are dropped before training and counted
(`nonfinite_rows` in the logs and the saved metrics), as are the positions the token mask leaves
out (`masked_rows`; BOS and each chunk's first position by default, see `token_mask`); a
non-finite loss (checked at log steps) or training state (checked before every checkpoint) stops
the run with the offending steps, the last finite checkpoint and the command that resumes it with
a lower learning rate.

Checkpoints (`checkpointing`) hold only safetensors and JSON, the same files in every mode, are
written atomically every `checkpointing_steps`, every `checkpointing_minutes` and on
Ctrl-C/SIGTERM, and record the run's identity (`run_identity`): resuming with other settings, or a
second run in a used `output_dir`, fails with what differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import parse_flag_from_env, set_seed
from huggingface_hub import get_token
from tqdm.auto import tqdm

from ..activations import (
    ActivationStream,
    load_language_model,
    load_text_dataset,
    tokenize_and_chunk,
)
from ..configuration_deepsae import TOPK_KINDS, DeepSAEConfig
from ..modeling_deepsae import DeepSAEModel
from .activation_cache import CachedActivations
from .checkpointing import (
    NonFiniteStateError,
    find_checkpoint,
    load_checkpoint,
    open_checkpoint,
    read_data_state,
    save_checkpoint,
)
from .config import TrainingConfig, sae_config_kwargs
from .data import activation_source, activations_identity, split_chunks
from .dead_latents import DeadLatentCounter
from .distributed import SAEParallelism, TrainingStates
from .failures import check_same_on_every_process, fail_together, process_group_kwargs
from .finish import finish_run
from .init_from import check_initial_site, initial_sae
from .interruption import StopRequests, TrainingInterrupted, agreed_flags
from .k_schedule import KSchedule, active_k
from .optim import build_optimizers, build_scheduler, std_coefficient_at, update_sae
from .run_identity import RunPosition, hold_output_dir, prepare_output_dir, run_settings
from .run_precision import agree_on_precision, describe, precision_choices
from .targets import SAERun, Target, capture_sites, resolve_targets, sae_configs, site_name


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
    if config.k_anneal_steps and sae_kwargs["sparsity"] not in TOPK_KINDS:
        raise ValueError(f"--k_anneal_steps anneals k, which sparsity={sae_kwargs['sparsity']!r} "
                         f"has none of; use {' or '.join(TOPK_KINDS)}, or drop the flag")
    if config.push_to_hub and get_token() is None:
        raise ValueError("--push_to_hub needs a Hub login: run `hf auth login` or set HF_TOKEN")


def _build_runs(configs: list[DeepSAEConfig], targets: list[Target], stream: ActivationStream,
                config: TrainingConfig, num_steps: int, accelerator: Accelerator,
                parallelism: SAEParallelism, resuming: bool, initial: DeepSAEModel | None
                ) -> tuple[list[SAERun], list[dict[str, torch.Tensor]] | None]:
    """Create the SAEs this process trains, with their optimizers, and `prepare` them.

    Each SAE's initial weights depend on `seed` and its position only (not on which process
    builds it), or are `initial`'s (`--init_from`). Unless resuming or starting from `initial`,
    the first batch of the main process initialises each SAE (`b_dec`, input scale; `prepare`
    broadcasts them in DDP); the batches are returned to be trained on first.
    """
    first_batches = None if resuming else parallelism.exchange(next(stream))
    runs = []
    for index, (target, sae_config) in enumerate(zip(targets, configs, strict=True)):
        if not parallelism.trains(index):
            continue
        set_seed(config.seed + index)
        sae = parallelism.build_sae(sae_config,
                                    None if initial is None else initial.state_dict())
        run = SAERun(target, sae, [], [], DeadLatentCounter(
            sae_config.n_total_latents, config.resolved_dead_threshold_tokens(),
            accelerator.device), index)
        if first_batches is not None and initial is None:
            sae.initialize_from_activations(*run.inputs(first_batches[0]))
        lr = config.resolved_lr(sae_config.n_latents)
        optimizers = build_optimizers(sae, config, lr, muon_class=parallelism.muon_class(sae))
        schedulers = [build_scheduler(optimizer, config, num_steps) for optimizer in optimizers]
        run.sae, run.optimizers, run.schedulers = parallelism.prepare(sae, optimizers, schedulers)
        runs.append(run)
    return runs, first_batches


METRICS = ("loss", "fvu", "l0", "aux_loss", "pre_act_std")
RUN_STATE = ("dead_fraction", "lr")


def metric_names(config: DeepSAEConfig) -> tuple[str, ...]:
    """What `_train_step` measures of an SAE: `METRICS`, then each Matryoshka prefix's FVU."""
    return METRICS + tuple(f"matryoshka_fvu_{prefix}"
                           for prefix in config.matryoshka_prefixes or ())


def _train_step(run: SAERun, batches: list[dict[str, torch.Tensor]], config: TrainingConfig,
                accelerator: Accelerator, parallelism: SAEParallelism, std_coefficient: float
                ) -> torch.Tensor:
    """Forward/backward the batches (their losses averaged: one process's in DDP, every
    process's in the distributed modes); on the last micro-batch, the optimizer step. Returns
    the metrics (`metric_names`), averaged over the batches."""
    measured, fired = [], torch.zeros((), dtype=torch.int32)
    for batch in batches:
        inputs, target = run.inputs(batch)
        with accelerator.autocast():
            out = run.sae(inputs, target=target, dead_mask=run.dead.dead_mask,
                          std_coefficient=std_coefficient)
        accelerator.backward(out.loss / len(batches))
        fired = fired + run.dead.fired(out.latent_acts, out.latent_indices)
        l0 = (out.latent_acts != 0).sum(-1).float().mean()
        prefix_fvus = l0.new_zeros(0) if out.matryoshka_fvu is None else out.matryoshka_fvu
        measured.append(torch.cat([torch.stack([out.loss, out.fvu, l0, out.aux_loss,
                                                out.pre_act_std]), prefix_fvus]).detach().float())
    run.dead.advance(parallelism.reduce_fired(fired),
                     n_tokens=config.batch_size * accelerator.num_processes)
    if accelerator.sync_gradients:
        update_sae(accelerator.unwrap_model(run.sae), run.optimizers, run.schedulers,
                   config.max_grad_norm, parallelism.clip_grad_norm(run.sae))
    return torch.stack(measured).mean(0)


def _log(runs: list[SAERun], targets: list[Target], names: list[tuple[str, ...]],
         sums: dict[str, torch.Tensor], window_steps: int, step: int, stream: ActivationStream,
         accelerator: Accelerator, parallelism: SAEParallelism) -> dict[str, float]:
    """Average the window's metrics (`names[i]` those of target i) over steps and processes, with
    each run's `RUN_STATE`; log them; stop on a NaN loss."""
    local = torch.zeros(len(targets), max(map(len, names)) + len(RUN_STATE),
                        device=accelerator.device)
    for run in runs:
        measured = sums[run.name].to(local.device) / window_steps
        local[run.index, :len(measured)] = measured
        local[run.index, -len(RUN_STATE):] = torch.tensor(
            [run.dead.dead_fraction(), run.schedulers[0].get_last_lr()[0]], device=local.device)
    logs: dict[str, float] = {}
    for target, target_names, values in zip(targets, names, accelerator.reduce(
            local, parallelism.metrics_reduction).tolist(), strict=True):
        means = dict(zip(target_names, values[:len(target_names)], strict=True)) | dict(
            zip(RUN_STATE, values[-len(RUN_STATE):], strict=True))
        if not all(math.isfinite(means[name]) for name in METRICS):
            shown = ", ".join(f"{name} {means[name]:.4g}" for name in METRICS)
            raise NonFiniteStateError(step, [f"{target.hookpoint}: the loss ({shown})"])
        logs.update({f"{target.log_prefix}/{name}": value for name, value in means.items()})
    logs["nonfinite_rows"] = stream.nonfinite_rows
    logs["masked_rows"] = stream.masked_rows
    accelerator.log(logs, step=step)
    return logs


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

    Ctrl-C or SIGTERM (on any process) saves a checkpoint at the end of the current step, prints
    the resume command and raises `TrainingInterrupted` (a `KeyboardInterrupt`) on every process;
    a run whose weights become non-finite raises `RuntimeError` and keeps its last finite
    checkpoints. A process that raises makes the others raise `PeerProcessFailed`.
    """
    initial, sae_kwargs = initial_sae(config.init_from, sae_config_kwargs(sae_arguments))
    _check_early(config, sae_kwargs)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator will
    agree_on_precision(state)
    accelerator = Accelerator(
        mixed_precision=config.resolved_mixed_precision(state.device),
        log_with=config.log_with,
        project_dir=config.output_dir, step_scheduler_with_optimizer=False,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        kwargs_handlers=[process_group_kwargs(config.ddp_timeout)])
    with contextlib.ExitStack() as cleanup:
        with fail_together(accelerator):
            position, checkpoint, recorded = _open_run(config, sae_kwargs, accelerator, cleanup)
        try:
            with fail_together(accelerator):
                return _train(config, sae_kwargs, accelerator, checkpoint, recorded, position,
                              cleanup, initial)
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:  # a second Ctrl-C: stopped mid-step, without saving
            accelerator.print(position.stopped_message(saved=None))
            raise TrainingInterrupted(position.step, position.newest_checkpoint()) from None


def _open_run(config: TrainingConfig, sae_kwargs: dict[str, Any], accelerator: Accelerator,
              cleanup: contextlib.ExitStack
              ) -> tuple[RunPosition, Path | None, dict[str, Any] | None]:
    """Check that every process runs the same settings, lock the output folder (until `cleanup`
    closes) and open the checkpoint to resume, if any: `(position, checkpoint, its state)`."""
    check_same_on_every_process(accelerator, "the training configuration",
                                {**dataclasses.asdict(config), **sae_kwargs})
    output_dir = check_output_dir(config.output_dir)
    tokens_per_step = config.batch_size * config.gradient_accumulation_steps * \
        accelerator.num_processes
    num_steps = config.total_tokens // tokens_per_step
    if num_steps == 0:
        raise ValueError(f"total_tokens={config.total_tokens} is less than one step "
                         f"({tokens_per_step} tokens over {accelerator.num_processes} processes)")
    hold_output_dir(output_dir, accelerator, cleanup)
    checkpoint = (find_checkpoint(output_dir, config.resume_from_checkpoint)
                  if config.resume_from_checkpoint else None)
    recorded = open_checkpoint(checkpoint) if checkpoint is not None else None
    if recorded is not None:
        check_same_on_every_process(accelerator, "the checkpoint to resume",
                                    {"step": recorded["step"]})
    position = RunPosition(config, sae_kwargs, accelerator, output_dir, num_steps,
                           step=recorded["step"] if recorded else 0)
    return position, checkpoint, recorded


def _train(config: TrainingConfig, sae_kwargs: dict[str, Any], accelerator: Accelerator,
           checkpoint: Path | None, recorded: dict[str, Any] | None, position: RunPosition,
           cleanup: contextlib.ExitStack, initial: DeepSAEModel | None
           ) -> dict[str, DeepSAEModel]:
    """Everything after the output folder is locked: data, model, SAEs, loop, final save."""
    num_steps, output_dir = position.num_steps, position.output_dir
    with accelerator.main_process_first():
        dataset = load_text_dataset(
            config.dataset_name, config_name=config.dataset_config_name,
            data_files=config.data_files, split=config.dataset_split,
            text_column=config.text_column, streaming=config.streaming)
    model, tokenizer = load_language_model(config.model_name_or_path, dtype=config.lm_dtype,
                                           device=accelerator.device,
                                           device_map=config.lm_device_map,
                                           verbose=accelerator.is_main_process)
    targets = resolve_targets(model, config, sae_kwargs["transcoder"])
    sites = capture_sites(targets)
    configs = sae_configs(model, tokenizer, targets, sae_kwargs)
    if initial is not None:
        check_initial_site(initial, config.init_from, targets, configs[0], model)
    k_schedules = {target.hookpoint: KSchedule.of(config, sae_config)
                   for target, sae_config in zip(targets, configs, strict=True)}
    parallelism = SAEParallelism(
        accelerator, shard_latents=config.shard_latents,
        distribute_hookpoints=config.distribute_hookpoints,
        sae_sites=[{site_name(target.read), site_name(target.write)} for target in targets])
    with accelerator.main_process_first():
        identity = activations_identity(model, config, list(sites))
    position.settings = run_settings(config, sae_kwargs, num_processes=accelerator.num_processes,
                                     activations=identity)
    prepare_output_dir(config, output_dir, position.settings, accelerator,
                       resumed=None if checkpoint is None else (checkpoint,
                                                                recorded["run_settings"]))
    choices = precision_choices(config, sae_kwargs, accelerator, model.dtype)
    accelerator.print(describe(choices))
    accelerator.print(config.token_mask().describe())
    with accelerator.main_process_first():
        chunks = tokenize_and_chunk(dataset, tokenizer, config.context_length, config.text_column)
    shard, eval_chunks = split_chunks(chunks, config, accelerator)
    build_id = None
    if checkpoint is not None and config.activation_cache_dir is not None:
        build_id = read_data_state(checkpoint, accelerator.process_index)["source"].get(
            "build_id")
    source = activation_source(model, tokenizer, sites, shard, config, accelerator, identity,
                               build_id)
    if isinstance(source, CachedActivations):
        cleanup.callback(source.close)
    stream = ActivationStream(source, config.batch_size, config.shuffle_buffer_size,
                              seed=config.seed, device=accelerator.device)
    runs, pending = _build_runs(configs, targets, stream, config, num_steps, accelerator,
                                parallelism, resuming=checkpoint is not None, initial=initial)
    states = TrainingStates(parallelism, runs, [target.hookpoint for target in targets])
    position.learning_rate = config.resolved_lr(configs[0].n_latents)
    if checkpoint is not None:
        position.step, data_state = load_checkpoint(accelerator, checkpoint, states, recorded)
        stream.load_state_dict(data_state)
        accelerator.print(f"Resumed from {checkpoint} at step {position.step}/{num_steps}")
    accelerator.init_trackers("logs", config=_tracker_config(config, sae_kwargs))
    try:
        _training_loop(states, targets, [metric_names(sae_config) for sae_config in configs],
                       stream, pending, config, accelerator, position, k_schedules)
    except NonFiniteStateError as error:
        raise RuntimeError(position.diverged_message(error)) from None
    return finish_run(runs, targets, parallelism, model, tokenizer, eval_chunks, stream, config,
                      num_steps, accelerator, output_dir, choices)


def _training_loop(states: TrainingStates, targets: list[Target], names: list[tuple[str, ...]],
                   stream: ActivationStream, pending: list[dict[str, torch.Tensor]] | None,
                   config: TrainingConfig, accelerator: Accelerator, position: RunPosition,
                   k_schedules: dict[str, KSchedule]) -> None:
    """Step until `num_steps`, logging and checkpointing (by steps, by time, on a signal);
    `names[i]` are the metrics of target i's SAE (`metric_names`), and each SAE selects the k its
    schedule gives the step."""
    runs, parallelism = states.local, states.parallelism
    num_steps, step = position.num_steps, position.step
    tokens_per_step = config.batch_size * config.gradient_accumulation_steps * \
        accelerator.num_processes
    progress = tqdm(total=num_steps, initial=step, desc="Training SAE", unit="step",
                    disable=not accelerator.is_main_process)
    sums = {run.name: torch.zeros(len(names[run.index])) for run in runs}
    run_configs = {run.name: accelerator.unwrap_model(run.sae).config for run in runs}
    window_steps, window_start = 0, time.perf_counter()
    last_save = time.monotonic()
    with StopRequests() as stop:
        while step < num_steps:
            for _ in range(config.gradient_accumulation_steps):
                batches = pending if pending is not None else parallelism.exchange(next(stream))
                pending = None
                with accelerator.accumulate(*[run.sae for run in runs]):
                    for run in runs:
                        coefficient = std_coefficient_at(
                            accelerator.unwrap_model(run.sae).config.std_coefficient,
                            config.std_coefficient_schedule, step, num_steps)
                        with active_k(run_configs[run.name], k_schedules[run.name].at(step)):
                            metrics = _train_step(run, batches, config, accelerator,
                                                  parallelism, coefficient)
                        sums[run.name] = sums[run.name].to(metrics.device) + metrics \
                            / config.gradient_accumulation_steps
            step += 1
            position.step = step
            window_steps += 1
            progress.update(1)
            if step % config.logging_steps == 0 or step == num_steps:
                logs = _log(runs, targets, names, sums, window_steps, step, stream,
                            accelerator, parallelism)
                position.last_finite_step = step
                speed = window_steps * tokens_per_step / (time.perf_counter() - window_start)
                first = targets[0].log_prefix
                progress.set_postfix({
                    "tok/s": f"{speed:,.0f}", "fvu": f"{logs[f'{first}/fvu']:.3f}",
                    "l0": f"{logs[f'{first}/l0']:.1f}",
                    "dead": f"{logs[f'{first}/dead_fraction']:.1%}"})
                sums = {name: torch.zeros_like(total) for name, total in sums.items()}
                window_steps, window_start = 0, time.perf_counter()
            minutes = config.checkpointing_minutes
            interrupted, timed = agreed_flags(
                accelerator, stop.requested,
                bool(minutes) and time.monotonic() - last_save >= 60 * minutes)
            by_steps = bool(config.checkpointing_steps) and step % config.checkpointing_steps == 0
            if interrupted or (by_steps or timed) and step < num_steps:
                saved = save_checkpoint(accelerator, position.output_dir, step, states,
                                        stream.state_dict(), run_settings=position.settings,
                                        save_total_limit=config.save_total_limit)
                position.last_finite_step, last_save = step, time.monotonic()
                if interrupted:
                    progress.close()
                    accelerator.print(position.stopped_message(saved=saved))
                    raise TrainingInterrupted(step, saved)
    progress.close()
