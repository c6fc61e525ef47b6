"""Training SAEs: `TrainingConfig`, the CLI built from it, and the Accelerate loop `train`."""

from .config import DEFAULT_SAE_RECIPE, SAEArguments, TrainingConfig, default_lr, parse_args
from .dead_latents import DeadLatentCounter
from .interruption import TrainingInterrupted
from .muon import Muon
from .optim import build_optimizers, build_scheduler, std_coefficient_at, update_sae
from .trainer import train

__all__ = [
    "DEFAULT_SAE_RECIPE",
    "DeadLatentCounter",
    "Muon",
    "SAEArguments",
    "TrainingConfig",
    "TrainingInterrupted",
    "build_optimizers",
    "build_scheduler",
    "default_lr",
    "parse_args",
    "std_coefficient_at",
    "train",
    "update_sae",
]
