"""The ready-made scaling configs in `examples/configs/` load, and the base model can be spread
over devices with a `device_map`."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from test_activations import make_tiny_lm, write_corpus

from hf_deepsae.activations import load_language_model
from hf_deepsae.training import parse_args

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"


@pytest.mark.parametrize(("name", "processes", "machines", "kind"), [
    ("single_gpu.yaml", 1, 1, DistributedType.NO),
    ("8gpu_ddp.yaml", 8, 1, DistributedType.MULTI_GPU),
    ("8gpu_latent_sharded.yaml", 8, 1, DistributedType.MULTI_GPU),
    ("2node_8gpu.yaml", 16, 2, DistributedType.MULTI_GPU),
])
def test_the_accelerate_configs_load_with_their_process_counts(name, processes, machines, kind):
    config = load_config_from_file(str(CONFIGS / name))
    assert (config.num_processes, config.num_machines, config.distributed_type) == \
        (processes, machines, kind)
    assert config.mixed_precision in ("bf16", "no")


def test_the_latent_sharded_training_config_parses_into_a_sharded_run():
    training, sae = parse_args([str(CONFIGS / "train_latent_sharded.yaml"), "--k", "64"])
    assert training.shard_latents and not training.distribute_hookpoints
    assert sae.n_latents == 2**20 and sae.k == 64 and sae.encoder_hidden == []


def test_a_device_map_places_the_language_model_instead_of_the_device(tmp_path):
    model_dir = make_tiny_lm(tmp_path, write_corpus(tmp_path))
    model, _ = load_language_model(str(model_dir), device="meta", device_map="auto")
    assert {parameter.device.type for parameter in model.parameters()} == {"cpu"}
    assert not any(parameter.requires_grad for parameter in model.parameters())


@pytest.mark.parametrize(("flags", "message"), [
    (["--shard_latents", "--distribute_hookpoints"], "exclude each other"),
    (["--ddp_timeout", "0"], "must be a positive number of seconds"),
])
def test_contradictory_scaling_flags_fail_at_once(flags, message):
    with pytest.raises(ValueError, match=message):
        parse_args(flags)
