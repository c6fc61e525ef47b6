"""`train` over real gloo process groups under `accelerate launch`: latent-sharded SAEs, hookpoints
spread over processes, their checkpoints (the ordinary pickle-free ones, resumed exactly, in
another mode, after SIGTERM), and processes that fail together instead of hanging.

Each launch runs several scenarios in the same processes (`distributed_driver.py`), because
starting processes costs more than training the tiny SAEs. The reference of every comparison is
the default DDP run of the same config on the same processes. The runs use Adam: Muon rounds its
orthogonalised update to bf16 (as `torch.optim.Muon` does), which turns the last-bit differences
of sums taken in another order into ~1e-4 weight differences; `test_latent_sharding.py` checks
the sharded Muon against torch's at that precision.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_activations import make_tiny_lm, write_corpus
from test_latent_sharding import free_port
from transformers import AutoModel

from hf_deepsae import DeepSAEModel
from hf_deepsae.training import TrainingConfig, parse_args, train

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
LAYER_1 = "transformer.h.1.mlp.c_proj"
THREE_HOOKPOINTS = ["transformer.h.0.mlp.c_proj", LAYER_1, "transformer.h.0.attn.c_proj"]
TINY_SAE = {"expansion_factor": 2, "k": 4, "encoder_hidden": [16], "decoder_hidden": [16]}
STEP_4 = "checkpoints/step_4"
FINE_TUNE = {"k_anneal_steps": 4, "k_anneal_start": 12, "mask_positions_below": 2}
"""A fine-tune of the "ddp" scenario's SAE with a k schedule and a wider token mask."""


def launch(num_processes: int, scenarios: list[dict], tiny_lm: tuple[Path, Path], root: Path
           ) -> subprocess.CompletedProcess:
    model_dir, corpus = tiny_lm
    spec = {"output_root": str(root), "sae": TINY_SAE, "scenarios": scenarios, "base": dict(
        model_name_or_path=str(model_dir), dataset_name=str(corpus), context_length=16,
        lm_batch_size=8, layers=[1], batch_size=64, shuffle_buffer_size=320,
        total_tokens=64 * 8 * num_processes, eval_tokens=256, checkpointing_steps=4,
        save_total_limit=None, logging_steps=2, log_with=None, lr=3e-3, seed=0, optimizer="adam",
        activation_cache_dir=None, ddp_timeout=120)}
    (root / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(num_processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()),
               str(REPO / "tests" / "distributed_driver.py"), str(root / "spec.json")]
    result = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True,
                            timeout=900)
    (root / "stdout.txt").write_text(result.stdout)
    return result


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tiny_lm")
    corpus = write_corpus(folder)
    return make_tiny_lm(folder, corpus), corpus


