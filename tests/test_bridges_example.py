"""`examples/bridges.py`: each subcommand on tiny SAEs writes what the bridge's loader reads."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from example_scripts import import_example
from tiny_models import HIDDEN_SIZE, save_tiny_llama, tiny_input_ids, tiny_model

from hf_deepsae import DeepSAEConfig, DeepSAEModel, save_saes
from hf_deepsae.interop import from_circuit_tracer, from_saelens, from_sparsify
from hf_deepsae.interpret import LatentScore, SamplingConfig, build_latent_cache


@pytest.fixture(scope="module")
def bridges():
    yield from import_example("bridges")


def random_sae(layer: int = 1, **settings) -> DeepSAEModel:
    torch.manual_seed(layer)
    sae = DeepSAEModel(DeepSAEConfig(d_in=HIDDEN_SIZE, n_latents=64, k=4, layer=layer,
                                     **settings)).eval()
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return sae


def same_outputs(a: DeepSAEModel, b: DeepSAEModel) -> None:
    x = torch.randn(5, HIDDEN_SIZE)
    target = x if a.config.transcoder else None
    with torch.no_grad():
        torch.testing.assert_close(a(x, target=target).reconstruction,
                                   b(x, target=target).reconstruction, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("command", "load"), [("sparsify", from_sparsify),
                                               ("saelens", from_saelens)])
def test_single_sae_exports(tmp_path, bridges, command, load):
    sae = random_sae()
    sae.save_pretrained(tmp_path / "sae")
    bridges.main([command, "--sae", str(tmp_path / "sae"), "--out", str(tmp_path / "out")])
    same_outputs(load(tmp_path / "out"), sae)


def test_circuit_tracer_export_takes_one_transcoder_per_layer(tmp_path, bridges):
    saes = {f"model.layers.{layer}.mlp": random_sae(layer, sparsity="relu", transcoder=True,
                                                    skip_connection=True) for layer in (0, 1)}
    save_saes(saes, tmp_path / "transcoders")
    bridges.main(["circuit-tracer", "--sae", str(tmp_path / "transcoders"), "--out",
                  str(tmp_path / "ct"), "--model_name", "tiny"])
    loaded = from_circuit_tracer(tmp_path / "ct")
    for layer in (0, 1):
        same_outputs(loaded[layer], saes[f"model.layers.{layer}.mlp"])


@pytest.mark.slow  # importing SAEBench's evals takes seconds
def test_saebench_runs_its_evals_on_the_adapter(tmp_path, bridges, monkeypatch):
    run_all = pytest.importorskip("sae_bench.custom_saes.run_all_evals_custom_saes",
                                  reason="install the test-only peers extra (see .ci/run)")
    calls = []
    monkeypatch.setattr(run_all, "run_evals", lambda *args, **kwargs: calls.append((args, kwargs)))
    random_sae().save_pretrained(tmp_path / "sae")
    bridges.main(["saebench", "--sae", str(tmp_path / "sae"), "--model_name", "gemma-2-2b",
                  "--eval_types", "core", "absorption"])
    (model_name, [(name, adapter)]), kwargs = calls[0]
    assert (model_name, name, kwargs["eval_types"]) == ("gemma-2-2b", "hf_deepsae",
                                                        ["core", "absorption"])
    assert adapter.check_decoder_norms() and adapter.cfg.hook_name == "blocks.1.hook_mlp_out"


def test_neuronpedia_export_reads_interprets_output(tmp_path, bridges):
    save_tiny_llama(tmp_path / "model")
    sae = random_sae(hookpoint="model.layers.1.mlp.down_proj")
    sae.save_pretrained(tmp_path / "sae")
    cache = build_latent_cache(tiny_model("llama"), sae, tiny_input_ids(batch_size=4, seq_len=16))
    hookpoint = cache.config["hookpoint"]
    cache.save(tmp_path / "interpret" / "latents" / hookpoint, n_splits=2)
    latent = int(cache.locations[0, 2])
    score = LatentScore(latent=latent, status="scored", firing_rate=0.1, window_firing_rate=0.1,
                        explanation="w5 tokens", balanced_accuracy=0.6)
    sampling = SamplingConfig(example_ctx_len=8, n_top=2, n_quantiles=2, n_per_quantile=1)
    (tmp_path / "interpret" / "interpretation.json").write_text(json.dumps({
        "hookpoint": hookpoint, "model": str(tmp_path / "model"),
        "settings": {"sampling": dataclasses.asdict(sampling),
                     "arguments": {"judge_model": "tiny-judge"}},
        "scores": {"latents": [score.to_dict()]}}))
    bridges.main(["neuronpedia", "--sae", str(tmp_path / "sae"), "--interpret_dir",
                  str(tmp_path / "interpret"), "--out", str(tmp_path / "np"), "--model_id",
                  "tiny-llama", "--sae_set", "deepsae"])
    (feature,) = json.loads((tmp_path / "np" / "batch-0.json").read_text())["features"]
    assert feature["feature_index"] == latent and len(feature["pos_str"]) == 10
    (explanation,) = json.loads((tmp_path / "np" / "explanations.json").read_text())
    assert (explanation["description"], explanation["explanationModelName"]) == (
        "w5 tokens", "tiny-judge")


def test_releases_are_listed(bridges, capsys):
    bridges.main(["releases"])
    assert "eleutherai-llama-3-8b-32x: EleutherAI/sae-llama-3-8b-32x (sparsify" in (
        capsys.readouterr().out)
