"""`to_neuronpedia` writes sae-dashboard's Neuronpedia batches from interpret's outputs."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard
from tiny_models import HIDDEN_SIZE, VOCAB_SIZE, judge_tokenizer, tiny_input_ids, tiny_model

from hf_deepsae import DeepSAEConfig, DeepSAEModel, save_saes
from hf_deepsae.interop import to_neuronpedia
from hf_deepsae.interpret import (
    ContextWindows,
    LatentScore,
    SamplingConfig,
    build_latent_cache,
    compute_statistics,
    sample_examples,
    token_strings,
)

# the fields of sae-dashboard's NeuronpediaDashboardFeature.to_dict / ...Activation.to_dict
FEATURE_FIELDS = {
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
    "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
    "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero",
    "freq_hist_data_bar_values", "freq_hist_data_bar_heights", "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values", "n_prompts_total", "n_tokens_in_prompt", "dataset",
    "decoder_weights_dist", "activations",
}
ACTIVATION_FIELDS = {"bin_min", "bin_max", "bin_contains", "tokens", "values"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A deep SAE on the tiny llama, through the interpret pipeline, exported with 2 scores."""
    model = tiny_model("llama")
    torch.manual_seed(0)
    sae = DeepSAEModel(DeepSAEConfig(d_in=HIDDEN_SIZE, n_latents=64, k=4, layer=1,
                                     encoder_hidden=[32], decoder_hidden=[32])).eval()
    cache = build_latent_cache(model, sae, tiny_input_ids(batch_size=8, seq_len=16))
    statistics = compute_statistics(cache)
    windows = ContextWindows(cache, example_ctx_len=8)
    config = SamplingConfig(n_top=3, n_quantiles=2, n_per_quantile=2)
    live = (~statistics.dead).nonzero()[:3, 0].tolist()
    examples = [sample_examples(windows, latent, config, statistics.top_tokens_of(latent))
                for latent in live]
    scores = [LatentScore(latent=live[0], status="scored", firing_rate=0.1,
                          window_firing_rate=0.2, explanation="the word w7",
                          balanced_accuracy=0.75)]
    unembedding = model.get_output_embeddings().weight
    folder = to_neuronpedia(tmp_path_factory.mktemp("np"), sae, cache, examples,
                            judge_tokenizer(), model_id="tiny-llama", sae_set="deepsae",
                            dataset="random tokens", unembedding=unembedding, scores=scores,
                            explanation_model="judge", features_per_batch=2)
    return folder, sae, cache, examples, unembedding


def test_batches_hold_every_field_neuronpedia_reads(exported):
    folder, _, _, examples, _ = exported
    batches = [json.loads((folder / f"batch-{i}.json").read_text()) for i in (0, 1)]
    assert [(b["model_id"], b["layer"], b["sae_set"]) for b in batches] == [
        ("tiny-llama", 1, "deepsae")] * 2
    features = [feature for batch in batches for feature in batch["features"]]
    assert [f["feature_index"] for f in features] == [item.latent for item in examples]
    for feature in features:
        assert set(feature) == FEATURE_FIELDS
        assert all(set(row) == ACTIVATION_FIELDS for row in feature["activations"])


def test_features_carry_the_cache_statistics_and_examples(exported):
    folder, _, cache, examples, _ = exported
    feature = json.loads((folder / "batch-0.json").read_text())["features"][0]
    item = examples[0]
    firing = cache.activations[cache.latent_slice(item.latent)]
    assert feature["frac_nonzero"] == pytest.approx(len(firing) / cache.n_tokens)
    assert sum(feature["freq_hist_data_bar_heights"]) == len(firing)
    assert (feature["n_prompts_total"], feature["n_tokens_in_prompt"]) == (8, 16)
    top = feature["activations"][:len(item.top)]
    assert [row["values"] for row in top] == [[round(v, 3) for v in example.activations]
                                             for example in item.top]
    assert top[0]["bin_min"] == -1 and top[0]["bin_max"] == pytest.approx(
        item.top[0].max_activation, abs=1e-3)
    assert top[0]["tokens"] == token_strings(judge_tokenizer(), item.top[0].tokens)


def test_logit_tables_come_from_the_effective_direction(exported):
    folder, sae, _, examples, unembedding = exported
    feature = json.loads((folder / "batch-0.json").read_text())["features"][0]
    with torch.no_grad():
        logits = unembedding @ sae.latent_directions(torch.tensor([examples[0].latent]))[0]
    top = logits.topk(10)
    assert feature["pos_values"] == pytest.approx(top.values.tolist(), abs=1e-3)
    assert feature["pos_str"] == token_strings(judge_tokenizer(), top.indices.tolist())
    assert sum(feature["logits_hist_data_bar_heights"]) == VOCAB_SIZE


def test_explanations_and_link_fields_are_written(exported):
    folder, _, _, examples, _ = exported
    (explanation,) = json.loads((folder / "explanations.json").read_text())
    assert explanation | {"scores": None} == {
        "modelId": "tiny-llama", "layer": "1-deepsae", "index": str(examples[0].latent),
        "description": "the word w7", "explanationModelName": "judge",
        "typeName": "hf_deepsae-detection", "scores": None}
    assert explanation["scores"]["balanced_accuracy"] == 0.75
    links = json.loads((folder / "neuronpedia.json").read_text())
    assert links == {"neuronpedia_id": "tiny-llama/1-deepsae",
                     "neuronpedia_url": "https://www.neuronpedia.org/tiny-llama/1-deepsae"}


def test_the_saved_sae_card_links_its_feature_pages(exported, tmp_path):
    """The id `to_neuronpedia` records travels with the SAE: its own card and its collection's
    card link the pages, and the metadata carries the id."""
    _, sae, _, _, _ = exported
    assert sae.config.neuronpedia_id == "tiny-llama/1-deepsae"
    save_saes({"model.layers.1.mlp": sae}, tmp_path)
    url = "https://www.neuronpedia.org/tiny-llama/1-deepsae"
    card = ModelCard.load(tmp_path / "model.layers.1.mlp" / "README.md")
    assert card.data.neuronpedia_id == "tiny-llama/1-deepsae"
    assert f"| Feature pages | [Neuronpedia: tiny-llama/1-deepsae]({url}) |" in card.text
    collection = ModelCard.load(tmp_path / "README.md")
    assert collection.data.neuronpedia_ids == {"model.layers.1.mlp": "tiny-llama/1-deepsae"}
    assert f"([Neuronpedia]({url}))" in collection.text
    assert DeepSAEModel.from_pretrained(
        tmp_path / "model.layers.1.mlp").config.neuronpedia_id == "tiny-llama/1-deepsae"


def test_an_sae_without_pages_has_no_link(tmp_path):
    save_saes({"layer": DeepSAEModel(DeepSAEConfig(d_in=8, n_latents=16, k=2))}, tmp_path)
    card = ModelCard.load(tmp_path / "layer" / "README.md")
    assert "Neuronpedia" not in card.content and "neuronpedia_id" not in card.data.to_dict()
