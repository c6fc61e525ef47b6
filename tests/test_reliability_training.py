"""Reliability of training: bad checkpoint and cache files, planted pickles, divergence, NaN
activations, changed settings, overwritten models, full disks, concurrent runs and Ctrl-C.

Each case asserts either a clear error (naming the file or the setting and what to do) or that
the data survived. The cases are the attack list of issue 15 (items 1-7) and issue 14 (Ctrl-C);
tiny real runs (a 2-layer GPT-2, 12 steps) keep them fast.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file, save_file
from test_training_e2e import HOOKPOINT, TINY_SAE, tiny_config
from transformers import GPT2LMHeadModel

from hf_deepsae.activations import (
    ActivationStream,
    ModelActivations,
    TokenChunks,
    dataset_identity,
    language_model_identity,
    load_language_model,
    load_text_dataset,
    tokenize_and_chunk,
)
from hf_deepsae.files import file_sha256
from hf_deepsae.training import activation_cache, parse_args, train
from hf_deepsae.training import trainer as trainer_module
from hf_deepsae.training.activation_cache import (
    cache_folder,
    complete_builds,
    find_cache,
    open_or_build_cache,
    read_cache_info,
)
from hf_deepsae.training.checkpointing import TRAINER_STATE_FILE, find_checkpoint
from hf_deepsae.training.config import sae_config_kwargs
from hf_deepsae.training.interruption import StopRequests
from hf_deepsae.training.run_identity import resume_command
from hf_deepsae.training.state_files import read_state, write_state

pytest_plugins = ["hub_server"]
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTED = {"checkpointing_steps": 4, "save_total_limit": None}


@pytest.fixture(scope="module")
def finished_run(tiny_lm, tmp_path_factory) -> tuple[Path, Path]:
    """(output_dir, cache root) of a cached 12-step run with checkpoints at steps 4 and 8."""
    folder = tmp_path_factory.mktemp("finished")
    config = tiny_config(tiny_lm, folder / "out", activation_cache_dir=str(folder / "cache"),
                         **CHECKPOINTED)
    train(config, TINY_SAE)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return folder / "out", folder / "cache"


@pytest.fixture
def run_copy(finished_run, tmp_path) -> tuple[Path, Path]:
    """A private copy of `finished_run` (output_dir, cache root) that a test may damage."""
    output_dir, cache = finished_run
    shutil.copytree(output_dir, tmp_path / "out")
    shutil.copytree(cache, tmp_path / "cache", ignore=shutil.ignore_patterns("*.lock"))
    return tmp_path / "out", tmp_path / "cache"


def resume(tiny_lm, run: tuple[Path, Path], **overrides) -> dict:
    output_dir, cache = run
    values = {"activation_cache_dir": str(cache), "resume_from_checkpoint": "latest",
              **CHECKPOINTED, **overrides}
    sae = values.pop("sae", TINY_SAE)
    return train(tiny_config(tiny_lm, output_dir, **values), sae)


class Payload:
    """Unpickling it creates `marker`: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def forge_digest(checkpoint: Path, name: str) -> None:
    """Record the current content of `name` as saved, so the damage reaches the file's parser."""
    state = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
    state["files"][name] = file_sha256(checkpoint / name)
    (checkpoint / TRAINER_STATE_FILE).write_text(json.dumps(state))


def plant(path: Path, marker: Path) -> None:
    torch.save(Payload(marker), path)


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


