"""`examples/interpret.py` end to end: a tiny random model, then the offline default (slow)."""

import json

import pytest
import torch
from example_scripts import import_example
from safetensors.numpy import load_file
from tiny_models import VOCAB_SIZE, save_tiny_llama

from hf_deepsae import DeepSAEConfig, DeepSAEModel
from hf_deepsae.interpret import LatentCache, split_ranges

HOOKPOINT = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def cli():
    yield from import_example("interpret")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny llama with a word-level tokenizer, a text file and an SAE on layer 0."""
    root = tmp_path_factory.mktemp("interpret_cli")
    save_tiny_llama(root / "model")
    words = torch.randint(3, VOCAB_SIZE, (40, 12), generator=torch.Generator().manual_seed(0))
    (root / "corpus.txt").write_text("\n".join(" ".join(f"w{i}" for i in row)
                                               for row in words.tolist()))
    torch.manual_seed(0)
    DeepSAEModel(DeepSAEConfig(d_in=32, n_latents=24, k=3, base_model_name_or_path=str(
        root / "model"), hookpoint=HOOKPOINT)).save_pretrained(root / "sae")
    return root


def test_interpret_writes_delphi_cache_browser_and_scores(cli, workspace):
    out = workspace / "out"
    result = cli.main([
        "--sae", str(workspace / "sae"), "--out", str(out),
        "--dataset_name", str(workspace / "corpus.txt"), "--n_tokens", "256",
        "--context_length", "16", "--example_ctx_len", "8", "--n_splits", "3",
        "--latents", "5", "--n_top", "2", "--n_quantiles", "2", "--n_per_quantile", "2",
        "--n_random", "2", "--n_neighbour", "2", "--n_same_token", "1", "--n_neighbours", "3",
        "--judge_model", str(workspace / "model"), "--judge_max_new_tokens", "3",
    ])
    latents_dir = out / "latents" / HOOKPOINT
    assert sorted(path.name for path in latents_dir.iterdir()) == [
        "0_7.safetensors", "16_23.safetensors", "8_15.safetensors", "config.json"]
    assert split_ranges(24, 3) == [(0, 7), (8, 15), (16, 23)]
    shard = load_file(str(latents_dir / "0_7.safetensors"))
    assert shard["tokens"].shape == (16, 16)
    config = json.loads((latents_dir / "config.json").read_text())
    assert config["model_name"] == str(workspace / "model")
    assert config["dataset_repo"] == str(workspace / "corpus.txt")
    assert LatentCache.load(latents_dir).firing_counts().sum() == 256 * 3  # k per token
    neighbours = json.loads((out / "neighbours" / f"{HOOKPOINT}-decoder_similarity.json")
                            .read_text())
    assert len(neighbours) == 24 and len(neighbours["0"]) == 3
    similarity, neighbour = neighbours["0"][0]  # delphi's (distance, latent_index) pairs
    assert isinstance(neighbour, int) and -1 <= similarity <= 1
    html = (out / "browser.html").read_text()
    assert 'id="latent-5"' in html and 'class="explanation"' in html
    record = json.loads((out / "interpretation.json").read_text())
    assert record["hookpoint"] == HOOKPOINT
    assert len(record["statistics"]["latents"]["firing_count"]) == 24
    assert [score["latent"] for score in record["scores"]["latents"]] == [5]
    assert record["scores"]["latents"][0]["status"] == "scored"
    summary = record["scores"]["summary"]
    assert summary["n_latents_in_sae"] == 24
    assert summary["n_dead_in_sae"] == record["statistics"]["summary"]["n_dead"]
    assert result["scores"]["summary"] == summary


def test_the_default_sae_is_the_one_train_py_writes(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="no SAE folder at 'outputs/deepsae'.*examples/train.py"):
        cli.main([])


@pytest.mark.slow
def test_interpret_runs_on_the_offline_default_model(cli, tmp_path):
    from hf_deepsae.activations import EMBEDDED_MODEL_NAME

    torch.manual_seed(0)
    DeepSAEModel(DeepSAEConfig(d_in=576, n_latents=256, k=8,
                               base_model_name_or_path=EMBEDDED_MODEL_NAME,
                               hookpoint="model.layers.3.mlp.down_proj")).save_pretrained(
        tmp_path / "sae")
    result = cli.main([
        "--sae", str(tmp_path / "sae"), "--out", str(tmp_path / "out"), "--n_tokens", "2048",
        "--context_length", "64", "--example_ctx_len", "16", "--sample_latents", "2",
        "--n_top", "4", "--n_quantiles", "2", "--n_per_quantile", "3", "--n_random", "3",
        "--n_neighbour", "3", "--n_same_token", "2",
    ])
    scores = result["scores"]["latents"]
    assert len(scores) == 2 and all(score["status"] == "scored" for score in scores)
    assert all(score["explanation"] for score in scores)
    assert all(0 <= score["balanced_accuracy"] <= 1 for score in scores)
    assert (tmp_path / "out" / "browser.html").is_file()