@pytest.fixture(scope="module")
def two_processes(tiny_lm, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two")
    planted = "planted/step_4"
    result = launch(2, [
        {"name": "ddp"},
        {"name": "sharded", "config": {"shard_latents": True}},
        {"name": "resumed", "plant_pickles": [f"sharded/out/{STEP_4}", planted], "config": {
            "shard_latents": True, "resume_from_checkpoint": str(root / planted)}},
        {"name": "ddp_resumed_sharded", "config": {
            "shard_latents": True, "resume_from_checkpoint": str(root / "ddp" / "out" / STEP_4)}},
        {"name": "interrupted", "signal_on_rank": [1, 1], "config": {
            "shard_latents": True, "save_total_limit": 3}},  # a limit the CLI can spell
        {"name": "interrupted_resumed", "output_of": "interrupted", "config": {
            "shard_latents": True, "save_total_limit": 3, "resume_from_checkpoint": "latest"}},
        {"name": "one_hookpoint", "config": {"distribute_hookpoints": True,
                                             "lm_device_map": "auto"}},
        {"name": "ddp_three", "config": {"hookpoints": THREE_HOOKPOINTS}},
        {"name": "three_hookpoints", "config": {"hookpoints": THREE_HOOKPOINTS,
                                                "distribute_hookpoints": True}},
        {"name": "three_hookpoints_resumed", "config": {
            "hookpoints": THREE_HOOKPOINTS, "distribute_hookpoints": True,
            "resume_from_checkpoint": str(root / "three_hookpoints" / "out" / "checkpoints"
                                          / "step_4")}},
        {"name": "ddp_init_annealed", "config": {**FINE_TUNE, "init_from": str(
            root / "ddp" / "out" / LAYER_1)}},
        {"name": "sharded_init_annealed", "config": {**FINE_TUNE, "shard_latents": True,
                                                     "init_from": str(root / "ddp" / "out"
                                                                      / LAYER_1)}},
        {"name": "disagreeing", "config_on_rank": {"1": {"lr": 1e-3}}},
    ], tiny_lm, root)
    assert result.returncode != 0  # the last scenario fails by design
    return root



@pytest.fixture(scope="module")
def three_processes(tiny_lm, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("three")
    result = launch(3, [
        {"name": "ddp"},
        {"name": "sharded", "config": {"shard_latents": True}},
        {"name": "failing", "raise_on_rank": [1, 3]},
    ], tiny_lm, root)
    assert result.returncode != 0
    return root


def outcomes(root: Path, scenario: str) -> list[dict]:
    return [json.loads(path.read_text())
            for path in sorted((root / scenario).glob("outcome_*.json"))]


def weights(root: Path, scenario: str, hookpoint: str = LAYER_1) -> dict[str, torch.Tensor]:
    return load_file(root / scenario / "out" / hookpoint / "model.safetensors")


def logged(root: Path, scenario: str, name: str) -> list[float]:
    return [entry[name] for entry in json.loads((root / scenario / "logs.json").read_text())]


def assert_same_sae(root: Path, scenario: str, reference: str, hookpoint: str = LAYER_1,
                    atol: float = 0.0) -> None:
    assert all(outcome == {"outcome": "ok"} for outcome in outcomes(root, scenario))
    expected, actual = weights(root, reference, hookpoint), weights(root, scenario, hookpoint)
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-4, atol=atol, msg=name)


@pytest.mark.parametrize("processes", ["two_processes", "three_processes"])
def test_a_latent_sharded_run_trains_the_ddp_sae(request, processes):
    root = request.getfixturevalue(processes)
    assert_same_sae(root, "sharded", "ddp", atol=1e-6)
    prefix = "layer_1"
    torch.testing.assert_close(logged(root, "sharded", f"{prefix}/loss"),
                               logged(root, "ddp", f"{prefix}/loss"), rtol=1e-5, atol=0)
    assert logged(root, "sharded", f"{prefix}/dead_fraction") == \
        logged(root, "ddp", f"{prefix}/dead_fraction")


def test_a_latent_sharded_fine_tune_with_a_k_schedule_trains_the_ddp_one(two_processes):
    assert_same_sae(two_processes, "sharded_init_annealed", "ddp_init_annealed", atol=1e-6)
    tuned = AutoModel.from_pretrained(two_processes / "ddp_init_annealed" / "out" / LAYER_1)
    assert tuned.config.k == 4 and tuned.config.training_config["k_anneal_start"] == 12
    prefix = "layer_1"
    assert logged(two_processes, "ddp_init_annealed", f"{prefix}/l0")[0] > 4


def test_a_latent_sharded_run_saves_one_ordinary_sae_that_chooses_the_ddp_latents(two_processes):
    sharded = AutoModel.from_pretrained(two_processes / "sharded" / "out" / LAYER_1)
    ddp = AutoModel.from_pretrained(two_processes / "ddp" / "out" / LAYER_1)
    assert isinstance(sharded, DeepSAEModel) and sharded.config.n_latents == 64
    probe = torch.randn(256, 32, generator=torch.Generator().manual_seed(0))
    chosen = [sae.encode(probe).latent_indices.sort(-1).values for sae in (sharded, ddp)]
    assert torch.equal(*chosen)
    assert sharded.config.metrics["fvu"] == pytest.approx(ddp.config.metrics["fvu"], rel=1e-4)


@pytest.mark.parametrize(("scenario", "uninterrupted", "hookpoints"), [
    ("resumed", "sharded", [LAYER_1]),
    ("interrupted", "sharded", [LAYER_1]),  # resumed by "interrupted_resumed"
    ("three_hookpoints_resumed", "three_hookpoints", THREE_HOOKPOINTS),
], ids=["latent-sharded", "latent-sharded-after-sigterm", "spread-hookpoints"])
def test_resuming_is_bit_identical_to_not_stopping(two_processes, scenario, uninterrupted,
                                                   hookpoints):
    for hookpoint in hookpoints:
        expected = weights(two_processes, uninterrupted, hookpoint)
        resumed = weights(two_processes, scenario, hookpoint)
        for name, value in expected.items():
            assert torch.equal(resumed[name], value), (hookpoint, name)


def test_a_sharded_checkpoint_holds_the_ddp_checkpoints_files_and_no_pickle(two_processes):
    sharded, ddp = (two_processes / scenario / "out" / STEP_4 for scenario in ("sharded", "ddp"))
    files = sorted(str(file.relative_to(sharded)) for file in sharded.rglob("*") if file.is_file())
    assert files == sorted(str(file.relative_to(ddp)) for file in ddp.rglob("*")
                           if file.is_file())
    for name in files:
        assert name.endswith((".json", ".safetensors")), name
        if name.endswith(".json"):
            json.loads((sharded / name).read_text())
            continue
        tensors = load_file(sharded / name)
        if name.startswith(LAYER_1):  # the SAE's state, gathered: the same as DDP's
            expected = load_file(ddp / name)
            for key, value in tensors.items():
                torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-6,
                                           msg=f"{name}: {key}")
    assert f"{LAYER_1}/model.safetensors" in files and f"{LAYER_1}/optimizer_0.json" in files


