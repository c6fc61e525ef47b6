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
    activation_rows,
    load_language_model,
    load_text_dataset,
    tokenize_and_chunk,
)
from ..configuration_deepsae import TOPK_KINDS, DeepSAEConfig
from ..modeling_deepsae import DeepSAEModel, DeepSAEOutput
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
from .cpu_threads import use_the_cores
from .data import activation_source, activations_identity, split_chunks
from .dead_latents import DeadLatentCounter
from .distributed import SAEParallelism, TrainingStates
from .end_to_end import (
    SplicedSAE,
    TokenBatches,
    check_end_to_end_model,
    downstream_from_layer,
    end_to_end_forward,
    objective,
    without_activation_cache,
)
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
    if sae_kwargs["sparsity"] in TOPK_KINDS and config.tokens_per_batch < sae_kwargs["k"]:
        raise ValueError(f"a batch of {config.tokens_per_batch} tokens is smaller than "
                         f"k={sae_kwargs['k']}; use a batch (--batch_size, or for --loss kl "
                         "--lm_batch_size x --context_length) of at least k tokens")
    if config.k_anneal_steps and sae_kwargs["sparsity"] not in TOPK_KINDS:
        raise ValueError(f"--k_anneal_steps anneals k, which sparsity={sae_kwargs['sparsity']!r} "
                         f"has none of; use {' or '.join(TOPK_KINDS)}, or drop the flag")
    if config.push_to_hub and get_token() is None:
        raise ValueError("--push_to_hub needs a Hub login: run `hf auth login` or set HF_TOKEN")


def _build_runs(configs: list[DeepSAEConfig], targets: list[Target],
                first_batches: list[dict[str, torch.Tensor]] | None, config: TrainingConfig,
                num_steps: int, accelerator: Accelerator, parallelism: SAEParallelism,
                initial: DeepSAEModel | None) -> list[SAERun]:
    """Create the SAEs this process trains, with their optimizers, and `prepare` them.

    Each SAE's initial weights depend on `seed` and its position only (not on which process
    builds it), or are `initial`'s (`--init_from`). Unless resuming (`first_batches` None) or
    starting from `initial`, the main process's first batch of activations initialises each SAE
    (`b_dec`, input scale; `prepare` broadcasts them in DDP).
    """
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
    return runs


METRICS = ("loss", "fvu", "l0", "aux_loss", "pre_act_std")
RUN_STATE = ("dead_fraction", "lr")


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
        measured.append(_sae_metrics(out, out.loss))
    _end_step(run, fired, config, accelerator, parallelism)
    return torch.stack(measured).mean(0)


def _sae_metrics(out: DeepSAEOutput, loss: torch.Tensor) -> torch.Tensor:
    """`METRICS` of one SAE forward whose training loss is `loss`, then each Matryoshka
    prefix's FVU."""
    l0 = (out.latent_acts != 0).sum(-1).float().mean()
    prefix_fvus = l0.new_zeros(0) if out.matryoshka_fvu is None else out.matryoshka_fvu
    return torch.cat([torch.stack([loss, out.fvu, l0, out.aux_loss, out.pre_act_std]),
                      prefix_fvus]).detach().float()


def _end_step(run: SAERun, fired: torch.Tensor, config: TrainingConfig,
              accelerator: Accelerator, parallelism: SAEParallelism) -> None:
    """After a micro-batch's backward: count dead latents; on the last micro-batch, update."""
    run.dead.advance(parallelism.reduce_fired(fired),
                     n_tokens=config.tokens_per_batch * accelerator.num_processes)
    if accelerator.sync_gradients:
        update_sae(accelerator.unwrap_model(run.sae), run.optimizers, run.schedulers,
                   config.max_grad_norm, parallelism.clip_grad_norm(run.sae))


def _train_end_to_end_step(runs: list[SAERun], model: Any, input_ids: torch.Tensor,
                           config: TrainingConfig, accelerator: Accelerator,
                           parallelism: SAEParallelism, std_coefficients: dict[str, float],
                           downstream_from: int | None) -> dict[str, torch.Tensor]:
    """`--loss kl`/`fvu+kl` (`end_to_end`): every SAE spliced into one forward pass of the
    model on `input_ids`, one backward of the joint objective, then each SAE's update. Returns
    each SAE's metrics: `METRICS` (its loss the joint one), the KL and the downstream term."""
    def sae_forward(run: SAERun) -> Any:
        def forward(inputs: torch.Tensor, target: torch.Tensor | None) -> DeepSAEOutput:
            device = accelerator.device
            with accelerator.autocast():  # the SAE's arithmetic only, not the model's
                return run.sae(inputs.to(device), None if target is None else target.to(device),
                               dead_mask=run.dead.dead_mask,
                               std_coefficient=std_coefficients[run.name])
        return forward

    saes = {run.name: SplicedSAE(sae_forward(run), run.target.read, run.target.write)
            for run in runs}
    output = end_to_end_forward(model, saes, input_ids, downstream_from_layer=downstream_from)
    loss = objective(output, config)
    accelerator.backward(loss)
    shared = [output.kl, *([] if output.downstream_fvu is None else [output.downstream_fvu])]
    metrics = {}
    for run in runs:
        out = output.sae_outputs[run.name]
        metrics[run.name] = torch.cat([_sae_metrics(out, loss),
                                       torch.stack(shared).detach().float()])
        _end_step(run, run.dead.fired(out.latent_acts, out.latent_indices), config, accelerator,
                  parallelism)
    return metrics


