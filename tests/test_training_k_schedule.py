"""The k schedule: k annealed from a larger value down to the SAE's k, for every top-k SAE."""

from __future__ import annotations

import pytest
import torch
from test_training_e2e import HOOKPOINT, TINY_SAE, tiny_config

from hf_deepsae import DeepSAEConfig, DeepSAEModel
from hf_deepsae.training import parse_args, train
from hf_deepsae.training import trainer as trainer_module
from hf_deepsae.training.k_schedule import KSchedule, active_k

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_k_falls_linearly_to_the_saes_k_and_stays():
    schedule = KSchedule(start_k=16, k=4, anneal_steps=4)
    assert [schedule.at(step) for step in range(7)] == [16, 13, 10, 7, 4, 4, 4]
    assert [KSchedule(4, 4, 0).at(step) for step in range(3)] == [4, 4, 4]


def test_the_default_start_is_four_k_capped_at_the_latents(tiny_lm, tmp_path):
    config = tiny_config(tiny_lm, tmp_path, k_anneal_steps=5)
    assert KSchedule.of(config, DeepSAEConfig(d_in=32, expansion_factor=2, k=4)).start_k == 16
    assert KSchedule.of(config, DeepSAEConfig(d_in=32, expansion_factor=2, k=32)).start_k == 64
    with pytest.raises(ValueError, match="k_anneal_start=128 must lie between"):
        KSchedule.of(tiny_config(tiny_lm, tmp_path, k_anneal_steps=5, k_anneal_start=128),
                     DeepSAEConfig(d_in=32, expansion_factor=2, k=4))


def test_active_k_restores_the_saes_k_even_on_error():
    config = DeepSAEConfig(d_in=8, expansion_factor=2, k=2)
    with pytest.raises(RuntimeError), active_k(config, 6):
        assert config.k == 6
        raise RuntimeError
    assert config.k == 2


def record_k(monkeypatch) -> list[int]:
    """The k of every training forward (the SAE in train mode), in order."""
    seen: list[int] = []
    real_forward = DeepSAEModel.forward

    def recording_forward(self, *args, **kwargs):
        if self.training:
            seen.append(self.config.k)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(DeepSAEModel, "forward", recording_forward)
    return seen


@pytest.mark.parametrize("sae", [
    {**TINY_SAE, "encoder_hidden": [], "decoder_hidden": []},
    TINY_SAE,
    {**TINY_SAE, "n_stacked": 2},
    {**TINY_SAE, "sparsity": "batchtopk"},
    {**TINY_SAE, "transcoder": True},
], ids=["shallow", "deep", "stacked", "batchtopk", "transcoder"])
def test_every_top_k_sae_trains_with_the_annealed_k_and_keeps_its_own(tiny_lm, tmp_path,
                                                                       monkeypatch, sae):
    seen = record_k(monkeypatch)
    saes = train(tiny_config(tiny_lm, tmp_path, k_anneal_steps=6, k_anneal_start=16), sae)
    assert seen == [16, 14, 12, 10, 8, 6, 4, 4, 4, 4, 4, 4]
    trained = saes[HOOKPOINT]
    record = trained.config.training_config
    assert trained.config.k == 4 and (record["k_anneal_steps"], record["k_anneal_start"]) == (6, 16)
    if trained.config.sparsity == "topk":  # after training, the SAE selects its own k again
        latents = trained.encode(torch.randn(3, 32))
        assert latents.latent_indices.shape[-1] == 4 * trained.config.n_stacked


def test_the_l0_logged_follows_the_schedule(tiny_lm, tmp_path):
    from test_training_e2e import tensorboard_scalars

    train(tiny_config(tiny_lm, tmp_path, k_anneal_steps=8, k_anneal_start=16, logging_steps=4,
                      log_with="tensorboard"), TINY_SAE)
    schedule = KSchedule(start_k=16, k=4, anneal_steps=8)
    windows = [[schedule.at(step) for step in range(start, start + 4)] for start in (0, 4, 8)]
    assert tensorboard_scalars(tmp_path, "layer_1/l0") == [sum(ks) / 4 for ks in windows]


def test_a_start_beyond_the_latents_fails_before_reading_data(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "activation_source", None)  # reached: a TypeError
    with pytest.raises(ValueError, match="k_anneal_start=100 must lie between"):
        train(tiny_config(tiny_lm, tmp_path, k_anneal_steps=4, k_anneal_start=100), TINY_SAE)


def test_annealing_an_sae_without_k_fails_before_training(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="--k_anneal_steps anneals k"):
        train(tiny_config(tiny_lm, tmp_path, k_anneal_steps=4), {**TINY_SAE, "sparsity": "relu"})


def test_the_k_anneal_flags_parse():
    config, _ = parse_args(["--k_anneal_steps", "100", "--k_anneal_start", "64"])
    assert (config.k_anneal_steps, config.k_anneal_start) == (100, 64)
    with pytest.raises(ValueError, match="k_anneal_steps=-1"):
        parse_args(["--k_anneal_steps", "-1"])
