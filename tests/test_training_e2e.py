"""End to end: `train` on a tiny random GPT-2 and a few hundred lines of text."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from hf_deepsae import DeepSAEModel
from hf_deepsae.hub import load_saes
from hf_deepsae.training import TrainingConfig, train
from hf_deepsae.training import trainer as trainer_module
from hf_deepsae.training.activation_cache import complete_builds

pytest_plugins = ["hub_server"]

REPO = Path(__file__).resolve().parents[1]
HOOKPOINT = "transformer.h.1.mlp.c_proj"
TINY_SAE = {"expansion_factor": 2, "k": 4, "encoder_hidden": [16], "decoder_hidden": [16]}


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def tiny_config(tiny_lm: tuple[Path, Path], output_dir: Path, **overrides) -> TrainingConfig:
    model_dir, corpus = tiny_lm
    values = dict(
        model_name_or_path=str(model_dir), dataset_name=str(corpus), context_length=16,
        lm_batch_size=8, layers=[1], batch_size=64, shuffle_buffer_size=320, total_tokens=64 * 12,
        eval_tokens=256, output_dir=str(output_dir), checkpointing_steps=0, logging_steps=4,
        log_with=None, lr=3e-3, seed=0, activation_cache_dir=None,
    )
    return TrainingConfig(**{**values, **overrides})


def tensorboard_scalars(output_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(output_dir / "logs"))
    accumulator.Reload()
    return [event.value for event in accumulator.Scalars(tag)]


def test_training_lowers_fvu_and_saves_a_self_describing_sae(tiny_lm, tmp_path):
    config = tiny_config(tiny_lm, tmp_path, total_tokens=64 * 40, log_with="tensorboard",
                         logging_steps=5, lr=1e-2)
    saes = train(config, TINY_SAE)

    fvu = tensorboard_scalars(tmp_path, "layer_1/fvu")
    assert len(fvu) == 8 and fvu[-1] < 0.9 * fvu[0]
    assert set(saes) == {HOOKPOINT}
    loaded = AutoModel.from_pretrained(tmp_path / HOOKPOINT)
    assert isinstance(loaded, DeepSAEModel)
    assert loaded.config.hookpoint == HOOKPOINT and loaded.config.layer == 1
    assert loaded.config.base_model_name_or_path == str(tiny_lm[0])
    assert loaded.config.training_config["total_tokens"] == 64 * 40
    assert loaded.config.training_config["lr"] == 1e-2
    metrics = loaded.config.metrics
    assert metrics["n_tokens"] == 256 and 0 < metrics["fvu"] < fvu[0] and metrics["l0"] <= 4
    assert {"dead_fraction", "dead_fraction_training", "nonfinite_rows_skipped"} <= set(metrics)
    assert (tmp_path / HOOKPOINT / "README.md").is_file()


def test_a_matryoshka_run_logs_each_prefix_fvu(tiny_lm, tmp_path):
    config = tiny_config(tiny_lm, tmp_path, log_with="tensorboard", logging_steps=4)
    saes = train(config, TINY_SAE | {"matryoshka_prefixes": [8, 32]})
    assert saes[HOOKPOINT].config.matryoshka_prefixes == [8, 32, 64]  # 2 × d_in = 64 latents
    prefix_fvus = [tensorboard_scalars(tmp_path, f"layer_1/matryoshka_fvu_{prefix}")
                   for prefix in (8, 32, 64)]
    assert all(len(values) == 3 for values in prefix_fvus)
    assert prefix_fvus[-1] == pytest.approx(tensorboard_scalars(tmp_path, "layer_1/fvu"))


def test_push_to_hub_uploads_every_hookpoint_with_its_card(tiny_lm, tmp_path, hub):
    train(tiny_config(tiny_lm, tmp_path, layers=[0, 1], push_to_hub=True,
                      hub_model_id="tiny-deepsae"), TINY_SAE)
    pushed = load_saes(f"{hub.user}/tiny-deepsae")
    assert set(pushed) == {"transformer.h.0.mlp.c_proj", HOOKPOINT}
    assert pushed[HOOKPOINT].config.metrics["n_tokens"] == 256
    assert f"{HOOKPOINT}/README.md" in hub.files(f"{hub.user}/tiny-deepsae")


def test_push_to_hub_without_a_login_fails_before_training(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "get_token", lambda: None)  # nobody logged in
    with pytest.raises(ValueError, match="needs a Hub login"):
        train(tiny_config(tiny_lm, tmp_path, push_to_hub=True), TINY_SAE)


class Interrupted(Exception):
    """Stands in for a killed job."""


SCHEDULES = {"k_anneal_steps": 10, "k_anneal_start": 12, "lr_scheduler_type": "cosine",
             "std_coefficient_schedule": "linear", "mask_special_tokens": True,
             "mask_positions_below": 2}
"""Every schedule at once (k, lr, std penalty), crossing the interruption at step 8, with a
token mask beyond the default."""
END_TO_END = {"loss": "fvu+kl", "layers": [0, 1], "downstream_coefficient": 0.5,
              "total_tokens": 128 * 12, "k_anneal_steps": 10, "k_anneal_start": 12}
"""The end-to-end objective on two SAEs at once (128 tokens a step: 8 sequences of 16), with the
downstream term and a k schedule crossing the interruption."""


@pytest.mark.parametrize(("cached", "settings"), [
    (False, {}), (True, {}), (False, SCHEDULES), (True, SCHEDULES), (False, END_TO_END),
], ids=["from-model", "from-cache", "from-model-schedules", "from-cache-schedules",
        "end-to-end-kl"])
def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tiny_lm, tmp_path, monkeypatch,
                                                                   cached, settings):
    sae = {**TINY_SAE, "std_coefficient": 0.1} if settings else TINY_SAE

    def config(output_dir: Path, **overrides) -> TrainingConfig:
        cache = str(tmp_path / "cache") if cached else None
        return tiny_config(tiny_lm, output_dir, checkpointing_steps=4, activation_cache_dir=cache,
                           **settings, **overrides)

    uninterrupted = train(config(tmp_path / "a"), sae)
    real_save = trainer_module.save_checkpoint

    def save_then_die(accelerator, output_dir, step, *args, **kwargs):
        path = real_save(accelerator, output_dir, step, *args, **kwargs)
        if step == 8:
            raise Interrupted
        return path

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        train(config(tmp_path / "b"), sae)
    monkeypatch.undo()
    checkpoints = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert checkpoints == ["step_4", "step_8"]
    resumed = train(config(tmp_path / "b", resume_from_checkpoint="latest"), sae)

    assert resumed.keys() == uninterrupted.keys()
    for hookpoint, sae in resumed.items():
        expected = uninterrupted[hookpoint].state_dict()
        for name, value in sae.state_dict().items():
            assert torch.equal(value, expected[name]), (hookpoint, name)
        masked = sae.config.metrics["masked_rows_skipped"]
        assert masked == uninterrupted[hookpoint].config.metrics["masked_rows_skipped"]
        assert masked > 0 if "loss" not in settings else masked == 0  # KL: whole sequences


def test_one_cache_feeds_several_runs_and_other_settings_get_their_own(tiny_lm, tmp_path):
    root = tmp_path / "cache"
    train(tiny_config(tiny_lm, tmp_path / "first", activation_cache_dir=str(root)), TINY_SAE)
    (key_folder,) = root.iterdir()
    ((build, info),) = complete_builds(key_folder)
    assert info["full_pass"] is False and info["rows"] == 64 * 12  # capped at total_tokens
    shards = {path: path.stat().st_mtime_ns for path in build.glob("*.safetensors")}
    assert shards

    shallow = {**TINY_SAE, "encoder_hidden": [], "decoder_hidden": []}
    train(tiny_config(tiny_lm, tmp_path / "second", activation_cache_dir=str(root)), shallow)
    assert {path: path.stat().st_mtime_ns for path in build.glob("*.safetensors")} == shards

    train(tiny_config(tiny_lm, tmp_path / "third", activation_cache_dir=str(root),
                      context_length=8), TINY_SAE)
    assert len(list(root.iterdir())) == 2


@pytest.mark.parametrize(("overrides", "sae", "message"), [
    ({"layers": [7]}, TINY_SAE, "layer 7 is out of range"),
    ({"batch_size": 3, "shuffle_buffer_size": 3}, TINY_SAE, "smaller than k=4"),
    ({"text_column": "body"}, TINY_SAE, "no column 'body'"),
    ({"model_name_or_path": "./no/such/model"}, TINY_SAE, "model path .* does not exist"),
    ({"dataset_name": "./no/such/data.txt"}, TINY_SAE, "dataset path .* does not exist"),
    ({"total_tokens": 10}, TINY_SAE, "less than one step"),
])
def test_bad_input_fails_before_training(tiny_lm, tmp_path, overrides, sae, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_config(tiny_lm, tmp_path, **overrides), sae)


def test_an_unwritable_output_dir_fails_before_training(tiny_lm, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="not writable"):
        train(tiny_config(tiny_lm, blocker / "out"), TINY_SAE)


def tiny_cli_args(tiny_lm: tuple[Path, Path], tmp_path: Path) -> list[str]:
    model_dir, corpus = tiny_lm
    return [
        "--model_name_or_path", str(model_dir), "--dataset_name", str(corpus),
        "--context_length", "16", "--lm_batch_size", "8", "--layers", "1", "--batch_size", "32",
        "--shuffle_buffer_size", "128", "--total_tokens", "640", "--eval_tokens", "256",
        "--output_dir", str(tmp_path / "out"), "--log_with", "none", "--checkpointing_steps", "0",
        "--activation_cache_dir", str(tmp_path / "cache"),
        "--expansion_factor", "2", "--k", "4", "--encoder_hidden", "16", "--decoder_hidden", "16",
    ]


def free_port() -> int:
    """A port nobody listens on: parallel test runs must not share accelerate's default 29500."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_the_example_script_runs_with_plain_python(tiny_lm, tmp_path):
    script = REPO / "examples" / "train.py"
    command = [sys.executable, str(script), *tiny_cli_args(tiny_lm, tmp_path)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Saved the SAE for {HOOKPOINT} to {tmp_path / 'out' / HOOKPOINT}" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--loss", "fvu+kl", "--layers", "0", "1"]],
                         ids=["fvu", "end-to-end-kl"])