# Item 1 and the damaged-file part of item 9: every case must fail with the file's name and a
# fix, never unpickle (the marker stays absent), never resume from altered state.
OPTIMIZER = f"{HOOKPOINT}/optimizer_0"
DAMAGED_CHECKPOINTS = {
    "pickle-as-optimizer": (lambda c, m: plant(c / f"{OPTIMIZER}.safetensors", m),
                            "optimizer_0.safetensors: its content differs"),
    "pickle-as-optimizer-forged": (
        lambda c, m: (plant(c / f"{OPTIMIZER}.safetensors", m),
                      forge_digest(c, f"{OPTIMIZER}.safetensors")),
        "optimizer_0.safetensors: not a readable safetensors"),
    "pickle-as-data-state-forged": (
        lambda c, m: (plant(c / "data_state_0.json", m), forge_digest(c, "data_state_0.json")),
        "data_state_0.json: the file can't be read|data_state_0.json: not valid JSON"),
    "pickle-as-trainer-state": (lambda c, m: plant(c / TRAINER_STATE_FILE, m),
                                "trainer_state.json: (the file can't be read|not valid JSON)"),
    "accelerate-format": (
        lambda c, m: ((c / TRAINER_STATE_FILE).write_text('{"step": 8, "num_processes": 1}'),
                      plant(c / "custom_checkpoint_0.pkl", m), plant(c / "optimizer.bin", m)),
        "checkpoint format 1 .*can run code"),
    "truncated-weights": (lambda c, m: truncate(c / HOOKPOINT / "model.safetensors"),
                          "model.safetensors: its content differs"),
    "truncated-optimizer-forged": (
        lambda c, m: (truncate(c / f"{OPTIMIZER}.safetensors"),
                      forge_digest(c, f"{OPTIMIZER}.safetensors")),
        "optimizer_0.safetensors: not a readable safetensors file"),
    "weights-missing-a-tensor-forged": (
        lambda c, m: (save_file({"b_dec": torch.zeros(32)}, c / HOOKPOINT / "model.safetensors"),
                      forge_digest(c, f"{HOOKPOINT}/model.safetensors")),
        "model.safetensors: missing tensors"),
    "optimizer-of-another-model-forged": (
        lambda c, m: (edit_json(c / f"{OPTIMIZER}.json",
                                lambda v: v["state"]["param_groups"].append(
                                    v["state"]["param_groups"][0])),
                      forge_digest(c, f"{OPTIMIZER}.json")),
        f"{HOOKPOINT}: does not fit the SAE being trained"),
    "rng-state-garbage-forged": (
        lambda c, m: (edit_json(c / "rng_state_0.json", lambda v: v["state"].update(python=1)),
                      forge_digest(c, "rng_state_0.json")),
        "rng_state_0.json: not a valid RNG state"),
    "trainer-state-without-step": (
        lambda c, m: edit_json(c / TRAINER_STATE_FILE, lambda v: v.pop("step")),
        r"trainer_state.json: missing required keys \['step'\]"),
    "trainer-state-without-digests": (
        lambda c, m: edit_json(c / TRAINER_STATE_FILE, lambda v: v.pop("files")),
        r"trainer_state.json: missing required keys \['files'\]"),
    "rng-state-deleted": (lambda c, m: (c / "rng_state_0.json").unlink(),
                          "rng_state_0.json: the file is missing"),
    "data-state-deleted": (lambda c, m: (c / "data_state_0.json").unlink(),
                           "data_state_0.json: the file (is missing|does not exist)"),
}


@pytest.mark.parametrize("case", list(DAMAGED_CHECKPOINTS))
def test_a_damaged_or_planted_checkpoint_fails_clearly_and_runs_no_code(tiny_lm, run_copy,
                                                                       tmp_path, case):
    damage, message = DAMAGED_CHECKPOINTS[case]
    checkpoint = run_copy[0] / "checkpoints" / "step_8"
    marker = tmp_path / "code-ran"
    damage(checkpoint, marker)
    with pytest.raises(ValueError, match=message) as caught:
        resume(tiny_lm, run_copy)
    assert "step_4" in str(caught.value) or "start" in str(caught.value)  # says what to do
    assert not marker.exists()


def test_planted_pickle_files_are_never_read(tiny_lm, run_copy, tmp_path):
    checkpoint = run_copy[0] / "checkpoints" / "step_8"
    marker = tmp_path / "code-ran"
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin", "scheduler.bin",
                 "random_states_0.pkl", "data_state_0.pt", "pytorch_model.bin",
                 f"{HOOKPOINT}/optimizer.bin", f"{HOOKPOINT}/custom_checkpoint_0.pkl"):
        torch.save(Payload(marker), checkpoint / name)
    resumed = resume(tiny_lm, run_copy)
    assert not marker.exists() and HOOKPOINT in resumed


