"""The training data: the corpus split into held-out and per-process chunks, and the activations
read from it — streamed from the model or from the on-disk cache, keyed by their identity.
"""

from __future__ import annotations

import math
from typing import Any

from accelerate import Accelerator
from datasets import Dataset
from datasets.distributed import split_dataset_by_node

from ..activations import (
    ModelActivations,
    TokenChunks,
    dataset_identity,
    language_model_identity,
)
from .activation_cache import open_or_build_cache
from .config import TrainingConfig


def split_chunks(chunks: Any, config: TrainingConfig, accelerator: Accelerator) -> tuple[Any, Any]:
    """(this process's training chunks, the held-out evaluation chunks).

    The held-out chunks hold `eval_tokens` tokens the token mask keeps by position (tokens it
    leaves out by id, rare in text, may leave the evaluation a few short)."""
    kept_per_chunk = config.context_length - config.token_mask().first_kept_position
    n_eval = math.ceil(config.eval_tokens / kept_per_chunk)
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


def activations_identity(model: Any, config: TrainingConfig, sites: list[str]) -> dict[str, Any]:
    """Everything that determines the training activations: it keys the activation cache and is
    part of the run's identity (a resumed run must read the same activations). The token mask is
    part of it: the cache stores which rows it keeps, so another mask needs another cache."""
    return {
        "model": language_model_identity(model),
        "data": dataset_identity(config.dataset_name, config_name=config.dataset_config_name,
                                 data_files=config.data_files),
        "sites": sorted(sites),
        **{name: getattr(config, name) for name in (
            "model_name_or_path", "dataset_split", "text_column", "streaming", "context_length",
            "eval_tokens", "mask_bos", "mask_special_tokens", "mask_positions_below")}}


def activation_source(model: Any, tokenizer: Any, sites: dict[str, Any], shard: Any,
                      config: TrainingConfig, accelerator: Accelerator, identity: dict[str, Any],
                      build_id: str | None) -> Any:
    """Activations at `sites` from the model, or from the on-disk cache of `identity` (built on
    first use; `build_id`: the build a resumed run was reading), each block marking the rows
    `config.token_mask()` keeps."""
    chunks = TokenChunks(shard, config.lm_batch_size, config.seed)
    source = ModelActivations(model, sites, chunks, config.token_mask().row_filter(tokenizer))
    if config.activation_cache_dir is None:
        return source
    return open_or_build_cache(
        source, config.activation_cache_dir, identity,
        max_rows=math.ceil(config.total_tokens / accelerator.num_processes),
        rows_per_shard=max(config.batch_size, config.shuffle_buffer_size // 4),
        accelerator=accelerator, seed=config.seed, build_id=build_id)
