"""The dtypes of one training run, as `hf_deepsae.precision` resolves them, agreed by every
process, printed once at start and recorded in each saved SAE's `training_config`."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list

from ..precision import adopt_device_precision, device_precision, orthogonalization_dtype
from ..sparsity import selection_dtype
from .config import TrainingConfig


def agree_on_precision(state: PartialState) -> None:
    """Every process adopts the main process's precision findings (DDP steps the same weights
    everywhere, so every process must choose the same dtypes, whatever its own probe timed)."""
    if state.num_processes > 1:
        found = [device_precision(state.device) if state.is_main_process else None]
        adopt_device_precision(state.device, broadcast_object_list(found)[0])


def precision_choices(config: TrainingConfig, sae_kwargs: dict[str, Any],
                      accelerator: Accelerator, lm_dtype: torch.dtype) -> dict[str, str | None]:
    """The dtype of every part of this run ("auto" resolved) and the device facts behind them;
    None for a choice the run does not make (no Muon, no top-k)."""
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
        "device": device_precision(device).summary(),
    }


def describe(choices: dict[str, str | None]) -> str:
    """One line for the start of a run: the device, then each choice."""
    parts = ", ".join(f"{name} {value}" for name, value in choices.items() if name != "device")
    return f"Precision on {choices['device']}: {parts}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