CACHE_DAMAGE = {
    "cache-info-not-json": (lambda b: (b / "cache_info.json").write_text("{"),
                            "cache_info.json: not valid JSON.*delete the folder"),
    "cache-info-without-rows": (
        lambda b: edit_json(b / "cache_info.json", lambda v: v.pop("rows")),
        r"cache_info.json: missing required keys \['rows'\]"),
    "truncated-shard": (lambda b: [truncate(p) for p in b.glob("*.safetensors")],
                        "safetensors: not a readable safetensors file.*delete the folder"),
}


@pytest.mark.parametrize("case", list(CACHE_DAMAGE))
def test_a_damaged_activation_cache_fails_clearly(tiny_lm, run_copy, tmp_path, case):
    damage, message = CACHE_DAMAGE[case]
    ((build, _),) = complete_builds(next(run_copy[1].iterdir()))
    damage(build)
    with pytest.raises(ValueError, match=message):
        train(tiny_config(tiny_lm, tmp_path / "new", activation_cache_dir=str(run_copy[1])),
              TINY_SAE)


def assert_identical(value, expected) -> None:
    assert type(value) is type(expected)
    if isinstance(expected, torch.Tensor):
        assert value.dtype == expected.dtype and torch.equal(value, expected)
    elif isinstance(expected, dict):
        assert list(value) == list(expected)
        for key in expected:
            assert_identical(value[key], expected[key])
    elif isinstance(expected, list | tuple):
        assert len(value) == len(expected)
        for item, expected_item in zip(value, expected, strict=True):
            assert_identical(item, expected_item)
    else:
        assert value == expected or value != value and expected != expected  # NaN


def test_training_states_round_trip_exactly_without_pickle(tmp_path):
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(3, 2)},
                  7: {"momentum_buffer": torch.randn(2, dtype=torch.bfloat16)}},
        "param_groups": [{"betas": (0.9, 0.999), "lr": 0.1 + 0.2, "params": [0, 7],
                          "foreach": None, "maximize": False, "name": "adam",
                          "dtype": torch.bfloat16}],
        "__tensor__": "a key that looks like a tag", "counts": torch.arange(5),
        "odd floats": [float("inf"), float("-inf"), float("nan"), 5e-324],
        "python_rng": random.getstate(),
    }
    write_state(tmp_path, "state", state)
    assert_identical(read_state(tmp_path, "state", fix="retry"), state)
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".safetensors"}


def test_a_state_reads_back_only_the_rows_asked_for(tmp_path):
    """What a latent shard does on resume: its rows of the stored optimizer state, nothing more."""
    state = {"state": {3: {"exp_avg": torch.randn(10, 4), "step": torch.tensor(2.0)},
                       5: {"exp_avg": torch.randn(10, 4)}}, "param_groups": [{"lr": 0.1}]}
    write_state(tmp_path, "optimizer_0", state)
    asked = []

    def rows(path, shape):
        asked.append((path, tuple(shape)))
        return slice(2, 5) if path[:2] == ("state", 3) and len(shape) else None

    read = read_state(tmp_path, "optimizer_0", fix="retry", rows=rows)
    assert torch.equal(read["state"][3]["exp_avg"], state["state"][3]["exp_avg"][2:5])
    assert torch.equal(read["state"][5]["exp_avg"], state["state"][5]["exp_avg"])
    assert read["state"][3]["step"] == 2.0 and read["param_groups"] == [{"lr": 0.1}]
    assert sorted(asked) == [(("state", 3, "exp_avg"), (10, 4)), (("state", 3, "step"), ()),
                             (("state", 5, "exp_avg"), (10, 4))]


def test_a_state_holding_an_object_is_refused_by_name(tmp_path):
    with pytest.raises(TypeError, match=r"can't store object at state\.param_groups\.0\.fn"):
        write_state(tmp_path, "state", {"param_groups": [{"fn": object()}]})