def test_planted_pickles_in_a_sharded_checkpoint_are_never_read(two_processes):
    assert all(outcome == {"outcome": "ok"} for outcome in outcomes(two_processes, "resumed"))
    assert (two_processes / "planted" / "step_4" / "optimizer.bin").is_file()
    assert not (two_processes / "planted" / "step_4.unpickled").exists()


def test_sigterm_on_one_process_saves_every_process_at_the_same_step(two_processes):
    checkpoint = two_processes / "interrupted" / "out" / "checkpoints" / "step_2"
    assert outcomes(two_processes, "interrupted") == 2 * [
        {"outcome": "TrainingInterrupted", "step": 2, "checkpoint": str(checkpoint)}]
    printed = (two_processes / "stdout.txt").read_text()
    stopped = re.search(f"Stopped at step 2/8; saved the training state to {checkpoint}. "
                        "Resume with:\n  (.*)", printed)
    assert stopped, printed
    command = shlex.split(stopped[1])
    assert command[:5] == ["accelerate", "launch", "--multi_gpu", "--num_processes", "2"]
    config, _ = parse_args(command[6:])
    assert config.shard_latents and config.resume_from_checkpoint == "latest"
    assert config.output_dir == str(checkpoint.parents[1])


def test_a_ddp_checkpoint_resumes_latent_sharded(two_processes):
    assert_same_sae(two_processes, "ddp_resumed_sharded", "ddp", atol=1e-6)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_resuming_with_another_number_of_processes_is_refused(two_processes, tmp_path):
    base = json.loads((two_processes / "spec.json").read_text())["base"]
    config = TrainingConfig(**{**base, "output_dir": str(tmp_path), "shard_latents": True,
                               "resume_from_checkpoint": str(two_processes / "sharded" / "out"
                                                             / STEP_4)})
    with pytest.raises(ValueError, match="other settings:\n  num_processes: 2 → 1\nResume"):
        train(config, TINY_SAE)


@pytest.mark.parametrize(("scenario", "reference", "hookpoints"), [
    ("one_hookpoint", "ddp", [LAYER_1]),
    ("three_hookpoints", "ddp_three", THREE_HOOKPOINTS),
], ids=["1-on-2", "3-on-2"])
def test_hookpoints_spread_over_processes_train_the_ddp_saes(two_processes, scenario, reference,
                                                             hookpoints):
    for hookpoint in hookpoints:
        assert_same_sae(two_processes, scenario, reference, hookpoint)
    assert (two_processes / scenario / "out" / "README.md").is_file()


def test_processes_launched_with_different_configs_all_fail_naming_it(two_processes):
    results = outcomes(two_processes, "disagreeing")
    assert len(results) == 2
    for result in results:
        assert "disagree on the training configuration" in result["message"]
        assert "lr: 0.003 on process 0 but 0.001 on process 1" in result["message"]


def test_a_process_that_raises_stops_the_others_with_its_reason(three_processes):
    results = outcomes(three_processes, "failing")
    assert len(results) == 3
    assert results[1] == {"outcome": "InjectedFailure", "message": "injected failure at step 3"}
    for peer in (results[0], results[2]):
        assert peer["outcome"] == "PeerProcessFailed"
        assert peer["message"].startswith("process 1 failed: InjectedFailure: injected failure")
