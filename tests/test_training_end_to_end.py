"""End-to-end training on the model's KL (`--loss kl`, `fvu+kl`): the objective on tiny models,
then `train` with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_splice import make_sae
from test_training_e2e import HOOKPOINT, TINY_SAE, tensorboard_scalars, tiny_config
from tiny_models import tiny_input_ids, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_deepsae import DeepSAEConfig, DeepSAEModel, splice
from hf_deepsae.sites import sae_sites
from hf_deepsae.splice import capture_activations
from hf_deepsae.training import TrainingConfig, train
from hf_deepsae.training import trainer as trainer_module
from hf_deepsae.training.end_to_end import (
    check_end_to_end_model,
    end_to_end_forward,
    objective,
    spliced_saes,
)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def sensitive_model(model_type: str = "llama") -> torch.nn.Module:
    """A tiny random model whose next-token distribution depends strongly on its MLPs: a random
    model's near-uniform logits would hide what an SAE changes."""
    model = tiny_model(model_type).requires_grad_(False)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(10)
    return model


def random_sae(model: torch.nn.Module, layer: int, input_ids: torch.Tensor, **config
               ) -> DeepSAEModel:
    """A fresh top-k SAE at `layer`'s MLP output, initialised from the model's activations."""
    torch.manual_seed(layer)
    sae = DeepSAEModel(DeepSAEConfig(d_in=32, expansion_factor=4, k=4, layer=layer, **config))
    read, write = sae_sites(model, sae.config)
    captured = capture_activations(model, input_ids, [read, write])
    sae.initialize_from_activations(captured[read].reshape(-1, 32), captured[write].reshape(
        -1, 32) if sae.config.transcoder else None)
    return sae