def metric_names(config: TrainingConfig, sae_config: DeepSAEConfig) -> tuple[str, ...]:
    """The metrics a step returns for an SAE: `METRICS`, each Matryoshka prefix's FVU, and the
    end-to-end losses' terms."""
    prefixes = tuple(f"matryoshka_fvu_{prefix}" for prefix in sae_config.matryoshka_prefixes or ())
    if config.loss == "fvu":
        return METRICS + prefixes
    return (*METRICS, *prefixes, "kl",
            *(["downstream_fvu"] if config.downstream_coefficient else []))


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
        if not all(math.isfinite(means[name]) for name in target_names):
            shown = ", ".join(f"{name} {means[name]:.4g}" for name in target_names)
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
    use_the_cores(state, state.print)
    agree_on_precision(state)
    accelerator = Accelerator(
        mixed_precision=config.resolved_mixed_precision(state.device),
        log_with=config.log_with,
        project_dir=config.output_dir, step_scheduler_with_optimizer=False,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        kwargs_handlers=[process_group_kwargs(config.ddp_timeout)])
    config = without_activation_cache(config, accelerator.print)
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
    tokens_per_step = config.tokens_per_step(accelerator.num_processes)
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
    if config.loss != "fvu":
        check_end_to_end_model(model)
    targets = resolve_targets(model, config, sae_kwargs["transcoder"])
    downstream_from = downstream_from_layer(config, [target.layer for target in targets])
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
    if config.loss == "fvu":
        source = activation_source(model, tokenizer, sites, shard, config, accelerator, identity,
                                   build_id)
        if isinstance(source, CachedActivations):
            cleanup.callback(source.close)
        stream = ActivationStream(source, config.batch_size, config.shuffle_buffer_size,
                                  seed=config.seed, device=accelerator.device)
    else:
        stream = TokenBatches(shard, config.lm_batch_size, config.seed, accelerator.device)
    pending = None if checkpoint is not None else parallelism.exchange(next(stream))
    first_batches = pending
    if pending is not None and config.loss != "fvu":  # token ids: initialise from their activations
        first_batches = [{name: rows.to(accelerator.device) for name, rows in activation_rows(
            model, sites, pending[0]).items()}]
    runs = _build_runs(configs, targets, first_batches, config, num_steps, accelerator,
                       parallelism, initial)
    states = TrainingStates(parallelism, runs, [target.hookpoint for target in targets])
    position.learning_rate = config.resolved_lr(configs[0].n_latents)
    if checkpoint is not None:
        position.step, data_state = load_checkpoint(accelerator, checkpoint, states, recorded)
        stream.load_state_dict(data_state)
        accelerator.print(f"Resumed from {checkpoint} at step {position.step}/{num_steps}")
    accelerator.init_trackers("logs", config=_tracker_config(config, sae_kwargs))
    try:
        names = [metric_names(config, sae_config) for sae_config in configs]
        _training_loop(states, targets, names, stream, pending, config, accelerator, position,
                       model, downstream_from, k_schedules)
    except NonFiniteStateError as error:
        raise RuntimeError(position.diverged_message(error)) from None
    return finish_run(runs, targets, parallelism, model, tokenizer, eval_chunks, stream, config,
                      num_steps, accelerator, output_dir, choices)


def _training_loop(states: TrainingStates, targets: list[Target], names: list[tuple[str, ...]],
                   stream: Any, pending: list[Any] | None, config: TrainingConfig,
                   accelerator: Accelerator, position: RunPosition, model: Any,
                   downstream_from: int | None, k_schedules: dict[str, KSchedule]) -> None:
    """Step until `num_steps`, logging and checkpointing (by steps, by time, on a signal).

    `names[i]` are the metrics of target i's SAE (`metric_names`). `stream` yields activation
    batches (`--loss fvu`) or token ids (`kl`, `fvu+kl`, which also run `model` and compare
    residual streams from layer `downstream_from` on); `pending` is its first item (exchanged
    between processes), drawn to initialise the SAEs. Each SAE selects the k its schedule gives
    the step."""
    runs, parallelism = states.local, states.parallelism
    num_steps, step = position.num_steps, position.step
    tokens_per_step = config.tokens_per_step(accelerator.num_processes)
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
                    coefficients = {run.name: std_coefficient_at(
                        accelerator.unwrap_model(run.sae).config.std_coefficient,
                        config.std_coefficient_schedule, step, num_steps) for run in runs}
                    with contextlib.ExitStack() as scheduled_k:
                        for run in runs:
                            scheduled_k.enter_context(active_k(
                                run_configs[run.name], k_schedules[run.name].at(step)))
                        if config.loss == "fvu":
                            step_metrics = {run.name: _train_step(
                                run, batches, config, accelerator, parallelism,
                                coefficients[run.name]) for run in runs}
                        else:
                            step_metrics = _train_end_to_end_step(
                                runs, model, batches[0], config, accelerator, parallelism,
                                coefficients, downstream_from)
                    for name, metrics in step_metrics.items():
                        sums[name] = sums[name].to(metrics.device) + metrics \
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
                    **({"kl": f"{logs[f'{first}/kl']:.4f}"} if f"{first}/kl" in logs else {}),
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
