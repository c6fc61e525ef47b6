"""DeepSAEModel: every architecture's shapes, sparsity, kernels, training signal and checkpoints."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from hf_deepsae import DeepSAEConfig, DeepSAEModel
from hf_deepsae.sparsity import gather_linear, sparse_decode

D_IN = 32
FLOAT32_EPS = torch.finfo(torch.float32).eps
ARCHITECTURES = {
    "topk": {},
    "batchtopk": {"sparsity": "batchtopk"},
    "jumprelu": {"sparsity": "jumprelu"},
    "relu": {"sparsity": "relu"},
    "mlp-encoder": {"encoder_hidden": [64]},
    "deep": {"encoder_hidden": [64], "decoder_hidden": [48], "layer_norm": True},
    "stacked": {"n_stacked": 3},
    "transcoder": {"transcoder": True, "d_out": 24},
    "normalized": {"normalize_input": True},
    "matryoshka": {"sparsity": "batchtopk", "decoder_hidden": [48],
                   "matryoshka_prefixes": [16, 64]},
}
TOPK_ARCHITECTURES = ["topk", "mlp-encoder", "deep", "stacked", "transcoder", "normalized"]


def make_sae(name: str, **overrides) -> DeepSAEModel:
    torch.manual_seed(0)
    settings = {"d_in": D_IN, "n_latents": 128, "k": 4} | ARCHITECTURES[name] | overrides
    return DeepSAEModel(DeepSAEConfig(**settings))


def inputs_for(sae: DeepSAEModel, *leading: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    inputs = {"x": torch.randn(*leading, sae.config.d_in)}
    if sae.config.transcoder:
        inputs["target"] = torch.randn(*leading, sae.config.d_out)
    return inputs


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("leading", [(7,), (2, 5), (2, 3, 4)])
def test_shapes_for_any_leading_shape(name, leading):
    sae = make_sae(name)
    out = sae(**inputs_for(sae, *leading))
    assert out.reconstruction.shape == (*leading, sae.config.d_out)
    if sae.config.is_topk:
        width = sae.config.n_stacked * sae.config.k
        assert out.latent_acts.shape == out.latent_indices.shape == (*leading, width)
        assert out.latent_indices.dtype == torch.int64
    else:
        assert out.latent_acts.shape == (*leading, sae.config.n_total_latents)
        assert out.latent_indices is None
    for scalar in (out.fvu, out.aux_loss, out.pre_act_std, out.loss):
        assert scalar.shape == () and torch.isfinite(scalar)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_bf16_model_runs_in_bf16(name):
    sae = make_sae(name).to(torch.bfloat16)
    inputs = {key: value.to(torch.bfloat16) for key, value in inputs_for(sae, 6).items()}
    out = sae(**inputs)
    assert out.reconstruction.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in sae.parameters())


@pytest.mark.parametrize("name", ["topk", "mlp-encoder", "deep", "stacked"])
def test_exactly_k_active_latents_per_stage(name):
    sae = make_sae(name)
    dense = sae.encode_dense(torch.randn(50, D_IN) * 3)
    per_stage = dense.view(50, sae.config.n_stacked, -1).ne(0).sum(-1)
    assert per_stage.le(sae.config.k).all()
    assert per_stage.float().mean() > sae.config.k - 0.5  # relu zeros a negative top-k value rarely
    out = sae(torch.randn(50, D_IN))
    assert out.latent_indices.shape[-1] == sae.config.n_stacked * sae.config.k
    stage_of = out.latent_indices // sae.config.n_latents
    for stage in range(sae.config.n_stacked):
        assert stage_of.eq(stage).sum(-1).eq(sae.config.k).all()


def test_batchtopk_selects_k_per_row_on_average_and_learns_a_threshold():
    sae = make_sae("batchtopk")
    out = sae(torch.randn(64, D_IN))
    assert out.latent_acts.ne(0).sum() == 64 * sae.config.k
    threshold = float(sae.stages[0].sparsity.threshold)
    assert threshold > 0
    sae.eval()
    single = torch.randn(1, D_IN)
    batch = torch.cat([single, torch.randn(9, D_IN) * 5])
    # One row and ten take different GEMM kernels on some BLAS: equal up to a D_IN-term dot
    # product's rounding, which no batch statistic would stay within.
    torch.testing.assert_close(sae.encode_dense(single)[0], sae.encode_dense(batch)[0],
                               rtol=D_IN * FLOAT32_EPS, atol=D_IN * FLOAT32_EPS)
    active = sae.encode_dense(single)
    assert (active[active > 0] > threshold).all()


@pytest.mark.parametrize("name", TOPK_ARCHITECTURES)
def test_sparse_decode_equals_dense_reference(name):
    sae = make_sae(name)
    inputs = inputs_for(sae, 9)
    latents = sae.encode(inputs["x"])
    dense = sae.densify(*latents)
    torch.testing.assert_close(sae.decode(*latents), sae.decode(dense), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(*latents), sae(**inputs).reconstruction)


def dense_reference_loss(sae: DeepSAEModel, x: torch.Tensor, dead: torch.Tensor, std_weight: float):
    """The textbook single-stage top-k SAE loss with plain autograd through dense tensors."""
    stage, config = sae.stages[0], sae.config
    hidden = stage.encoder_mlp(x - stage.b_dec)
    pre = stage.encoder(hidden)
    values, indices = pre.topk(config.k)
    z = torch.zeros_like(pre).scatter(-1, indices, F.relu(values))
    recon = stage.decode(z, None)
    error = recon - x

    def variance(values):
        return (values - values.mean(0)).pow(2).sum()

    fvu = error.pow(2).sum() / variance(x)
    aux_values, aux_indices = pre.masked_fill(~dead, -torch.inf).topk(config.k_aux)
    z_aux = torch.zeros_like(pre).scatter(-1, aux_indices, F.relu(aux_values))
    residual = error.detach()
    aux = min(int(dead.sum()) / config.k_aux, 1.0) * (
        stage.decode(z_aux, None) - stage.decode(torch.zeros_like(z_aux), None) - residual
    ).pow(2).sum() / variance(residual)
    return fvu + config.auxk_coefficient * aux + std_weight * pre.std(-1).mean()


@pytest.mark.parametrize("name", ["topk", "mlp-encoder", "deep"])
def test_sparse_gradients_match_dense_reference(name):
    sae = make_sae(name, k_aux=8)
    x = torch.randn(16, D_IN)
    dead = torch.zeros(sae.config.n_latents, dtype=torch.bool)
    dead[::3] = True
    sae(x, dead_mask=dead, std_coefficient=0.1).loss.backward()
    sparse_grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    dense_reference_loss(sae, x, dead, std_weight=0.1).backward()
    for param_name, param in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[param_name], param.grad, rtol=1e-4, atol=1e-5,
                                   msg=f"gradient of {param_name} differs")


def exact_pre_acts(sae: DeepSAEModel, x: torch.Tensor) -> torch.Tensor:
    stage = sae.stages[0]
    with torch.no_grad():
        return stage.encoder(stage.encoder_mlp(x - stage.b_dec))


@pytest.mark.parametrize("precision", ["bf16 selection", "bf16 autocast"])
def test_a_bf16_choice_of_latents_keeps_their_fp32_values(precision):
    selection = {"topk_selection_dtype": "bfloat16"} if precision == "bf16 selection" else {}
    sae = make_sae("topk", n_latents=512, k=16, **selection)
    x = torch.randn(64, D_IN)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16 autocast"):
        out = sae(x)
    exact = exact_pre_acts(sae, x)
    assert out.latent_acts.dtype == torch.float32
    # The chosen values are recomputed as single dot products (an SDDMM), the reference by a GEMM:
    # equal up to the rounding of a D_IN-term fp32 dot product.
    torch.testing.assert_close(out.latent_acts, F.relu(exact.gather(-1, out.latent_indices)),
                               rtol=D_IN * FLOAT32_EPS, atol=D_IN * FLOAT32_EPS)
    # The bf16 choice differs from the exact top-k only among near-ties at the k-th value.
    kth_largest = exact.topk(16).values[:, -1:]
    assert exact.gather(-1, out.latent_indices).ge(kth_largest - 0.02 * exact.abs().amax()).all()
    chosen = torch.zeros_like(exact).scatter_(-1, out.latent_indices, 1.0)
    exact_choice = torch.zeros_like(exact).scatter_(-1, exact.topk(16).indices, 1.0)
    assert (chosen * exact_choice).sum() / chosen.sum() > 0.9


def test_a_bf16_choice_of_latents_gets_the_exact_fp32_gradient():
    sae = make_sae("topk", topk_selection_dtype="bfloat16")
    x = torch.randn(16, D_IN)
    out = sae(x)
    out.fvu.backward()
    sparse_grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    stage = sae.stages[0]
    pre = stage.encoder(x - stage.b_dec)
    z = torch.zeros_like(pre).scatter(-1, out.latent_indices,
                                      F.relu(pre.gather(-1, out.latent_indices)))
    ((stage.decode(z, None) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).backward()
    for param_name, param in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[param_name], param.grad, rtol=1e-4, atol=1e-6,
                                   msg=f"gradient of {param_name} differs")


def test_pre_activation_workspace_is_reused_scratch_memory():
    sae = make_sae("stacked")
    stage = sae.stages[0]
    x, other = torch.randn(16, D_IN), torch.randn(16, D_IN)
    out = sae(x)
    kept = out.latent_acts.clone()
    first_pre_acts = stage.encode(x)[1]
    assert stage.encode(other)[1].data_ptr() == first_pre_acts.data_ptr()  # same pages each step
    assert torch.equal(out.latent_acts, kept)  # what forward returns never aliases the workspace
    clone = copy.deepcopy(sae)
    assert clone.stages[0].pre_act_workspace._buffer is None
    torch.testing.assert_close(clone(x).reconstruction, out.reconstruction)


def test_sparse_kernels_sum_repeated_indices_like_dense_autograd():
    torch.manual_seed(0)
    n_latents, d = 10, 6
    indices = torch.tensor([[1, 1, 1, 2], [0, 0, 9, 9], [3, 4, 3, 4], [5, 5, 5, 5], [7, 8, 1, 7]])
    one_hot = F.one_hot(indices, n_latents).float()  # [rows, slots, latents]
    linear = torch.nn.Linear(d, n_latents)
    weight = torch.randn(n_latents, d, requires_grad=True)
    h = torch.randn(5, d, requires_grad=True)
    values = gather_linear(h, linear, indices, linear(h).detach())
    decoded = sparse_decode(values, indices, weight)
    decoded.backward(grad := torch.randn_like(decoded))
    sparse = [tensor.grad.clone() for tensor in (h, weight, linear.weight, linear.bias)]
    for tensor in (h, weight, linear.weight, linear.bias):
        tensor.grad = None
    dense_values = torch.einsum("bjn,bn->bj", one_hot, linear(h))
    dense = torch.einsum("bj,bjn,nd->bd", dense_values, one_hot, weight)
    torch.testing.assert_close(decoded, dense)
    dense.backward(grad)
    for name, got, tensor in zip(("h", "W_dec", "encoder weight", "encoder bias"), sparse,
                                 (h, weight, linear.weight, linear.bias), strict=True):
        torch.testing.assert_close(got, tensor.grad, msg=f"gradient of {name} differs")


def test_jumprelu_thresholds_get_gradient_from_l0_penalty():
    sae = make_sae("jumprelu", jumprelu_bandwidth=1.0)
    sae(torch.randn(32, D_IN)).loss.backward()
    grad = sae.stages[0].sparsity.threshold.grad
    assert grad is not None and grad.abs().sum() > 0


def sparse_dataset(n_rows: int = 2048, n_features: int = 96, active: int = 3) -> torch.Tensor:
    """Rows that are sums of `active` random unit directions out of `n_features`."""
    generator = torch.Generator().manual_seed(0)
    dictionary = F.normalize(torch.randn(n_features, D_IN, generator=generator), dim=-1)
    indices = torch.rand(n_rows, n_features, generator=generator).topk(active).indices
    coefficients = torch.rand(n_rows, active, generator=generator) + 0.5
    return (coefficients.unsqueeze(-1) * dictionary[indices]).sum(1)


def train_adam(sae, data: torch.Tensor, steps: int = 300) -> None:
    """Adam on `data` in batches of 128, keeping linear decoder rows at unit norm."""
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for step in range(steps):
        loss = sae(data[(step * 128) % len(data):][:128]).loss
        optimizer.zero_grad()
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        sae.set_decoder_norm_to_unit_norm()
    sae.eval()


@pytest.mark.parametrize("name", [n for n in ARCHITECTURES if n != "transcoder"])
def test_reconstruction_improves_with_training(name):
    sae = make_sae(name, l1_coefficient=1e-4, l0_coefficient=1e-4)
    data = sparse_dataset()
    sae.initialize_from_activations(data)
    with torch.no_grad():
        initial = float(sae(data).fvu)
    train_adam(sae, data)
    with torch.no_grad():
        final = float(sae(data).fvu)
    assert final < 0.5 * initial and final < 0.35, (initial, final)


def test_transcoder_learns_a_linear_map():
    sae = make_sae("transcoder")
    data = sparse_dataset()
    mapping = torch.randn(D_IN, 24, generator=torch.Generator().manual_seed(3)) / D_IN**0.5
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for step in range(300):
        batch = data[(step * 128) % 2048:][:128]
        loss = sae(batch, target=batch @ mapping).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert float(sae(data, target=data @ mapping).fvu) < 0.35


@pytest.mark.parametrize("name", ["topk", "deep", "stacked", "transcoder", "normalized"])
def test_latent_directions_are_what_each_latent_adds_to_the_reconstruction(name):
    sae = make_sae(name, n_stacked=2 if name == "stacked" else 1)
    with torch.no_grad():
        sae.output_scale.fill_(1.7)
        for parameter in sae.parameters():
            parameter.normal_()
    n = sae.config.n_total_latents
    activation = 0.6
    expected = (sae.decode(torch.eye(n) * activation) - sae.decode(torch.zeros(1, n))) / activation
    directions = sae.latent_directions(activation=activation)
    assert directions.shape == (n, sae.config.d_out)
    torch.testing.assert_close(directions, expected, rtol=1e-4, atol=1e-5)
    ids = torch.tensor([n - 1, 0, 5])
    torch.testing.assert_close(sae.latent_directions(ids, activation=activation), directions[ids])


@pytest.mark.parametrize("name", ["deep", "stacked"])
def test_latent_directions_take_one_activation_per_latent(name):
    sae = make_sae(name, n_stacked=2 if name == "stacked" else 1)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_()
    ids, activations = torch.tensor([5, 0, 5]), torch.tensor([0.5, 2.0, 3.0])
    each = torch.stack([sae.latent_directions(i.view(1), activation=float(a))[0]
                        for i, a in zip(ids, activations, strict=True)])
    torch.testing.assert_close(sae.latent_directions(ids, activation=activations), each,
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="finite non-zero number or one per latent"):
        sae.latent_directions(ids, activation=torch.tensor([1.0, 0.0, 1.0]))


def test_latent_directions_of_a_linear_decoder_are_its_rows():
    sae = make_sae("topk")
    torch.testing.assert_close(sae.latent_directions(activation=3.0), sae.W_dec.detach())


def test_latent_directions_reject_ids_out_of_range():
    with pytest.raises(ValueError, match=r"latent ids must lie in \[0, 128\), got \[128\]"):
        make_sae("topk").latent_directions(torch.tensor([3, 128]))


def test_linear_decoder_is_initialised_as_unit_norm_encoder_transpose():
    sae = make_sae("topk")
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))
    torch.testing.assert_close(sae.W_dec, F.normalize(sae.stages[0].encoder.weight, dim=1))


def test_parallel_gradient_is_removed():
    sae = make_sae("topk")
    sae(torch.randn(16, D_IN)).loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    torch.testing.assert_close(parallel, torch.zeros(128), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["deep", "stacked"])
def test_w_dec_exists_only_for_single_stage_linear_decoders(name):
    assert hasattr(make_sae("mlp-encoder"), "W_dec")
    assert not hasattr(make_sae(name), "W_dec")
    assert not hasattr(make_sae(name), "b_dec")


def test_normalization_is_stored_and_applied_after_loading(tmp_path):
    sae = make_sae("normalized")
    data = sparse_dataset() * 40.0
    sae.initialize_from_activations(data)
    expected_scale = D_IN**0.5 / float(data.norm(dim=-1).mean())
    assert float(sae.input_scale) == pytest.approx(expected_scale, rel=1e-4)
    sae.save_pretrained(tmp_path)
    loaded = DeepSAEModel.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(data[:8]).reconstruction, sae(data[:8]).reconstruction)
    assert loaded(data[:8]).reconstruction.norm(dim=-1).mean() > 10  # back in the input's units


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (torch.randn(4, D_IN + 1), ValueError, r"shape \[\.\.\., 32\]"),
        (torch.ones(4, D_IN, dtype=torch.int64), TypeError, "floating point"),
        (torch.full((4, D_IN), float("nan")), ValueError, "NaN or inf"),
        (torch.full((4, D_IN), float("inf")), ValueError, "NaN or inf"),
        ([[0.0] * D_IN], TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_are_rejected(bad, error, message):
    with pytest.raises(error, match=message):
        make_sae("topk")(bad)


def test_nan_check_can_be_switched_off():
    sae = make_sae("topk", check_inputs=False)
    assert torch.isnan(sae(torch.full((4, D_IN), float("nan"))).reconstruction).any()


@pytest.mark.parametrize("overrides", [{}, {"skip_connection": True},
                                       {"matryoshka_prefixes": [16]}, {"sparsity": "batchtopk"}])
def test_a_transcoder_without_a_target_predicts_and_leaves_the_scores_none(overrides):
    sae = make_sae("transcoder", **overrides).eval()
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    inputs = inputs_for(sae, 2, 5)
    scored, predicted = sae(**inputs), sae(inputs["x"])
    assert torch.equal(predicted.reconstruction, scored.reconstruction)
    assert torch.equal(predicted.latent_acts, scored.latent_acts)
    assert torch.equal(predicted.pre_act_std, scored.pre_act_std)
    assert scored.loss is not None
    for field in ("fvu", "matryoshka_fvu", "aux_loss", "loss"):
        assert getattr(predicted, field) is None, field


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_save_and_automodel_round_trip(name, tmp_path):
    sae = make_sae(name)
    sae.train()
    sae(**inputs_for(sae, 32))  # batchtopk learns its threshold while training
    sae.eval()
    sae.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "modeling_deepsae.py", "configuration_deepsae.py",
            "sparsity.py", "matryoshka.py"} <= set(os.listdir(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModel"] == (
        "modeling_deepsae.DeepSAEModel")
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, DeepSAEModel)
    inputs = inputs_for(sae, 5)
    assert torch.equal(loaded(**inputs).reconstruction, sae(**inputs).reconstruction)
    for key, value in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_trust_remote_code_loads_without_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DEEPSAE_FAST_BF16", "0")  # both processes choose latents alike
    sae = make_sae("deep")
    sae.save_pretrained(tmp_path / "sae")
    x = torch.randn(3, D_IN)
    torch.save({"x": x, "y": sae(x).reconstruction.detach()}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path = [p for p in sys.path if p not in ('', {os.getcwd()!r})]
        import importlib.util
        assert importlib.util.find_spec('hf_deepsae') is None or True
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / 'sae')!r}, trust_remote_code=True)
        assert 'hf_deepsae' not in sys.modules, 'hf_deepsae was imported'
        io = torch.load({str(tmp_path / 'io.pt')!r})
        assert torch.equal(model(io['x']).reconstruction, io['y'])
        print(type(model).__module__)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("transformers_modules.")


def test_truncated_checkpoint_fails_clearly(tmp_path):
    make_sae("topk").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        DeepSAEModel.from_pretrained(tmp_path)


def test_checkpoint_whose_shapes_do_not_match_its_config_fails(tmp_path):
    make_sae("topk").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_latents"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="don't match its config.*size mismatch"):
        DeepSAEModel.from_pretrained(tmp_path)


def test_checkpoint_missing_weights_fails(tmp_path):
    make_sae("topk").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["sparsity"] = "jumprelu"  # expects a threshold the checkpoint lacks
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="don't match its config.*sparsity.threshold"):
        DeepSAEModel.from_pretrained(tmp_path)
