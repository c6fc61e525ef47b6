"""`training.muon.Muon`: torch.optim.Muon's algorithm, orthogonalising in the dtype that is fast.

Tolerances come from the dtype: on well-conditioned random matrices Newton-Schulz results agree
with an fp64 iteration to a few units of their dtype's machine epsilon (relative Frobenius norm;
measured 2-3 for bf16/fp16, 6-8 for fp32, whose Gram path adds products), so 8 units (64 for
fp32) hold on any BLAS; small singular values amplify rounding by up to a^5 ≈ 484.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hf_deepsae.training.muon import Muon, newton_schulz_gram, orthogonalize

COEFFICIENTS = (3.4445, -4.7750, 2.0315)
SHAPES = [(96, 24), (24, 96), (40, 32), (32, 32)]  # tall and wide (Gram), near-square (direct)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference.double()).norm() / reference.double().norm()).item()


def tolerance(dtype: torch.dtype, units: float = 8) -> float:
    return units * torch.finfo(dtype).eps


def fp64_newton_schulz(matrix: torch.Tensor) -> torch.Tensor:
    return orthogonalize(matrix.double(), torch.float64, COEFFICIENTS, 5, 1e-7)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_orthogonalize_matches_an_fp64_iteration_to_its_dtype(shape, dtype):
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    result = orthogonalize(matrix, dtype, COEFFICIENTS, 5, 1e-7)
    assert result.shape == matrix.shape and result.dtype == dtype
    units = 64 if dtype == torch.float32 else 8  # fp32: the Gram path's extra products
    assert relative_error(result, fp64_newton_schulz(matrix)) < tolerance(dtype, units)


def test_bf16_orthogonalisation_is_torchs_own():
    from torch.optim._muon import _zeropower_via_newtonschulz

    matrix = torch.randn(96, 24, generator=torch.Generator().manual_seed(0))
    expected = _zeropower_via_newtonschulz(matrix, COEFFICIENTS, 5, 1e-7)
    assert torch.equal(orthogonalize(matrix, torch.bfloat16, COEFFICIENTS, 5, 1e-7), expected)


def test_gram_formulation_is_the_same_polynomial_on_ill_conditioned_matrices():
    """Singular values 1 … 1e-3: rounding in the small ones grows with the polynomial's slope at
    zero, a^5 ≈ 484 (torch's bf16 iteration is off by 0.11 here)."""
    generator = torch.Generator().manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(128, 32, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(32, 32, generator=generator, dtype=torch.float64))
    matrix = ((left * torch.logspace(0, -3, 32, dtype=torch.float64)) @ right.T).float()
    gram = newton_schulz_gram(matrix, COEFFICIENTS, 5, 1e-7)
    slope_at_zero = COEFFICIENTS[0] ** 5
    assert relative_error(gram, fp64_newton_schulz(matrix)) < tolerance(torch.float32,
                                                                        8 * slope_at_zero)


def make_parameters(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=generator)) for shape in SHAPES]


def run_steps(optimizer_class, params, steps: int = 3, **kwargs) -> torch.optim.Optimizer:
    optimizer = optimizer_class(params, **kwargs)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()
    return optimizer


SETTINGS = [
    {"lr": 0.02, "adjust_lr_fn": "match_rms_adamw"},
    {"lr": 0.02, "weight_decay": 0.1, "nesterov": False},
    {"lr": 0.01, "momentum": 0.9, "adjust_lr_fn": "original"},
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_bf16_muon_steps_exactly_as_torch_optim_muon(settings):
    ours, theirs = make_parameters(), make_parameters()
    run_steps(Muon, ours, orthogonalization_dtype="bfloat16", **settings)
    run_steps(torch.optim.Muon, theirs, **settings)
    for mine, reference in zip(ours, theirs, strict=True):
        assert torch.equal(mine, reference)


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_other_dtypes_step_as_torch_optim_muon_to_bf16_precision(settings, dtype):
    initial, ours, theirs = make_parameters(), make_parameters(), make_parameters()
    run_steps(Muon, ours, orthogonalization_dtype=dtype, **settings)
    run_steps(torch.optim.Muon, theirs, **settings)
    for start, mine, reference in zip(initial, ours, theirs, strict=True):
        assert relative_error(mine - start, reference - start) < tolerance(torch.bfloat16)


def test_state_dicts_move_between_torch_optim_muon_and_muon():
    reference = make_parameters()
    torch_muon = run_steps(torch.optim.Muon, reference, lr=0.02)
    params = [torch.nn.Parameter(p.detach().clone()) for p in reference]
    ours = Muon(params, lr=0.02, orthogonalization_dtype="bfloat16")
    ours.load_state_dict(copy.deepcopy(torch_muon.state_dict()))
    assert ours.state_dict()["param_groups"] == torch_muon.state_dict()["param_groups"]
    for optimizer, group in ((torch_muon, reference), (ours, params)):
        for param in group:
            param.grad = torch.ones_like(param)
        optimizer.step()
    for mine, theirs in zip(params, reference, strict=True):
        assert torch.equal(mine, theirs)
    torch.optim.Muon(reference, lr=0.02).load_state_dict(ours.state_dict())


def test_auto_asks_the_precision_policy(bf16_is_fast):
    optimizer = Muon(make_parameters(), lr=0.02)
    expected = torch.bfloat16 if bf16_is_fast else torch.float32
    assert all(optimizer.dtype_for(p) == expected for p in optimizer.param_groups[0]["params"])


def test_parameters_without_gradient_are_left_alone():
    params = make_parameters()
    before = params[1].detach().clone()
    optimizer = Muon(params, lr=0.02, orthogonalization_dtype="float32")
    params[0].grad = torch.ones_like(params[0])
    optimizer.step()
    assert torch.equal(params[1], before) and not torch.equal(params[0], make_parameters()[0])


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="orthogonalization_dtype='int8': choose auto, float32"):
        Muon(make_parameters(), orthogonalization_dtype="int8")