def test_two_process_ddp_on_cpu_ends_with_identical_weights_on_every_rank(tiny_lm, tmp_path,
                                                                          flags):
    driver = tmp_path / "driver.py"
    driver.write_text(  # runs examples/train.py unchanged, then dumps each rank's weights
        "import runpy, sys\n"
        "from accelerate import PartialState\n"
        "from safetensors.torch import save_file\n"
        "import hf_deepsae.training as training\n"
        "out, train = sys.argv.pop(1), training.train\n"
        "def train_and_dump(*args):\n"
        "    saes = train(*args)\n"
        "    state = next(iter(saes.values())).state_dict()\n"
        "    rank = PartialState().process_index\n"
        "    save_file({k: v.contiguous() for k, v in state.items()}, f'{out}/rank{rank}.st')\n"
        "    return saes\n"
        "training.train = train_and_dump\n"
        f"runpy.run_path({str(REPO / 'examples' / 'train.py')!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}  # this checkout's hf_deepsae, installed or not
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(driver),
        str(tmp_path), *tiny_cli_args(tiny_lm, tmp_path), *flags,
    ]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (load_file(tmp_path / f"rank{r}.st") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert "Saved the SAE" in result.stdout


@pytest.mark.parametrize(("overrides", "sae"), [
    ({"streaming": True}, TINY_SAE),
    ({"gradient_accumulation_steps": 2}, TINY_SAE),
    ({"layers": [0, 1], "optimizer": "adam"}, TINY_SAE),
    ({"hookpoints": ["transformer.h.0.mlp.c_proj"]}, TINY_SAE),
    ({}, {**TINY_SAE, "transcoder": True}),
    ({}, {**TINY_SAE, "transcoder": True, "skip_connection": True}),
    ({}, {**TINY_SAE, "sparsity": "batchtopk"}),
    ({}, {**TINY_SAE, "sparsity": "jumprelu"}),
    ({}, {**TINY_SAE, "sparsity": "relu", "encoder_hidden": [], "decoder_hidden": []}),
    ({}, {**TINY_SAE, "n_stacked": 2}),
    ({"mixed_precision": "bf16"}, TINY_SAE),
], ids=["streaming", "accumulation", "two-layers", "hookpoint", "transcoder", "skip-transcoder",
        "batchtopk", "jumprelu", "relu", "stacked", "bf16"])
def test_every_variant_trains_and_saves(tiny_lm, tmp_path, overrides, sae):
    saes = train(tiny_config(tiny_lm, tmp_path, **overrides), sae)
    for name, trained in saes.items():
        loaded = AutoModel.from_pretrained(tmp_path / name)
        assert loaded.config.metrics["fvu"] > 0
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, trained.state_dict()[key].to(value.dtype)), key
        assert not trained.config.skip_connection or trained.W_skip.any()  # the skip learns


def test_a_diverging_run_stops_with_the_offending_steps(tiny_lm, tmp_path):
    with pytest.raises(RuntimeError, match=r"non-finite between steps \d+ and \d+.*lower --lr"):
        train(tiny_config(tiny_lm, tmp_path, lr=1e20, optimizer="adam", max_grad_norm=0.0),
              TINY_SAE)
