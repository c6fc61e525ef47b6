"""Training state as safetensors + JSON, so resuming never unpickles a file.

`torch.save`/`pickle` files (what `accelerator.save_state` writes: `optimizer.bin`,
`random_states_*.pkl`, `custom_checkpoint_*.pkl`) run code when loaded, and accelerate loads its
custom checkpoints with `weights_only=False`: a checkpoint folder from anywhere would be a program.
Here a state — any nesting of dicts, lists and tuples over tensors, numbers, strings, booleans,
None and torch dtypes, which covers `Optimizer.state_dict()`, `LRScheduler.state_dict()`, RNG
and data positions — is split into `<name>.safetensors` (every tensor, under its path in the
nesting) and `<name>.json` (the structure, with `{"__tensor__": key}` where a tensor was).
Reading it back only parses JSON and safetensors; the round trip is exact (JSON floats are
written by `repr`, dict order is kept).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..files import FileFormatError, atomic_write_text, load_safetensors, read_json

_TENSOR, _TUPLE, _ITEMS, _DTYPE = "__tensor__", "__tuple__", "__items__", "__dtype__"
_TAGS = (_TENSOR, _TUPLE, _ITEMS, _DTYPE)


def write_state(folder: str | Path, name: str, state: Any) -> None:
    """Write `state` as `folder/<name>.json` and, if it holds tensors, `<name>.safetensors`."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, name, tensors)
    if tensors:
        save_file({key: value.detach().contiguous().cpu() for key, value in tensors.items()},
                  str(Path(folder) / f"{name}.safetensors"))
    atomic_write_text(Path(folder) / f"{name}.json", json.dumps({"state": structure}, indent=1))


def read_state(folder: str | Path, name: str, *, fix: str,
               rows: Callable[[tuple, Sequence[int]], slice | None] | None = None) -> Any:
    """The state `write_state` wrote as `name` in `folder`; `fix` says what to do if it is bad.

    `rows(path, stored shape)` may pick a slice of the rows of the tensor at `path` in the state
    (a tuple of keys, e.g. `("state", 3, "exp_avg")`) to read instead of all of it (None: all).
    """
    json_path = Path(folder) / f"{name}.json"
    structure = read_json(json_path, fix=fix, required=["state"])["state"]
    tensor_path = Path(folder) / f"{name}.safetensors"
    try:
        paths = dict(_tensor_paths(structure, ())) if rows is not None else {}
    except (TypeError, ValueError) as error:
        raise FileFormatError(json_path, f"not a training state written by hf_deepsae ({error})",
                              fix) from None

    def select(key: str, shape: Sequence[int]) -> slice | None:
        return rows(paths[key], shape) if rows is not None and key in paths else None

    tensors = load_safetensors(tensor_path, fix=fix, rows=select if rows is not None else None) \
        if tensor_path.exists() else {}
    try:
        return _decode(structure, tensors)
    except (KeyError, TypeError, ValueError) as error:
        raise FileFormatError(json_path, f"not a training state written by hf_deepsae ({error})",
                              fix) from None


def nonfinite_tensors(state: Any, prefix: str = "") -> list[str]:
    """Paths (`state.3.exp_avg`) of the floating-point tensors in `state` holding NaN or inf."""
    if isinstance(state, torch.Tensor):
        bad = state.is_floating_point() and not bool(torch.isfinite(state).all())
        return [prefix] if bad else []
    if isinstance(state, float):
        return [] if math.isfinite(state) else [prefix]
    items = state.items() if isinstance(state, dict) else enumerate(state) \
        if isinstance(state, list | tuple) else ()
    return [path for key, value in items
            for path in nonfinite_tensors(value, f"{prefix}.{key}" if prefix else str(key))]


def _tensor_paths(value: Any, path: tuple) -> Iterator[tuple[str, tuple]]:
    """`(tensor key, path of keys in the decoded state)` for every tensor in an encoded state."""
    if isinstance(value, list):
        for index, item in enumerate(value):
            yield from _tensor_paths(item, (*path, index))
    elif isinstance(value, dict):
        if set(value) == {_TENSOR}:
            yield value[_TENSOR], path
        elif set(value) == {_TUPLE}:
            yield from _tensor_paths(value[_TUPLE], path)
        elif set(value) == {_ITEMS}:
            for key, item in value[_ITEMS]:
                yield from _tensor_paths(item, (*path, key))
        elif set(value) != {_DTYPE}:
            for key, item in value.items():
                yield from _tensor_paths(item, (*path, key))


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[path] = value
        return {_TENSOR: path}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.dtype):
        return {_DTYPE: str(value).removeprefix("torch.")}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(key, str) and key not in _TAGS for key in value):
            return {key: _encode(v, f"{path}.{key}", tensors) for key, v in value.items()}
        if all(key is None or isinstance(key, bool | int | float | str) for key in value):
            return {_ITEMS: [[key, _encode(v, f"{path}.{key}", tensors)]
                             for key, v in value.items()]}
    raise TypeError(f"can't store {type(value).__name__} at {path} in a training state: only "
                    "tensors, dtypes, numbers, strings, None, lists, tuples and dicts are allowed")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {_TENSOR}:
        return tensors[value[_TENSOR]]
    if set(value) == {_TUPLE}:
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    if set(value) == {_ITEMS}:
        return {key: _decode(v, tensors) for key, v in value[_ITEMS]}
    if set(value) == {_DTYPE}:
        dtype = getattr(torch, str(value[_DTYPE]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{value[_DTYPE]!r} is not a torch dtype")
        return dtype
    return {key: _decode(v, tensors) for key, v in value.items()}
