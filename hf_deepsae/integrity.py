"""A loaded SAE is the SAE that was saved: weights-file checksums, and finite weights.

`DeepSAEModel.save_pretrained` records the SHA-256 of each weights file it wrote in `config.json`,
once the weights are on disk: `"weights_sha256": {"model.safetensors": "<64 hex digits>"}` (one
entry per shard of a sharded checkpoint). `DeepSAEModel.from_pretrained` recomputes them before
loading and refuses a file whose bytes changed since (a flipped bit, a partial copy or download, a
tool that rewrote it); then it refuses weights holding NaN or inf (a diverged run). Folders saved
before checksums were recorded load unchecked. Hashing reads each file once more (~1 s per GB).

This file is copied next to every checkpoint with `modeling_deepsae.py` (`auto_map`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import cached_file

from .configuration_deepsae import (
    CONFIG_FIX,
    WEIGHTS_CHECKSUMS_KEY,
    check_not_a_file,
    refuse_sae_folder,
)
from .files import FileFormatError, atomic_write_json, file_sha256, read_json

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")
CORRUPT_FIX = ("re-download or re-copy the SAE, or load an earlier checkpoint; if you rewrote the "
               "weights on purpose, re-save the SAE with DeepSAEModel.save_pretrained")
DIVERGED_FIX = ("the SAE diverged in training or the file is corrupt: load an earlier checkpoint, "
                "or retrain it (e.g. with a lower learning rate)")


def with_variant(name: str, variant: str | None) -> str:
    """`model.safetensors` → `model.<variant>.safetensors`, as transformers names variants."""
    if not variant:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def nonfinite_tensors(module: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of `module` holding a NaN or inf."""
    named = [(name, tensor) for name, tensor in [*module.named_parameters(),
                                                  *module.named_buffers()]
             if tensor.is_floating_point()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(tensor).all().cpu() for _, tensor in named]).tolist()
    return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]


def record_weights_checksums(folder: str | Path, variant: str | None = None) -> None:
    """Write the SHA-256 of each weights file in `folder` into its `config.json`."""
    folder = Path(folder)
    index = folder / with_variant(WEIGHTS_INDEX_NAME, variant)
    if index.is_file():
        weight_map = read_json(index, fix=CORRUPT_FIX, required=["weight_map"])["weight_map"]
        names = sorted(set(weight_map.values()))
    else:
        names = [with_variant(WEIGHTS_NAME, variant)]
    config = read_json(folder / "config.json", fix=CONFIG_FIX)
    config[WEIGHTS_CHECKSUMS_KEY] = {name: file_sha256(folder / name) for name in names}
    atomic_write_json(folder / "config.json", config)


class CheckpointFiles:
    """The files of one saved SAE, local or on the Hub (resolved through the Hub cache)."""

    def __init__(self, name_or_path: str | Path, load_kwargs: Mapping[str, Any]) -> None:
        self.name_or_path = str(name_or_path)
        self.subfolder = load_kwargs.get("subfolder") or ""
        self.variant = load_kwargs.get("variant")
        self.local = Path(self.name_or_path).is_dir()
        self.hub_kwargs = {key: load_kwargs[key] for key in _HUB_KWARGS if key in load_kwargs}

    def location(self, name: str) -> Path:
        """Where `name` is, for messages (the local path, or `repo/subfolder/name`)."""
        return Path(self.name_or_path, self.subfolder, name)

    def resolve(self, name: str) -> Path:
        if self.local:
            path = self.location(name)
        else:
            path = Path(cached_file(self.name_or_path, name, subfolder=self.subfolder,
                                    **self.hub_kwargs))
        if not path.is_file():
            raise FileFormatError(path, "the file does not exist", CORRUPT_FIX)
        return path

    @property
    def weights_location(self) -> Path:
        return self.location(with_variant(WEIGHTS_NAME, self.variant))

    def check_before_loading(self) -> None:
        """A local folder has its weights; every recorded checksum matches its file."""
        check_not_a_file(self.name_or_path)
        config_path = self.resolve("config.json")
        config = read_json(config_path, fix=CONFIG_FIX)
        refuse_sae_folder(config, self.name_or_path)
        if self.local and not any(
                self.location(with_variant(name, self.variant)).is_file()
                for name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME, "pytorch_model.bin")):
            raise FileFormatError(self.weights_location, "the file does not exist: the folder "
                                  "has the SAE's config.json but no weights", CORRUPT_FIX)
        recorded = config.get(WEIGHTS_CHECKSUMS_KEY)
        if recorded is None:  # saved before checksums were recorded
            return
        if not isinstance(recorded, dict) or not all(
                isinstance(digest, str) for digest in recorded.values()):
            raise FileFormatError(config_path, f"{WEIGHTS_CHECKSUMS_KEY!r} must map weights file "
                                  f"names to SHA-256 hex digests, found {recorded!r}", CONFIG_FIX)
        for name, expected in recorded.items():
            path = self.resolve(name)
            actual = file_sha256(path)
            if actual != expected:
                raise FileFormatError(
                    path, f"the file is corrupt or truncated: its SHA-256 is {actual}, but the "
                    f"SAE's config.json records {expected} (it changed after it was saved: a bad "
                    "copy, download or disk)", CORRUPT_FIX)

    def check_loaded(self, model: nn.Module) -> None:
        """Weights holding NaN or inf are refused: every output of the SAE would be NaN."""
        nonfinite = nonfinite_tensors(model)
        if nonfinite:
            raise FileFormatError(self.weights_location,
                                  f"tensors {nonfinite} hold NaN or inf values", DIVERGED_FIX)
