"""Where an SAE came from, in words its model card can print.

The training corpus and token count from the training record (`DeepSAEConfig.training_config`,
as the trainer or a converter wrote it), local paths reduced to their names (they mean nothing on
other machines and may be private), Hub ids told from paths, and the command that installs the
hf_deepsae that wrote the card.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .configuration_deepsae import DeepSAEConfig

# Where the trainer (hf_deepsae.training) and other tools record tokens and data.
_TOKEN_KEYS = ("train_tokens", "num_tokens", "total_tokens", "max_tokens", "n_tokens")
_DATASET_KEYS = ("dataset", "dataset_name", "datasets", "dataset_path")
DEFAULT_CORPUS_WORDS = ("Python's documentation topics (`pydoc_data.topics`, the default corpus of "
                        "hf_deepsae's trainer)")


class TrainingCorpus(NamedTuple):
    """What an SAE was trained on: tokens, the data in words, and how the metadata names it."""

    tokens: int | None
    words: str | None
    hub_datasets: list[str]
    index_name: str
    """The model-index's dataset (the held-out metrics come from the same corpus)."""


def training_corpus(config: DeepSAEConfig) -> TrainingCorpus:
    """Tokens trained on and the corpus, from `config.metrics["train_tokens"]` (what the trainer
    actually used) and `config.training_config`.

    A dataset name next to `data_files` is a builder such as `text`; a recorded `dataset_name` of
    None is the trainer's default corpus; local files are named, not their paths.
    """
    record = training_record(config)
    counts = {"train_tokens": (config.metrics or {}).get("train_tokens"), **record}
    tokens = next((counts[key] for key in _TOKEN_KEYS if isinstance(counts.get(key), int)), None)
    datasets: list[str] = []
    for key in _DATASET_KEYS:
        value = record.get(key)
        datasets += [value] if isinstance(value, str) else list(value or [])
    files = record.get("data_files")
    if files:
        files = [files] if isinstance(files, str) else [str(file) for file in files]
        shown = ", ".join(Path(file).name for file in files[:3]) + (", …" if len(files) > 3 else "")
        words = f"local {datasets[0] if datasets else 'data'} files ({shown})"
        return TrainingCorpus(tokens, words, [], words)
    if datasets == [DEFAULT_CORPUS_WORDS]:
        return TrainingCorpus(tokens, DEFAULT_CORPUS_WORDS, [], "pydoc_data.topics")
    subset = f" ({record['dataset_config_name']})" if record.get("dataset_config_name") else ""
    words = ", ".join(f"`{public_value(dataset)}`{subset}" for dataset in datasets) or None
    hub_datasets = [dataset for dataset in datasets if is_hub_id(dataset)]
    return TrainingCorpus(tokens, words, hub_datasets,
                   (hub_datasets or [public_value(name) for name in datasets] or ["unrecorded"])[0])


def training_record(config: DeepSAEConfig) -> dict[str, Any]:
    """`config.training_config`, with the trainer's default corpus (`dataset_name` None) named."""
    record = dict(config.training_config or {})
    if "dataset_name" in record and record["dataset_name"] is None:
        record["dataset_name"] = DEFAULT_CORPUS_WORDS
    return record


def public_value(value: Any) -> Any:
    """A local path shown by its name only: other machines can't use it, and it may be private."""
    if isinstance(value, str) and ("/" in value or os.sep in value) and (
            os.path.isabs(value) or os.path.exists(value) or value.startswith((".", "~"))):
        return Path(value).name
    return value


def is_hub_id(name: str | None) -> bool:
    """Whether `name` can be metadata (`base_model`, `datasets`): a Hub id, not a local path."""
    if not name or os.path.exists(name) or name.startswith((".", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def install_command() -> str:
    """The pip command that installs this hf_deepsae for a card's reader.

    hf_deepsae is not on PyPI. An install from a git URL is recorded by pip (PEP 610) and printed
    pinned to its commit; else the repository the package metadata declares (`[project.urls]`
    Source); else the install from a clone of the repository.
    """
    try:
        distribution = importlib.metadata.distribution("hf-deepsae")
    except importlib.metadata.PackageNotFoundError:
        distribution = None
    direct_url = json.loads((distribution and distribution.read_text("direct_url.json")) or "{}")
    if "vcs_info" in direct_url:
        commit = direct_url["vcs_info"].get("commit_id")
        return f'pip install "hf-deepsae @ git+{direct_url["url"]}{"@" + commit if commit else ""}"'
    urls = dict(url.split(", ", 1) for url in
                (distribution.metadata.get_all("Project-URL") or [] if distribution else []))
    if "Source" in urls:
        return f'pip install "hf-deepsae @ git+{urls["Source"]}"'
    return "git clone <the hf_deepsae repository> hf_deepsae && pip install ./hf_deepsae"