@pytest.mark.parametrize("save_total_limit", [5, None])
def test_the_printed_command_reproduces_the_run(tiny_lm, tmp_path, save_total_limit):
    config = tiny_config(tiny_lm, tmp_path, streaming=True, hookpoints=[HOOKPOINT],
                         save_total_limit=save_total_limit, optimizer="adamw", lr=1e-3 / 3)
    sae = sae_config_kwargs({**TINY_SAE, "encoder_hidden": [], "layer_norm": False})
    command = resume_command(config, sae, num_processes=1, resume_from_checkpoint="latest")
    parsed_config, parsed_sae = parse_args(shlex.split(command)[2:])
    assert dataclasses.asdict(parsed_config) == {**dataclasses.asdict(config),
                                                 "resume_from_checkpoint": "latest"}
    assert dataclasses.asdict(parsed_sae) == sae


def test_a_cache_builds_under_a_partial_state_and_is_found_without_the_model(tiny_lm,
                                                                             tmp_path):
    model, tokenizer = load_language_model(str(tiny_lm[0]))
    chunks = tokenize_and_chunk(load_text_dataset(str(tiny_lm[1])), tokenizer, 16)
    source = ModelActivations(model, {"mlp": HOOKPOINT}, TokenChunks(chunks, 8, seed=0))
    metadata = {"model_name_or_path": "tiny"}
    assert find_cache(tmp_path, metadata, ["mlp"], rows=500) is None
    built = open_or_build_cache(source, tmp_path, metadata, max_rows=500, rows_per_shard=200,
                                accelerator=PartialState(), seed=0)
    built.close()
    found = find_cache(tmp_path, metadata, ["mlp"], rows=500)
    assert found == built.directory and read_cache_info(found)["rows"] == 500


# Item 2: a diverging run keeps its finite checkpoints, and the advice it prints works.
def poison_after(monkeypatch, step: int, target: str) -> None:
    real_update, calls = trainer_module.update_sae, []

    def update_then_poison(sae, optimizers, *args, **kwargs):
        real_update(sae, optimizers, *args, **kwargs)
        calls.append(1)
        if len(calls) == step:
            with torch.no_grad():
                if target == "weights":
                    next(sae.parameters()).fill_(float("nan"))
                else:  # Adam's second moment: the weights stay finite, the state does not
                    optimizers[0].state[next(iter(optimizers[0].state))]["exp_avg_sq"].fill_(
                        float("inf"))

    monkeypatch.setattr(trainer_module, "update_sae", update_then_poison)


@pytest.mark.parametrize("target", ["weights", "optimizer-state"])
def test_a_diverging_run_keeps_its_last_finite_checkpoint_and_the_advice_resumes(
        tiny_lm, tmp_path, monkeypatch, target):
    config = tiny_config(tiny_lm, tmp_path, checkpointing_steps=2, save_total_limit=1,
                         logging_steps=100, optimizer="adam")
    poison_after(monkeypatch, 5, target)
    with pytest.raises(RuntimeError, match="non-finite between steps 4 and 6") as caught:
        train(config, TINY_SAE)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_4"]
    command = str(caught.value).splitlines()[-1]
    assert "--resume_from_checkpoint" in command and "--lr 0.0015" in command
    AcceleratorState._reset_state(reset_partial_state=True)
    saes = train(*parse_args(shlex.split(command)[2:]))
    sae = saes[HOOKPOINT]
    assert sae.config.training_config["lr"] == 0.0015
    assert all(torch.isfinite(p).all() for p in sae.parameters())


# Item 3: activations that are (almost) all NaN stop the run instead of reading forever.
class NaNSource:
    def __init__(self, nan_fraction: float) -> None:
        self.nan_fraction, self.blocks = nan_fraction, 0

    def next_block(self) -> dict[str, torch.Tensor]:
        self.blocks += 1
        rows = torch.randn(100, 4)
        rows[: int(100 * self.nan_fraction)] = float("nan")
        return {"x": rows}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@pytest.mark.parametrize(("nan_fraction", "fails"), [(1.0, True), (0.8, True), (0.5, False)])
def test_mostly_nan_activations_stop_after_a_bounded_read(nan_fraction, fails):
    source = NaNSource(nan_fraction)
    stream = ActivationStream(source, batch_size=50, buffer_size=200)
    if fails:
        with pytest.raises(ValueError, match="activation rows were NaN/inf"):
            next(stream)
        assert source.blocks <= ActivationStream.MAX_NONFINITE_BUFFERS * 2
    else:
        assert next(stream)["x"].shape == (50, 4)


