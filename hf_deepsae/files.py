"""Reading and writing the files hf_deepsae keeps, with one error style and atomic writes.

Every file problem (missing, truncated, not JSON, a missing key, a tensor of the wrong kind) raises
`FileFormatError` naming the path, what is wrong with it and what to do, instead of a bare
`KeyError`/`JSONDecodeError`/`SafetensorError` that names no file. Files are written to a temporary
sibling and renamed into place, so a crash or a full disk never leaves a half-written file where a
complete one is expected; the result gets the permissions the user's umask gives a new file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file


class FileFormatError(ValueError):
    """A file hf_deepsae reads is missing, truncated or not what it should be.

    A `ValueError`, so callers that catch bad input keep working; the message says the path, what
    is wrong and what to do.
    """

    def __init__(self, path: str | Path, problem: str, fix: str) -> None:
        self.path, self.problem, self.fix = Path(path), problem, fix
        super().__init__(f"{path}: {problem}; {fix}")


def read_json(path: str | Path, *, fix: str, required: Iterable[str] = ()) -> dict[str, Any]:
    """The JSON object in `path`, which must hold every key in `required`.

    `fix` says what to do when it can't be read (e.g. "delete the folder and rebuild the cache").
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileFormatError(path, "the file does not exist", fix) from None
    except (OSError, UnicodeDecodeError) as error:
        raise FileFormatError(path, f"the file can't be read ({error})", fix) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise FileFormatError(path, f"not valid JSON ({error}); it may be truncated", fix) from None
    if not isinstance(value, dict):
        raise FileFormatError(path, f"expected a JSON object, found {type(value).__name__}", fix)
    missing = [key for key in required if key not in value]
    if missing:
        raise FileFormatError(path, f"missing required keys {missing}", fix)
    return value


def load_safetensors(path: str | Path, *, fix: str, required: Iterable[str] = (),
                     device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors in the safetensors file `path`, which must hold every name in `required`."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(path, "the file does not exist", fix)
    try:
        tensors = load_file(str(path), device=device)
    except (SafetensorError, OSError) as error:
        raise FileFormatError(path, f"not a readable safetensors file ({error}); it may be "
                              "truncated or corrupt", fix) from None
    missing = [name for name in required if name not in tensors]
    if missing:
        raise FileFormatError(path, f"missing tensors {missing} (it holds {sorted(tensors)})", fix)
    return tensors


def check_tensor(path: str | Path, name: str, tensor: torch.Tensor, *, fix: str,
                 ndim: int | None = None, floating: bool = True) -> torch.Tensor:
    """`tensor` (read from `path` under `name`) if it has `ndim` dimensions and a float dtype."""
    if ndim is not None and tensor.ndim != ndim:
        raise FileFormatError(path, f"tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                              f"{ndim} dimensions", fix)
    if floating and not tensor.is_floating_point():
        raise FileFormatError(path, f"tensor {name!r} has dtype {tensor.dtype}, expected a "
                              "floating-point dtype", fix)
    return tensor


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary sibling and `os.replace`: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, scratch = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        chmod_as_new_file(scratch)
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, value: Any) -> Path:
    """`atomic_write_text` of `value` as indented, key-sorted JSON."""
    return atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def chmod_as_new_file(path: str | Path) -> None:
    """Give `path` the mode the umask gives a new file, e.g. after a writer that creates its files
    0600 through a temporary file, as safetensors >= 0.8 does (safetensors#782)."""
    os.chmod(path, 0o666 & ~current_umask())


def current_umask() -> int:
    """The process's umask (read by setting and restoring it: POSIX has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
