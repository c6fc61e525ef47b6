"""`hf_deepsae.files`: file errors that name the file, and atomic writes that respect the umask."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from hf_deepsae import DeepSAEConfig, DeepSAEModel, save_saes
from hf_deepsae.files import (
    FileFormatError,
    atomic_write_json,
    check_tensor,
    file_identity,
    load_safetensors,
    read_json,
)
from hf_deepsae.interop import to_saelens, to_sparsify
from hf_deepsae.interpret import LatentCache

FIX = "delete it and run again"


@pytest.mark.parametrize(("content", "problem"), [
    (None, "the file does not exist"),
    ('{"a": 1', "not valid JSON"),
    ("[1, 2]", "expected a JSON object, found list"),
    ('{"a": 1}', "missing required keys ['b']"),
])
def test_read_json_names_the_file_the_problem_and_the_fix(tmp_path, content, problem):
    path = tmp_path / "state.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(FileFormatError) as caught:
        read_json(path, fix=FIX, required=["a", "b"])
    message = str(caught.value)
    assert message.startswith(str(path)) and problem in message and message.endswith(FIX)
    assert isinstance(caught.value, ValueError)


def test_read_json_returns_the_object(tmp_path):
    path = atomic_write_json(tmp_path / "sub" / "state.json", {"b": [1], "a": 2})
    assert read_json(path, fix=FIX, required=["a", "b"]) == {"a": 2, "b": [1]}
    assert json.loads(path.read_text()) == {"a": 2, "b": [1]}


def test_truncated_safetensors_names_the_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(FileFormatError, match="weights.safetensors: not a readable safetensors"):
        load_safetensors(path, fix=FIX)


def test_missing_tensor_is_named(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(FileFormatError, match=r"missing tensors \['b'\] \(it holds \['w'\]\)"):
        load_safetensors(path, fix=FIX, required=["w", "b"])
    assert load_safetensors(path, fix=FIX, required=["w"])["w"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize(("tensor", "problem"), [
    (torch.ones(3), "has shape (3,), expected 2 dimensions"),
    (torch.ones(3, 2, dtype=torch.int64), "has dtype torch.int64, expected a floating-point"),
])
def test_check_tensor_rejects_wrong_kinds(tmp_path, tensor, problem):
    with pytest.raises(FileFormatError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        check_tensor(tmp_path / "w.safetensors", "W_dec", tensor, fix=FIX, ndim=2)


def test_atomic_write_respects_the_umask_and_leaves_no_scratch(tmp_path):
    previous = os.umask(0o027)
    try:
        path = atomic_write_json(tmp_path / "state.json", {"a": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


@pytest.mark.parametrize("size", [1000, 3 << 20], ids=["small", "big"])
def test_file_identity_changes_with_the_content_even_at_the_same_time(tmp_path, size):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * size)
    before = file_identity(path)
    stat = path.stat()
    path.write_bytes(b"a" * (size - 1) + b"b")  # same size, last byte differs, time restored
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_identity(path) != before


def test_a_small_file_copied_elsewhere_keeps_its_identity(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text('{"k": 4}')
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text('{"k": 4}')
    assert file_identity(tmp_path / "a" / "config.json") == \
        file_identity(tmp_path / "b" / "config.json")


def write_sae(folder):
    DeepSAEModel(DeepSAEConfig(d_in=8, n_latents=16, k=2)).save_pretrained(folder)


def write_sae_folder(folder):
    save_saes({"layers.0": DeepSAEModel(DeepSAEConfig(d_in=8, n_latents=16, k=2))}, folder)


def write_latent_cache(folder):
    LatentCache(torch.zeros(2, 4, dtype=torch.long), torch.tensor([[0, 1, 3]]), torch.ones(1),
                n_latents=8).save(folder, n_splits=2)


def write_sparsify_export(folder):
    to_sparsify(DeepSAEModel(DeepSAEConfig(d_in=8, n_latents=16, k=2)), folder)


def write_saelens_export(folder):
    to_saelens(DeepSAEModel(DeepSAEConfig(d_in=8, n_latents=16, k=2)), folder,
               hook_name="blocks.0.hook_mlp_out")


@pytest.mark.parametrize("write", [write_sae, write_sae_folder, write_latent_cache,
                                   write_sparsify_export, write_saelens_export],
                         ids=["save_pretrained", "save_saes", "latent_cache", "to_sparsify",
                              "to_saelens"])
def test_every_file_written_gets_the_umask_mode(tmp_path, write):
    """safetensors >= 0.8 creates its files 0600 (safetensors#782): an SAE must not be private."""
    previous = os.umask(0o027)
    try:
        write(tmp_path / "out")
    finally:
        os.umask(previous)
    files = [path for path in (tmp_path / "out").rglob("*") if path.is_file()]
    assert any(path.suffix == ".safetensors" for path in files)
    assert {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in files} == {
        path.name: oct(0o640) for path in files}