def test_a_language_model_with_nan_weights_fails_the_run(tiny_lm, tmp_path):
    shutil.copytree(tiny_lm[0], tmp_path / "nan-lm")
    model = GPT2LMHeadModel.from_pretrained(tiny_lm[0])
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan-lm")
    with pytest.raises(ValueError, match="NaN/inf; the model is broken"):
        train(tiny_config((tmp_path / "nan-lm", tiny_lm[1]), tmp_path / "out"), TINY_SAE)


# Item 4: a resume with other settings, or another run in a used output_dir, says what differs.
@pytest.mark.parametrize(("overrides", "difference"), [
    ({"sae": {**TINY_SAE, "k": 8}}, "k: 4 → 8"),
    ({"layers": [0]}, r"layers: \[1\] → \[0\]"),
    ({"batch_size": 32}, "batch_size: 64 → 32"),
    ({"seed": 1}, "seed: 0 → 1"),
    ({"activation_cache_dir": None}, "activations_from: 'cache' → 'model'"),
    ({"k_anneal_steps": 3}, "k_anneal_steps: 0 → 3"),
    ({"mask_positions_below": 2}, "mask_positions_below: 0 → 2"),
], ids=["k", "layers", "batch_size", "seed", "cache-to-model", "k-anneal", "token-mask"])
def test_resuming_with_other_settings_names_each_difference(tiny_lm, run_copy, overrides,
                                                            difference):
    with pytest.raises(ValueError, match=f"belongs to a run with other settings:(.|\n)*"
                                         f"{difference}"):
        resume(tiny_lm, run_copy, **overrides)


def test_another_run_in_a_used_output_dir_is_refused_unless_overwritten(tiny_lm, run_copy):
    output_dir, cache = run_copy
    other = {**TINY_SAE, "k": 8}
    with pytest.raises(ValueError, match="holds the outputs of another run .*k: 4 → 8.*"
                                         "--overwrite_output_dir"):
        train(tiny_config(tiny_lm, output_dir, activation_cache_dir=str(cache)), other)
    AcceleratorState._reset_state(reset_partial_state=True)
    train(tiny_config(tiny_lm, output_dir, activation_cache_dir=str(cache),
                      overwrite_output_dir=True), other)
    assert not (output_dir / "checkpoints").exists()  # the k=4 run's checkpoints are gone
    saved = json.loads((output_dir / HOOKPOINT / "config.json").read_text())
    assert saved["k"] == 8


def test_resuming_into_the_output_dir_of_another_run_is_refused(tiny_lm, finished_run,
                                                               run_copy):
    output_dir, cache = run_copy
    edit_json(output_dir / "training_run.json", lambda v: v["settings"].update(k=8))
    with pytest.raises(ValueError, match="holds the outputs of another run .*k: 8 → 4"):
        resume(tiny_lm, run_copy,
               resume_from_checkpoint=str(finished_run[0] / "checkpoints" / "step_8"))


def test_the_same_run_again_in_its_output_dir_is_allowed(tiny_lm, run_copy):
    output_dir, cache = run_copy
    train(tiny_config(tiny_lm, output_dir, activation_cache_dir=str(cache), **CHECKPOINTED),
          TINY_SAE)
    assert find_checkpoint(output_dir, "latest").name == "step_8"


# Item 5: activations are keyed by the model's content, not its path.
def other_weights(model_dir: Path, seed: int) -> GPT2LMHeadModel:
    """The model of `model_dir` (same shapes, same file size) with new random weights."""
    model = GPT2LMHeadModel.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["rewritten", "copied-with-old-mtime"])
