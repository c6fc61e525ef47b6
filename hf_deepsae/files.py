"""Reading and writing the files hf_deepsae keeps, with one error style and atomic writes.

Every file problem (missing, truncated, not JSON, a missing key, a tensor of the wrong kind) raises
`FileFormatError` naming the path, what is wrong with it and what to do, instead of a bare
`KeyError`/`JSONDecodeError`/`SafetensorError` that names no file. Files are written to a temporary
sibling and renamed into place, so a crash or a full disk never leaves a half-written file where a
complete one is expected; the result gets the permissions the user's umask gives a new file.

This file is copied next to every saved SAE with `configuration_deepsae.py` (`auto_map`), so it
imports nothing beyond the standard library, torch and safetensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
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
                     device: str = "cpu",
                     rows: Callable[[str, Sequence[int]], slice | None] | None = None
                     ) -> dict[str, torch.Tensor]:
    """The tensors in the safetensors file `path`, which must hold every name in `required`.

    `rows(name, stored shape)` may pick a slice of a tensor's rows to read instead of all of it
    (None: all), so a process reads only its share of a big tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(path, "the file does not exist", fix)
    try:
        tensors = load_file(str(path), device=device) if rows is None else \
            _load_rows(path, device, rows)
    except (SafetensorError, OSError) as error:
        raise FileFormatError(path, f"not a readable safetensors file ({error}); it may be "
                              "truncated or corrupt", fix) from None
    missing = [name for name in required if name not in tensors]
    if missing:
        raise FileFormatError(path, f"missing tensors {missing} (it holds {sorted(tensors)})", fix)
    return tensors


def _load_rows(path: Path, device: str, rows: Callable[[str, Sequence[int]], slice | None]
               ) -> dict[str, torch.Tensor]:
    tensors = {}
    with safe_open(str(path), framework="pt", device=device) as file:
        for name in file.keys():  # noqa: SIM118 (a safetensors file, not a dict)
            stored = file.get_slice(name)
            selected = rows(name, stored.get_shape())
            tensors[name] = file.get_tensor(name) if selected is None else stored[selected]
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


def file_sha256(path: str | Path, block_size: int = 1 << 20) -> str:
    """The hex SHA-256 digest of the file at `path`, read in blocks (files may be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(block_size):
            digest.update(block)
    return digest.hexdigest()


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


@contextlib.contextmanager
def atomic_folders(*paths: str | Path) -> Iterator[list[Path]]:
    """Write whole folders all or nothing: yields one empty temporary sibling per path.

    When the block ends normally, each temporary folder replaces its path (an existing folder is
    renamed aside and deleted after the swap); if it raises — a full disk, a kill signal — the
    temporary folders are deleted and every path keeps its old content. The folders and their
    files get the permissions the umask gives new ones (whatever mode the writers used).
    """
    scratches: list[Path] = []
    try:
        for path in map(Path, paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp",
                                            dir=path.parent))
            os.chmod(scratch, 0o777 & ~current_umask())
            scratches.append(scratch)
        yield scratches
    except BaseException:
        for scratch in scratches:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    for scratch, path in zip(scratches, map(Path, paths), strict=True):
        _apply_umask(scratch)
        replace_folder(scratch, path)


def _apply_umask(folder: Path) -> None:
    """Give the files in `folder` the mode a new file gets (writers using `mkstemp` get 0600)."""
    for file in folder.rglob("*"):
        if file.is_file() and not file.is_symlink():
            chmod_as_new_file(file)


def replace_folder(new: Path, path: Path) -> None:
    """Put the folder `new` at `path`, deleting what was there (renamed aside first)."""
    old = None
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(path, old)
    os.replace(new, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_identity(path: str | Path, whole_below: int = 1 << 21,
                  sample_bytes: int = 1 << 16) -> dict[str, Any]:
    """What identifies a file's version: its content, or cheaply for big files.

    Files up to `whole_below` bytes (configs, tokenizers, text files) are identified by the hash
    of their content, so a copy or a regenerated file with the same text stays the same. Bigger
    ones (weights, data shards) by size, modification time and a hash of their first and last
    `sample_bytes`: reading 128 KiB keeps this fast for thousands of multi-GB files, a rewritten
    file gets a new time, and one copied over with its old time kept still differs in its header
    or values.
    """
    path = Path(path)
    stat = path.stat()
    if stat.st_size <= whole_below:
        return {"name": path.name, "size": stat.st_size, "sha256": file_sha256(path)}
    sample = hashlib.sha256()
    with path.open("rb") as file:
        sample.update(file.read(sample_bytes))
        file.seek(-sample_bytes, os.SEEK_END)
        sample.update(file.read(sample_bytes))
    return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sampled_sha256": sample.hexdigest()}


def chmod_as_new_file(path: str | Path) -> None:
    """Give `path` the mode the umask gives a new file, e.g. after a writer that creates its files
    0600 through a temporary file, as safetensors >= 0.8 does (safetensors#782)."""
    os.chmod(path, 0o666 & ~current_umask())


def current_umask() -> int:
    """The process's umask (read by setting and restoring it: POSIX has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
