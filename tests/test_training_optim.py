"""Optimizer construction, learning-rate schedules and the std-penalty schedule."""

from __future__ import annotations

import math

import pytest
import torch

from hf_deepsae import DeepSAEConfig, DeepSAEModel
from hf_deepsae.training import (
    TrainingConfig,
    build_optimizers,
    build_scheduler,
    default_lr,
    std_coefficient_at,
    update_sae,
)
from hf_deepsae.training.config import MUON_LR_SCALE


def deep_sae() -> DeepSAEModel:
    return DeepSAEModel(DeepSAEConfig(d_in=8, n_latents=16, k=2, encoder_hidden=[8],
                                      decoder_hidden=[8], layer_norm=True))


def test_default_lr_scales_with_inverse_sqrt_width():
    assert default_lr(2**14) == pytest.approx(2e-4)
    assert default_lr(2**16) == pytest.approx(1e-4)
    assert TrainingConfig(optimizer="adam").resolved_lr(2**12) == pytest.approx(4e-4)
    muon_lr = TrainingConfig(optimizer="muon").resolved_lr(2**12)
    assert muon_lr == pytest.approx(4e-4 * MUON_LR_SCALE)
    assert TrainingConfig(lr=1e-3).resolved_lr(2**12) == 1e-3


def test_muon_takes_the_matrices_and_adamw_the_rest():
    sae = deep_sae()
    muon, adamw = build_optimizers(sae, TrainingConfig(optimizer="muon"), lr=1e-3)
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    muon_params = {id(p) for group in muon.param_groups for p in group["params"]}
    adamw_params = {id(p) for group in adamw.param_groups for p in group["params"]}
    for name, param in sae.named_parameters():
        assert (id(param) in muon_params) == (param.ndim == 2), name
        assert (id(param) in adamw_params) == (param.ndim != 2), name


@pytest.mark.parametrize(("name", "kind"), [("adam", torch.optim.Adam),
                                            ("adamw", torch.optim.AdamW)])
def test_adam_variants_are_one_optimizer_over_everything(name, kind):
    sae = deep_sae()
    (optimizer,) = build_optimizers(sae, TrainingConfig(optimizer=name), lr=1e-3)
    assert type(optimizer) is kind
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(sae.parameters()))
    assert optimizer.defaults["fused"]  # one kernel per parameter on CPU


def test_update_sae_keeps_unit_decoder_rows_and_clips():
    torch.manual_seed(0)
    sae = DeepSAEModel(DeepSAEConfig(d_in=8, n_latents=16, k=2))
    (optimizer,) = build_optimizers(sae, TrainingConfig(optimizer="adam"), lr=0.1)
    (sae(torch.randn(32, 8) * 100).loss * 1e6).backward()
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    norms = []
    update_sae(sae, [optimizer], max_grad_norm=1.0,
               clip_grad_norm=lambda params, max_norm: norms.append(
                   torch.nn.utils.clip_grad_norm_(list(params), max_norm)))
    assert norms and norms[0] > 1.0  # clipping saw the large gradient
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16))
    assert all(p.grad is None for p in sae.parameters())
    assert not torch.equal(before["stages.0.encoder.weight"], sae.stages[0].encoder.weight)


def lrs(scheduler_type: str, steps: int = 100, warmup_ratio: float = 0.1) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    config = TrainingConfig(lr_scheduler_type=scheduler_type, warmup_ratio=warmup_ratio)
    scheduler = build_scheduler(optimizer, config, num_steps=steps)
    values = []
    for _ in range(steps):
        values.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return values


def test_linear_schedule_warms_up_then_decays_to_zero():
    values = lrs("linear")
    assert values[0] == 0.0 and values[10] == pytest.approx(1.0)
    assert values[5] == pytest.approx(0.5)
    assert values[55] == pytest.approx(0.5)
    assert values[-1] == pytest.approx(1 / 90)


def test_cosine_schedule_is_half_way_at_the_middle_of_the_decay():
    values = lrs("cosine")
    assert values[10] == pytest.approx(1.0) and values[55] == pytest.approx(0.5)


def test_warmup_stable_decay_holds_then_decays_over_the_last_fifth():
    values = lrs("warmup_stable_decay")
    assert values[10] == values[79] == pytest.approx(1.0)
    assert values[90] < 1.0 and values[-1] < 0.05


@pytest.mark.parametrize(("schedule", "expected"), [
    ("constant", [0.2, 0.2, 0.2]), ("linear", [0.2, 0.1, 0.0]), ("cosine", [0.2, 0.1, 0.0])])
def test_std_coefficient_schedules(schedule, expected):
    values = [std_coefficient_at(0.2, schedule, step, num_steps=10) for step in (0, 5, 10)]
    assert values == pytest.approx(expected, abs=1e-12)


def test_unknown_std_schedule_is_refused():
    with pytest.raises(ValueError, match="constant, linear or cosine"):
        std_coefficient_at(0.1, "exponential", 0, 10)
    assert math.isfinite(std_coefficient_at(0.1, "linear", 20, 10))