def test_an_overwritten_model_folder_gets_a_new_cache_and_refuses_the_old_checkpoints(
        tiny_lm, tmp_path, keep_mtime):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_lm[0], model_dir)
    run = (tmp_path / "out", tmp_path / "cache")
    config = dict(activation_cache_dir=str(run[1]), **CHECKPOINTED)
    train(tiny_config((model_dir, tiny_lm[1]), run[0], **config), TINY_SAE)
    (old_cache,) = run[1].iterdir()
    other_weights(model_dir, seed=1).save_pretrained(tmp_path / "other")
    copy = shutil.copy2 if keep_mtime else shutil.copyfile
    copy(tmp_path / "other" / "model.safetensors", model_dir / "model.safetensors")
    if keep_mtime:
        stat = (tiny_lm[0] / "model.safetensors").stat()
        os.utime(model_dir / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))

    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match="activations.model.files.model.safetensors"):
        train(tiny_config((model_dir, tiny_lm[1]), run[0], resume_from_checkpoint="latest",
                          **config), TINY_SAE)
    AcceleratorState._reset_state(reset_partial_state=True)
    train(tiny_config((model_dir, tiny_lm[1]), tmp_path / "new", **config), TINY_SAE)
    (new_cache,) = set(run[1].iterdir()) - {old_cache}
    old, new = (load_file(next(folder.glob("build-*/rank00000-000000.safetensors")))
                for folder in (old_cache, new_cache))
    assert not torch.equal(old[f"{HOOKPOINT}:output"], new[f"{HOOKPOINT}:output"])


@pytest.mark.parametrize(("change", "same"), [
    (lambda path: os.utime(path, ns=(1, 1)), True),
    (lambda path: path.write_text(path.read_text().replace("the", "teh", 1)), False),
], ids=["touched-or-regenerated", "edited"])
def test_the_data_identity_follows_the_text_not_the_file_time(tiny_lm, tmp_path, change, same):
    corpus = Path(shutil.copy(tiny_lm[1], tmp_path / "corpus.txt"))
    before = dataset_identity(str(corpus))
    change(corpus)
    assert (dataset_identity(str(corpus)) == before) is same


def test_a_hub_model_updated_under_the_same_id_gets_a_new_cache(tiny_lm, hub, tmp_path):
    from huggingface_hub import HfApi

    repo = f"{hub.user}/tiny-lm"
    HfApi().create_repo(repo)
    identities = []
    for seed in (0, 1):
        other_weights(tiny_lm[0], seed).save_pretrained(tmp_path / f"v{seed}")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny_lm[0] / name, tmp_path / f"v{seed}")
        HfApi().upload_folder(repo_id=repo, folder_path=tmp_path / f"v{seed}")
        identities.append(language_model_identity(load_language_model(repo)[0]))
    assert identities[0]["commit"] and identities[0]["commit"] != identities[1]["commit"]
    assert cache_folder("c", identities[0]) != cache_folder("c", identities[1])


# Item 6: a full disk while saving keeps every previous file.
def test_a_full_disk_while_saving_the_saes_keeps_the_previous_ones(tiny_lm, run_copy,
                                                                  monkeypatch):
    import transformers.modeling_utils as modeling_utils

    output_dir, cache = run_copy
    before = {p: p.read_bytes() for p in (output_dir / HOOKPOINT).iterdir()}
    real_save = modeling_utils.safe_save_file

    def save_half_then_fail(tensors, filename, **kwargs):
        real_save(tensors, filename, **kwargs)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(modeling_utils, "safe_save_file", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        train(tiny_config(tiny_lm, output_dir, activation_cache_dir=str(cache), **CHECKPOINTED),
              TINY_SAE)
    assert {p: p.read_bytes() for p in (output_dir / HOOKPOINT).iterdir()} == before
    assert not [p for p in output_dir.iterdir() if p.name.endswith((".tmp", ".old"))]


def test_a_full_disk_while_checkpointing_keeps_the_older_checkpoints(tiny_lm, tmp_path,
                                                                    monkeypatch):
    from hf_deepsae.training import checkpointing

    real_save = checkpointing.save_file

    def fail_at_step_8(tensors, filename, **kwargs):
        if "step_8" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        real_save(tensors, filename, **kwargs)

    monkeypatch.setattr(checkpointing, "save_file", fail_at_step_8)
    with pytest.raises(OSError, match="No space left"):
        train(tiny_config(tiny_lm, tmp_path, **CHECKPOINTED), TINY_SAE)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_4"]
    AcceleratorState._reset_state(reset_partial_state=True)
    assert HOOKPOINT in train(tiny_config(tiny_lm, tmp_path, resume_from_checkpoint="latest",
                                          **CHECKPOINTED), TINY_SAE)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_sae_folders_follow_the_umask(tiny_lm, tmp_path, umask):
    previous = os.umask(umask)
    try:
        train(tiny_config(tiny_lm, tmp_path), TINY_SAE)
    finally:
        os.umask(previous)
    folder = tmp_path / HOOKPOINT
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o666 & ~umask}