def direct_kl(model: torch.nn.Module, saes: dict, input_ids: torch.Tensor,
              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(clean ‖ spliced) per kept token, from `splice` and `F.kl_div`: the definition."""
    with torch.no_grad():
        clean = model(input_ids=input_ids, attention_mask=attention_mask).logits
        with splice(model, saes):
            spliced = model(input_ids=input_ids, attention_mask=attention_mask).logits
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None \
        else attention_mask.bool()
    return F.kl_div(spliced[keep].log_softmax(-1), clean[keep].log_softmax(-1), log_target=True,
                    reduction="batchmean")


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox"])
def test_an_exact_sae_spliced_in_leaves_the_kl_at_zero(model_type):
    model = tiny_model(model_type).requires_grad_(False)
    layers = [0, 1]
    saes = {layer: make_sae("exact", layer=layer) for layer in layers}
    output = end_to_end_forward(model, spliced_saes(model, saes), tiny_input_ids(),
                                downstream_from_layer=0)
    assert output.kl.abs() < 1e-6
    assert output.downstream_fvu.abs() < 1e-10
    assert all(out.fvu < 1e-10 for out in output.sae_outputs.values())


@pytest.mark.parametrize("case", ["one SAE", "two SAEs", "transcoder", "padding"])
def test_the_kl_loss_is_the_kl_of_the_log_softmaxes_of_clean_and_spliced_logits(case):
    model, input_ids = sensitive_model(), tiny_input_ids(batch_size=3, seq_len=10)
    attention_mask = None
    if case == "padding":
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, 6:] = 0
    config = {"transcoder": True} if case == "transcoder" else {}
    layers = [0, 1] if case == "two SAEs" else [1]
    saes = {layer: random_sae(model, layer, input_ids, **config) for layer in layers}
    with torch.no_grad():
        output = end_to_end_forward(model, spliced_saes(model, saes), input_ids, attention_mask)
    expected = direct_kl(model, saes, input_ids, attention_mask)
    assert expected > 1e-3  # the SAEs change the distribution: the comparison means something
    torch.testing.assert_close(output.kl, expected, rtol=1e-5, atol=1e-7)


def test_gradients_reach_the_sae_parameters_only():
    model, input_ids = sensitive_model(), tiny_input_ids()
    saes = {layer: random_sae(model, layer, input_ids) for layer in (0, 1)}
    output = end_to_end_forward(model, spliced_saes(model, saes), input_ids,
                                downstream_from_layer=0)
    config = TrainingConfig(loss="kl", downstream_coefficient=1.0)
    objective(output, config).backward()
    assert all(parameter.grad is None for parameter in model.parameters())
    for sae in saes.values():
        assert sae.stages[0].encoder.weight.grad.abs().sum() > 0
        assert sae.stages[0].W_dec.grad.abs().sum() > 0


def test_a_model_that_would_train_too_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="freeze it with model.requires_grad_"):
        end_to_end_forward(model, spliced_saes(model, {1: make_sae("exact", layer=1)}),
                           tiny_input_ids())


def test_the_earlier_sae_learns_from_the_later_sites_kl_too():
    """End to end means through the later SAE: the KL's gradient reaches the first one."""
    model, input_ids = sensitive_model(), tiny_input_ids()
    saes = {layer: random_sae(model, layer, input_ids) for layer in (0, 1)}
    output = end_to_end_forward(model, spliced_saes(model, saes), input_ids)
    output.sae_outputs[0].reconstruction.retain_grad()
    output.kl.backward()
    assert output.sae_outputs[0].reconstruction.grad.abs().sum() > 0


@pytest.mark.parametrize("loss", ["kl", "fvu+kl"])
def test_the_objective_adds_the_saes_own_terms_as_documented(loss):
    model, input_ids = sensitive_model(), tiny_input_ids()
    saes = {1: random_sae(model, 1, input_ids)}
    output = end_to_end_forward(model, spliced_saes(model, saes), input_ids,
                                downstream_from_layer=1)
    config = TrainingConfig(loss=loss, kl_coefficient=2.0, downstream_coefficient=0.5)
    out = output.sae_outputs[1]
    own = out.loss if loss == "fvu+kl" else out.loss - out.fvu
    torch.testing.assert_close(objective(output, config),
                               own + 2.0 * output.kl + 0.5 * output.downstream_fvu)


def test_a_short_fine_tune_lowers_the_spliced_kl():
    model = sensitive_model()
    batches = [tiny_input_ids(batch_size=8, seq_len=16, seed=seed) for seed in range(1, 9)]
    held_out = tiny_input_ids(batch_size=8, seq_len=16, seed=20)
    sae = random_sae(model, 1, batches[0])
    rows = capture_activations(model, torch.cat(batches), [1])[1].reshape(-1, 32)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(20):  # a rough FVU-trained SAE first: the usual starting point of a fine-tune
        sae(rows).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    before = direct_kl(model, {1: sae}, held_out)
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for step in range(48):
        output = end_to_end_forward(model, spliced_saes(model, {1: sae}), batches[step % 8])
        objective(output, TrainingConfig(loss="kl")).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = direct_kl(model, {1: sae}, held_out)
    assert after < 0.8 * before, (before, after)


# `train` with an end-to-end loss.


@pytest.fixture(scope="module")
def sensitive_lm(tiny_lm, tmp_path_factory) -> tuple[Path, Path]:
    """`tiny_lm` saved again with `sensitive_model`'s sharper logits and stronger MLPs."""
    model_dir, corpus = tiny_lm
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(30)  # the logits (wte is tied to the input too)
        for block in model.transformer.h:
            block.mlp.c_proj.weight.mul_(10)
    folder = tmp_path_factory.mktemp("sensitive_lm")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    return folder, corpus


def test_kl_training_lowers_the_kl_records_its_loss_and_leaves_the_model_unchanged(
        sensitive_lm, tmp_path, monkeypatch, capsys):
    loaded = []

    def keep_model(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        loaded.append((model, {name: value.clone() for name, value in
                               model.state_dict().items()}))
        return model, tokenizer

    load = trainer_module.load_language_model
    monkeypatch.setattr(trainer_module, "load_language_model", keep_model)
    config = tiny_config(sensitive_lm, tmp_path, loss="kl", total_tokens=128 * 24, lr=1e-2,
                         log_with="tensorboard", activation_cache_dir=str(tmp_path / "cache"))
    saes = train(config, TINY_SAE)

    assert "the activation cache" in capsys.readouterr().out and not (tmp_path / "cache").exists()
    kl = tensorboard_scalars(tmp_path, "layer_1/kl")
    assert len(kl) == 6 and kl[-1] < 0.9 * kl[0], kl
    sae = saes[HOOKPOINT]
    assert sae.config.training_config["loss"] == "kl"
    assert sae.config.training_config["kl_coefficient"] == 1.0
    assert sae.config.metrics["train_tokens"] == 128 * 24
    assert {"fvu", "l0", "dead_fraction", "kl_spliced", "ce_loss_score"} <= set(sae.config.metrics)
    (model, weights), = loaded
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name


@pytest.mark.parametrize(("overrides", "sae"), [
    ({"loss": "fvu+kl", "layers": [0, 1], "downstream_coefficient": 0.5}, TINY_SAE),
    ({"loss": "kl", "gradient_accumulation_steps": 2}, TINY_SAE),
    ({"loss": "fvu+kl"}, {**TINY_SAE, "transcoder": True, "skip_connection": True}),
    ({"loss": "kl"}, {**TINY_SAE, "sparsity": "relu", "encoder_hidden": [],
                      "decoder_hidden": []}),
], ids=["two-layers-downstream", "accumulation", "skip-transcoder", "relu"])
def test_every_end_to_end_variant_trains_and_saves(tiny_lm, tmp_path, overrides, sae):
    saes = train(tiny_config(tiny_lm, tmp_path, **overrides), sae)
    for trained in saes.values():
        assert trained.config.metrics["kl_spliced"] >= 0 and trained.config.metrics["fvu"] > 0


@pytest.mark.parametrize(("overrides", "message"), [
    ({"loss": "kl", "shard_latents": True}, "can't run with --shard_latents"),
    ({"loss": "fvu+kl", "distribute_hookpoints": True},
     "can't run with --distribute_hookpoints"),
    ({"downstream_coefficient": 1.0}, "needs --loss kl or fvu\\+kl"),
    ({"loss": "kl", "kl_coefficient": 0.0}, "no objective"),
    ({"loss": "kl", "kl_coefficient": -1.0}, "kl_coefficient=-1.0 must be"),
    ({"loss": "ce"}, "choose fvu, kl or fvu\\+kl"),
])
def test_incompatible_end_to_end_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**overrides)


def test_a_model_without_next_token_logits_is_refused():
    with pytest.raises(ValueError, match="BertForMaskedLM is not a causal language model"):
        check_end_to_end_model(tiny_model("bert"))


def test_downstream_term_needs_layer_indices(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="needs each SAE's layer index"):
        train(tiny_config(tiny_lm, tmp_path, loss="kl", downstream_coefficient=1.0,
                          hookpoints=["transformer.h.1.mlp.c_fc"]), TINY_SAE)


@pytest.fixture
def kl_finetune_example():
    from example_scripts import import_example

    yield from import_example("kl_finetune")


def test_the_fine_tune_example_lowers_a_trained_saes_kl_and_saves_it(
        sensitive_lm, tmp_path, kl_finetune_example):
    train(tiny_config(sensitive_lm, tmp_path / "fvu"), TINY_SAE)
    results = kl_finetune_example.main([
        "--sae", str(tmp_path / "fvu" / HOOKPOINT), "--dataset_name", str(sensitive_lm[1]),
        "--context_length", "16", "--lm_batch_size", "8", "--total_tokens", str(128 * 24),
        "--eval_tokens", "256", "--lr", "1e-2", "--output_dir", str(tmp_path / "kl")])

    assert results["after"]["kl_spliced"] < results["before"]["kl_spliced"]
    saved = DeepSAEModel.from_pretrained(tmp_path / "kl" / HOOKPOINT)
    assert saved.config.metrics["kl_spliced"] == results["after"]["kl_spliced"]
    assert saved.config.training_config["kl_fine_tune"]["loss"] == "kl"


def test_the_trainer_fine_tunes_a_trained_sae_on_the_kl_with_init_from(sensitive_lm, tmp_path):
    """`--init_from` + `--loss kl`: the trainer's way (checkpoints, resume, DDP) to do what
    `examples/kl_finetune.py` does; starting from the FVU-trained SAE, its held-out spliced KL
    falls below that SAE's own."""
    trained = train(tiny_config(sensitive_lm, tmp_path / "fvu"), TINY_SAE)[HOOKPOINT]
    first = train(tiny_config(sensitive_lm, tmp_path / "kl0", loss="kl", total_tokens=128,
                              lr=1e-12, init_from=str(tmp_path / "fvu" / HOOKPOINT)))[HOOKPOINT]
    tuned = train(tiny_config(sensitive_lm, tmp_path / "kl", loss="kl", total_tokens=128 * 24,
                              lr=1e-2, init_from=str(tmp_path / "fvu" / HOOKPOINT)))[HOOKPOINT]

    assert tuned.config.training_config["init_from"] == str(tmp_path / "fvu" / HOOKPOINT)
    started_from = trained.state_dict()  # `first` took one step of lr 1e-12: the initial SAE
    for name, value in first.state_dict().items():
        torch.testing.assert_close(value, started_from[name], rtol=1e-5, atol=1e-6, msg=name)
    assert tuned.config.metrics["kl_spliced"] < 0.9 * first.config.metrics["kl_spliced"]
