"""The training losses the trainer relies on (AuxK, the std penalty) and dead-latent counting."""

from __future__ import annotations

import pytest
import torch

from hf_deepsae import DeepSAEConfig, DeepSAEModel
from hf_deepsae.pre_activation_std import mean_row_std
from hf_deepsae.training import DeadLatentCounter


def small_sae(**overrides) -> DeepSAEModel:
    torch.manual_seed(0)
    config = dict(d_in=4, n_latents=6, k=1, k_aux=1, auxk_coefficient=1.0)
    return DeepSAEModel(DeepSAEConfig(**{**config, **overrides}))


@torch.no_grad()
def set_identity_like_weights(sae: DeepSAEModel) -> None:
    """Latent i reads and writes direction i mod 4 (latents 4, 5 duplicate 0, 1 at lower gain)."""
    stage = sae.stages[0]
    directions = torch.eye(4)[[0, 1, 2, 3, 0, 1]]
    stage.encoder.weight.copy_(directions * torch.tensor([1, 1, 1, 1, 0.5, 0.25])[:, None])
    stage.encoder.bias.zero_()
    stage.W_dec.copy_(directions)
    stage.b_dec.zero_()


def test_auxk_loss_on_a_constructed_case():
    sae = small_sae()
    set_identity_like_weights(sae)
    x = torch.tensor([[4.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    dead = torch.tensor([False, False, False, False, True, True])
    out = sae(x, dead_mask=dead)
    # k=1 keeps latent 0 (row 0) and latent 3 (row 1): the residual error is [0, -2, 0, 0] and 0.
    error = torch.tensor([[0.0, -2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(out.reconstruction - x, error)
    # The best dead latent of row 0 is latent 4 (pre-act 0.5·4 = 2 > 0.25·2), decoding 2·e0;
    # row 1 has no positive dead pre-activation. AuxK = ‖aux - error‖² / total variance of error.
    aux = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    total_variance = (error - error.mean(0)).pow(2).sum()
    expected = (aux - error).pow(2).sum() / total_variance
    torch.testing.assert_close(out.aux_loss, expected)
    torch.testing.assert_close(out.loss, out.fvu + out.aux_loss)


def test_auxk_loss_is_zero_without_dead_latents():
    sae = small_sae()
    out = sae(torch.randn(8, 4), dead_mask=torch.zeros(6, dtype=torch.bool))
    assert out.aux_loss.item() == 0.0


def test_auxk_gradient_reaches_only_dead_latents_encoder_rows():
    sae = small_sae(auxk_coefficient=1.0)
    set_identity_like_weights(sae)
    x = torch.tensor([[4.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    dead = torch.tensor([False, False, False, False, True, True])
    sae(x, dead_mask=dead).aux_loss.backward()
    grad_rows = sae.stages[0].encoder.weight.grad.abs().sum(-1)
    assert grad_rows[4] > 0 and (grad_rows[:4] == 0).all()


def direct_pre_act_std(sae: DeepSAEModel, x: torch.Tensor) -> torch.Tensor:
    """The definition: std across latents of `encoder(x - b_dec)`, averaged over rows."""
    stage = sae.stages[0]
    return stage.encoder(stage.encoder_mlp(x - stage.b_dec)).std(dim=-1).mean()


@pytest.mark.parametrize("encoder_hidden", [[], [8]])
def test_std_penalty_value_and_gradient_match_the_definition(encoder_hidden):
    sae = small_sae(k=2, encoder_hidden=encoder_hidden, std_coefficient=0.5)
    x = torch.randn(16, 4)
    out = sae(x)
    expected = direct_pre_act_std(sae, x)
    torch.testing.assert_close(out.pre_act_std, expected)
    torch.testing.assert_close(out.loss, out.fvu + 0.5 * expected)

    weight = sae.stages[0].encoder.weight
    (grad_model,) = torch.autograd.grad(out.pre_act_std, weight)
    (grad_direct,) = torch.autograd.grad(direct_pre_act_std(sae, x), weight)
    torch.testing.assert_close(grad_model, grad_direct, rtol=1e-4, atol=1e-6)


def test_logged_std_without_penalty_matches_the_definition():
    sae = small_sae(k=2, n_latents=300)
    x = torch.randn(16, 4)
    out = sae(x)
    torch.testing.assert_close(out.pre_act_std, direct_pre_act_std(sae, x))
    assert not out.pre_act_std.requires_grad


@pytest.mark.parametrize(("dtype", "mean", "rtol"), [
    (torch.float32, -0.3, 1e-5),    # SAE-like: |row mean| of the order of the std
    (torch.bfloat16, 0.5, 1e-4),
    (torch.float32, 3e3, 1e-5),     # mean ≫ std: raw moments would cancel, torch.std takes over
])
def test_mean_row_std_matches_torch_std(dtype, mean, rtol):
    torch.manual_seed(0)
    values = (torch.randn(300, 2, 1000) * torch.rand(300, 2, 1) + mean).to(dtype)
    expected = values.double().std(-1).mean().float()
    torch.testing.assert_close(mean_row_std(values), expected, rtol=rtol, atol=0)


def test_std_coefficient_argument_overrides_the_config_for_schedules():
    sae = small_sae(k=2, std_coefficient=0.5)
    x = torch.randn(16, 4)
    out = sae(x, std_coefficient=0.0)
    torch.testing.assert_close(out.loss, out.fvu)


def test_dead_counter_counts_tokens_since_each_latent_fired():
    counter = DeadLatentCounter(n_latents=4, threshold=10)
    acts = torch.tensor([[1.0, 2.0], [0.5, 0.0]])  # latent 3's value 0 does not count as firing
    counter.update(acts, torch.tensor([[0, 1], [0, 3]]), n_tokens=6)
    assert counter.tokens_since_fired.tolist() == [0, 0, 6, 6]
    counter.update(torch.tensor([[1.0]]), torch.tensor([[2]]), n_tokens=6)
    assert counter.tokens_since_fired.tolist() == [6, 6, 0, 12]
    assert counter.dead_mask.tolist() == [False, False, False, True]
    assert counter.dead_fraction() == 0.25


def test_dead_counter_takes_dense_latents_and_a_cross_process_reduction():
    counter = DeadLatentCounter(n_latents=3, threshold=1)
    other_process_fired = torch.tensor([0, 0, 1], dtype=torch.int32)
    counter.update(torch.tensor([[0.0, 2.0, 0.0]]), None, n_tokens=2,
                   reduce=lambda fired: fired + other_process_fired)
    assert counter.tokens_since_fired.tolist() == [2, 0, 0]


def test_dead_counter_state_round_trips():
    counter = DeadLatentCounter(n_latents=3, threshold=5)
    counter.update(torch.tensor([[1.0]]), torch.tensor([[1]]), n_tokens=7)
    restored = DeadLatentCounter(n_latents=3, threshold=5)
    restored.load_state_dict(counter.state_dict())
    assert torch.equal(restored.tokens_since_fired, counter.tokens_since_fired)