# Item 7: concurrent runs and killed writers.
def hold_lock_in_another_process(lock_file: Path, seconds: float, read: bool = False):
    kind = "ReadWriteLock(sys.argv[1])\nlock.acquire_read()" if read else \
        "FileLock(sys.argv[1])\nlock.acquire()"
    code = (f"import sys, time\nfrom filelock import FileLock, ReadWriteLock\nlock = {kind}\n"
            f"print('held', flush=True)\ntime.sleep({seconds})\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock_file)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_a_busy_output_dir_fails_at_once(tiny_lm, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    holder = hold_lock_in_another_process(tmp_path / ".training.lock", 300)
    try:
        with pytest.raises(ValueError, match="another training run is using output_dir"):
            train(tiny_config(tiny_lm, tmp_path), TINY_SAE)
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / HOOKPOINT).exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_run_waits_for_another_building_the_same_cache(tiny_lm, run_copy, tmp_path, capsys,
                                                         monkeypatch):
    key_folder = next(run_copy[1].iterdir())
    holder = hold_lock_in_another_process(key_folder / "build.lock", 120)
    real_acquire, waiting = activation_cache._acquire_announced, threading.Event()

    def acquire_once_the_other_run_is_done(lock, folder):
        waiting.set()
        real_acquire(lock, folder)

    def finish_the_other_run():  # it ends 1.5 s after this run started waiting for it
        waiting.wait()
        time.sleep(1.5)
        holder.kill()

    monkeypatch.setattr(activation_cache, "_acquire_announced", acquire_once_the_other_run_is_done)
    threading.Thread(target=finish_the_other_run, daemon=True).start()
    try:
        train(tiny_config(tiny_lm, tmp_path, activation_cache_dir=str(run_copy[1])), TINY_SAE)
    finally:
        holder.kill()
        holder.wait()
    assert "Waiting for another run that is building the activation cache" in \
        capsys.readouterr().out
    assert len(complete_builds(key_folder)) == 1  # reused, not rebuilt


def test_a_bigger_cache_never_deletes_one_a_run_is_reading(tiny_lm, run_copy, tmp_path):
    cache = run_copy[1]
    key_folder = next(cache.iterdir())
    ((small, _),) = complete_builds(key_folder)
    holder = hold_lock_in_another_process(small / "readers.lock", 300, read=True)
    try:
        train(tiny_config(tiny_lm, tmp_path / "a", activation_cache_dir=str(cache),
                          total_tokens=64 * 20), TINY_SAE)
        assert small.is_dir() and len(complete_builds(key_folder)) == 2
    finally:
        holder.kill()
        holder.wait()
    AcceleratorState._reset_state(reset_partial_state=True)
    train(tiny_config(tiny_lm, tmp_path / "b", activation_cache_dir=str(cache)), TINY_SAE)
    assert not small.exists() and len(complete_builds(key_folder)) == 1


def test_half_written_caches_and_checkpoints_are_never_read_and_get_cleaned(tiny_lm, run_copy):
    output_dir, cache = run_copy
    key_folder = next(cache.iterdir())
    half_build = key_folder / "build-999999"  # a killed build: shards but no cache_info.json
    shutil.copytree(complete_builds(key_folder)[0][0], half_build)
    (half_build / "cache_info.json").unlink()
    checkpoints = output_dir / "checkpoints"
    (checkpoints / "step_4").rename(checkpoints / ".deleting-step_4")  # killed while pruning
    shutil.copytree(checkpoints / "step_8", checkpoints / "step_12")  # killed while saving
    (checkpoints / "step_12" / TRAINER_STATE_FILE).unlink()
    shutil.copytree(checkpoints / "step_8", checkpoints / ".tmp-step_9")
    assert find_checkpoint(output_dir, "latest").name == "step_8"
    resume(tiny_lm, run_copy)
    assert not half_build.exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_12", "step_8"]


