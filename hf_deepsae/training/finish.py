"""The end of a run: held-out evaluation, each SAE's training record and metrics, saving (and
pushing) the SAEs, and what the run leaves behind.

In the distributed modes every process evaluates the SAEs it trains (all shards of a latent-sharded
SAE take part in each forward), then the SAEs are gathered to the main process as ordinary
`DeepSAEModel`s, which saves them; the other processes return `{}`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..activations import KEEP_ROWS, ActivationStream, ModelActivations, TokenChunks
from ..evaluation import ActivationMetrics, ActivationMetricsResult
from ..hub import push_saes_to_hub, save_saes
from ..modeling_deepsae import DeepSAEModel
from .checkpointing import checkpoints_folder, list_checkpoints
from .config import TrainingConfig
from .distributed import SAEParallelism
from .end_to_end import held_out_spliced_metrics
from .targets import SAERun, Target, capture_sites


@torch.no_grad()
def evaluate_runs(runs: list[SAERun], model: Any, tokenizer: Any, eval_chunks: Any,
                  config: TrainingConfig, accelerator: Accelerator
                  ) -> dict[str, ActivationMetricsResult]:
    """FVU, L0, dead/dense fractions… of every SAE on `eval_tokens` held-out tokens (those the
    token mask keeps, as in training)."""
    capture = capture_sites([run.target for run in runs])
    source = ModelActivations(model, capture, TokenChunks(eval_chunks, config.lm_batch_size, 0),
                              config.token_mask().row_filter(tokenizer))
    saes = {run.name: accelerator.unwrap_model(run.sae).eval() for run in runs}
    metrics = {run.name: ActivationMetrics(saes[run.name].config.n_total_latents) for run in runs}
    progress = tqdm(total=config.eval_tokens, desc="Held-out evaluation", unit="tok",
                    unit_scale=True, disable=not accelerator.is_main_process)
    rows = 0
    while rows < config.eval_tokens and source.epoch == 0:
        block = source.next_block()
        keep = block.pop(KEEP_ROWS)
        finite = keep & torch.stack([torch.isfinite(x).all(-1) for x in block.values()]).all(0)
        block = {name: x[finite][: config.eval_tokens - rows] for name, x in block.items()}
        for run in runs:
            inputs, target = run.inputs(block)
            out = saes[run.name](inputs, target=target)
            metrics[run.name].update(inputs if target is None else target, out.reconstruction,
                                     out.latent_acts, out.latent_indices)
        progress.update(min(int(finite.sum()), config.eval_tokens - rows))
        rows += int(finite.sum())
    progress.close()
    return {name: metric.compute() for name, metric in metrics.items()}


def finish_run(runs: list[SAERun], targets: list[Target], parallelism: SAEParallelism,
               model: Any, tokenizer: Any, eval_chunks: Any, stream: ActivationStream,
               config: TrainingConfig, num_steps: int, accelerator: Accelerator, output_dir: Path,
               precision: dict[str, str | None]) -> dict[str, DeepSAEModel]:
    """Evaluate on held-out tokens, record config + metrics (and the run's `precision`
    choices) in each SAE, save (and push); returns the SAEs this process holds whole (every SAE
    on the main process, `{}` on the others in the distributed modes). Collective; ends the
    training (and the process group)."""
    accelerator.wait_for_everyone()
    results = evaluate_runs(runs, model, tokenizer, eval_chunks, config, accelerator) \
        if parallelism.evaluates_here and runs else {}
    finished = {targets[index].hookpoint: value for index, value in parallelism.gather_saes(
        {run.index: run for run in runs},
        {run.index: (results.get(run.name), run.dead.dead_fraction()) for run in runs}).items()}
    saes = {name: sae for name, (sae, _) in finished.items()}
    if accelerator.is_main_process:
        results = {name: result for name, (_, (result, _)) in finished.items()}
        spliced = {} if config.loss == "fvu" else held_out_spliced_metrics(
            model, saes, eval_chunks, config)
        for sae, (result, dead_fraction) in finished.values():
            _record(sae, result, dead_fraction, model, stream, config, num_steps, accelerator,
                    precision, spliced)
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
        if spliced:
            accelerator.print(
                f"  spliced into the model{' together' if len(saes) > 1 else ''} "
                f"({spliced['n_predicted_tokens']:,} held-out tokens): KL "
                f"{spliced['kl_spliced']:.4f}, CE {spliced['ce_loss_increase']:+.4f} nats, "
                f"CE-loss score {spliced['ce_loss_score']:.3f}")
        if config.push_to_hub:
            commit = push_saes_to_hub(saes, config.hub_model_id or output_dir.resolve().name)
            accelerator.print(f"Pushed to {commit.repo_url}")
        _report_checkpoints(output_dir, accelerator)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return saes


def _record(sae: DeepSAEModel, result: ActivationMetricsResult, dead_fraction: float, model: Any,
            stream: ActivationStream, config: TrainingConfig, num_steps: int,
            accelerator: Accelerator, precision: dict[str, str | None],
            spliced: dict[str, float | int]) -> None:
    """Write how `sae` was trained and how well it does into its config (and so its card);
    `spliced`: the language-model metrics of the run's SAEs spliced in together (end-to-end
    losses)."""
    weights = getattr(model.config, "weights_source", None)  # see load_language_model
    sae.config.training_config = {
        **config.record(), **({"model_weights": weights} if weights else {}),
        "lr": config.resolved_lr(sae.config.n_latents),
        "dead_threshold_tokens": config.resolved_dead_threshold_tokens(),
        "k_anneal_start": config.resolved_k_anneal_start(sae.config.k, sae.config.n_latents)
        if config.k_anneal_steps else None,
        "precision": precision,
        "num_processes": accelerator.num_processes, "num_steps": num_steps}
    sae.config.metrics = {
        **result.scalars(), **spliced, "dead_fraction_training": dead_fraction,
        "nonfinite_rows_skipped": stream.nonfinite_rows,
        "masked_rows_skipped": stream.masked_rows,
        "train_tokens": num_steps * config.tokens_per_step(accelerator.num_processes)}


def _report_checkpoints(output_dir: Path, accelerator: Accelerator) -> None:
    """Say what the finished run left behind besides the SAEs: its resumable checkpoints."""
    checkpoints = list_checkpoints(output_dir)
    if checkpoints:
        size = sum(file.stat().st_size for checkpoint in checkpoints
                   for file in checkpoint.rglob("*") if file.is_file())
        accelerator.print(
            f"{len(checkpoints)} training checkpoint{'s' if len(checkpoints) > 1 else ''} "
            f"({size / 1e6:,.0f} MB) remain in {checkpoints_folder(output_dir)}, to resume or "
            f"extend this run; delete the folder if you need neither")