# Issue 14: checkpoints by time, signals.
def test_checkpointing_minutes_saves_by_time(tiny_lm, tmp_path):
    train(tiny_config(tiny_lm, tmp_path, checkpointing_minutes=1e-9, save_total_limit=None),
          TINY_SAE)
    assert len(list((tmp_path / "checkpoints").iterdir())) == 11  # every step but the last


def test_sigterm_requests_a_stop_and_a_second_ctrl_c_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    with StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def cli_args(tiny_lm, output_dir: Path, cache: Path) -> list[str]:
    model_dir, corpus = tiny_lm
    return [
        "--model_name_or_path", str(model_dir), "--dataset_name", str(corpus),
        "--context_length", "16", "--layers", "1", "--batch_size", "64",
        "--shuffle_buffer_size", "320", "--total_tokens", str(64 * 40), "--eval_tokens", "256",
        "--output_dir", str(output_dir), "--log_with", "none", "--checkpointing_steps", "100",
        "--activation_cache_dir", str(cache), "--lr", "0.003", "--seed", "0",
        "--expansion_factor", "2", "--k", "4", "--encoder_hidden", "16", "--decoder_hidden", "16",
    ]


SLOW_TRAINING_DRIVER = """
import runpy, sys, time
import hf_deepsae.training.trainer as trainer
real_update = trainer.update_sae
def slow_update(*args, **kwargs):  # 0.1 s a step: the signal lands mid-run on any machine
    time.sleep(0.1)
    return real_update(*args, **kwargs)
trainer.update_sae = slow_update
sys.argv = sys.argv[1:]  # as if `python examples/train.py ...` had been run
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_ctrl_c_saves_prints_the_resume_command_and_that_resume_is_bit_identical(tiny_lm,
                                                                                 tmp_path):
    output_dir, cache = tmp_path / "out", tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", SLOW_TRAINING_DRIVER, str(REPO / "examples" / "train.py"),
               *cli_args(tiny_lm, output_dir, cache)]
    run = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    errors: list[str] = []
    training = threading.Event()

    def read_errors():
        for chunk in iter(lambda: run.stderr.read(100), ""):
            errors.append(chunk)
            if re.search(r"Training SAE:\s+\d+%\|[^|]*\| [2-9]/40", "".join(errors[-3:])):
                training.set()

    threading.Thread(target=read_errors, daemon=True).start()
    while not training.wait(0.2) and run.poll() is None:
        pass
    assert training.is_set(), "".join(errors)[-2000:]
    with pytest.raises(ValueError, match="another training run is using output_dir"):
        train(*parse_args(cli_args(tiny_lm, output_dir, tmp_path / "cache2")))
    run.send_signal(signal.SIGINT)
    stdout, _ = run.communicate(timeout=120)
    assert run.returncode == 130, "".join(errors)[-2000:]
    assert "Traceback" not in "".join(errors)
    stopped = re.search(r"Stopped at step (\d+)/40; saved the training state to (\S+)\. "
                        r"Resume with:\n  (.*)", stdout)
    assert stopped, stdout
    step, checkpoint, resume_command = int(stopped[1]), Path(stopped[2]), stopped[3]
    assert 0 < step < 40 and checkpoint == output_dir / "checkpoints" / f"step_{step}"
    assert shlex.split(resume_command)[:2] == ["python", str(REPO / "examples" / "train.py")]

    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = train(*parse_args(shlex.split(resume_command)[2:]))
    AcceleratorState._reset_state(reset_partial_state=True)
    reference = train(*parse_args(cli_args(tiny_lm, tmp_path / "reference", cache)))
    for name, value in reference[HOOKPOINT].state_dict().items():
        assert torch.equal(resumed[HOOKPOINT].state_dict()[name], value), name
