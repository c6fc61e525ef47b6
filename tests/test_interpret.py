"""Latent cache (delphi layout), example sampling and per-latent statistics.

`token_latent_setup` is a tiny llama whose embedding feeds an SAE with known latents: latent 0
fires on token 10 (activation 4), latent 1 on token 11 (2), latent 2 on tokens 12 (3) and 13 (1);
latents 3-7 are dead. The browser and scoring tests reuse it.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tiny_models import tiny_model
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from hf_deepsae import DeepSAEConfig, DeepSAEModel
from hf_deepsae.interpret import (
    ContextWindows,
    LatentCache,
    SamplingConfig,
    build_latent_cache,
    compute_statistics,
    decoder_directions,
    nearest_latents,
    sample_examples,
    split_ranges,
)

PLANTED = {10: [(0, 1), (0, 7), (1, 3), (2, 0), (3, 15)],  # token: (sequence, position) list
           11: [(0, 2), (2, 9), (3, 4)],
           12: [(1, 0), (1, 8), (2, 12), (3, 0)],
           13: [(0, 12), (1, 14), (2, 2), (2, 3), (3, 8), (3, 9)]}
LATENT_OF = {10: (0, 4.0), 11: (1, 2.0), 12: (2, 3.0), 13: (2, 1.0)}  # token: (latent, activation)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A real fast tokenizer over the tiny models' 100 ids: id i decodes to ' w<i>'."""
    vocab = {f" w{i}": i for i in range(100)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token=" w0")))


def planted_tokens() -> torch.Tensor:
    """`[4, 16]` ids: background tokens in [14, 100), the `PLANTED` tokens where listed."""
    tokens = torch.randint(14, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    for token, places in PLANTED.items():
        for sequence, position in places:
            tokens[sequence, position] = token
    return tokens


def token_latent_setup(sparsity: str = "topk"):
    """`(model, sae)`: the SAE reads `model.embed_tokens`, so latents depend on the token alone."""
    model = tiny_model("llama")
    embedding = model.model.embed_tokens.weight
    with torch.no_grad():
        embedding[:, :8] = 0  # background tokens live in dims 8..31, which no latent reads
        for token, (latent, activation) in LATENT_OF.items():
            embedding[token] = 0
            embedding[token, latent] = activation
    config = DeepSAEConfig(d_in=32, n_latents=8, k=2, sparsity=sparsity,
                           hookpoint="model.embed_tokens")
    sae = DeepSAEModel(config).eval()
    with torch.no_grad():
        stage = sae.stages[0]
        stage.encoder.weight.zero_()
        stage.encoder.weight[:3, :3] = torch.eye(3)
        stage.encoder.bias.copy_(torch.tensor([0.0, 0, 0, -1, -1, -1, -1, -1]))
        stage.W_dec.copy_(torch.eye(8, 32))
    return model, sae


def random_cache(n_latents: int = 10, n_firings: int = 200, seed: int = 0) -> LatentCache:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 100, (6, 8), generator=generator)
    cells = torch.randperm(6 * 8 * n_latents, generator=generator)[:n_firings]
    locations = torch.stack([cells // (8 * n_latents), cells // n_latents % 8,
                             cells % n_latents], dim=1)
    activations = torch.rand(n_firings, generator=generator) + 0.1
    return LatentCache(tokens, locations, activations, n_latents, {"model_name": "tiny"})


def assert_same_cache(a: LatentCache, b: LatentCache) -> None:
    assert a.n_latents == b.n_latents
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.locations, b.locations)
    assert torch.equal(a.activations, b.activations)


# ---------------------------------------------------------------- cache


def test_cache_round_trips_through_disk(tmp_path):
    cache = random_cache()
    cache.save(tmp_path, n_splits=3)
    loaded = LatentCache.load(tmp_path)
    assert_same_cache(cache, loaded)
    assert loaded.config["model_name"] == "tiny"


def test_saved_cache_has_delphis_layout(tmp_path):
    cache = random_cache(n_latents=10)
    cache.save(tmp_path, n_splits=3)
    assert split_ranges(10, 3) == [(0, 2), (3, 5), (6, 9)]  # torch.linspace boundaries, as delphi
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "0_2.safetensors", "3_5.safetensors", "6_9.safetensors", "config.json"]
    total = 0
    for start, end in split_ranges(10, 3):
        shard = load_file(str(tmp_path / f"{start}_{end}.safetensors"))
        assert set(shard) == {"locations", "activations", "tokens"}
        locations = shard["locations"]
        assert locations.dtype == np.uint16 and locations.ndim == 2 and locations.shape[1] == 3
        assert shard["activations"].shape == (len(locations),)
        assert shard["activations"].dtype == np.float32
        np.testing.assert_array_equal(shard["tokens"], cache.tokens.numpy())
        assert locations[:, 2].max() <= end - start  # latent column is relative to the shard
        expected = cache.locations[cache.latent_slice(start).start:cache.latent_slice(end).stop]
        np.testing.assert_array_equal(locations[:, :2], expected[:, :2].numpy())
        total += len(locations)
    assert total == len(cache.locations)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_name"] == "tiny"
    assert (config["cache_ctx_len"], config["n_tokens"], config["n_splits"]) == (8, 48, 3)


def test_half_precision_and_wide_indices_follow_delphi(tmp_path):
    tokens = torch.zeros(70_000, 1, dtype=torch.long)
    locations = torch.tensor([[0, 0, 0], [69_999, 0, 1]])
    cache = LatentCache(tokens, locations, torch.tensor([1.5, 2.5]), 2)
    cache.save(tmp_path, n_splits=1, activation_dtype=torch.float16)
    shard = load_file(str(tmp_path / "0_1.safetensors"))
    assert shard["locations"].dtype == np.uint32  # a sequence index no longer fits 16 bits
    assert shard["activations"].dtype == np.float16
    assert_same_cache(cache, LatentCache.load(tmp_path))


def test_a_cache_written_without_n_latents_takes_it_from_the_last_shard(tmp_path):
    cache = random_cache(n_latents=10)
    cache.save(tmp_path, n_splits=2)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["n_latents"]  # as delphi writes it
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert LatentCache.load(tmp_path).n_latents == 10


def test_loading_a_folder_without_a_cache_says_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="no latent cache"):
        LatentCache.load(tmp_path)


@pytest.mark.parametrize("sparsity", ["topk", "relu"])
def test_build_latent_cache_records_exactly_where_latents_fire(sparsity):
    model, sae = token_latent_setup(sparsity)
    tokens = planted_tokens()
    cache = build_latent_cache(model, sae, tokens, batch_size=3)
    assert torch.equal(cache.tokens, tokens) and cache.n_latents == 8
    expected = sorted((latent, sequence, position, activation)
                      for token, (latent, activation) in LATENT_OF.items()
                      for sequence, position in PLANTED[token])
    found = sorted((int(latent), int(sequence), int(position), float(activation))
                   for (sequence, position, latent), activation
                   in zip(cache.locations, cache.activations, strict=True))
    assert found == expected
    assert cache.firing_counts().tolist() == [5, 3, 10, 0, 0, 0, 0, 0]
    assert cache.config["hookpoint"] == "model.embed_tokens"


def test_build_latent_cache_shows_its_progress_in_tokens(capsys):
    model, sae = token_latent_setup()
    build_latent_cache(model, sae, planted_tokens(), batch_size=3)
    errors = capsys.readouterr().err
    assert "Caching latents: 100%" in errors and "tok/s" in errors


# ---------------------------------------------------------------- sampling


def window_cache(firings: dict[int, dict[int, float]], n_latents: int, n_windows: int = 100,
                 width: int = 4, tokens: torch.Tensor | None = None) -> LatentCache:
    """`firings[latent][window] = activation`, placed at offset `window % width` of the window."""
    per_sequence = 4
    if tokens is None:
        tokens = torch.arange(n_windows * width).reshape(-1, per_sequence * width) % 90 + 10
    rows = [(window // per_sequence, window % per_sequence * width + window % width, latent, act)
            for latent, windows in firings.items() for window, act in windows.items()]
    locations = torch.tensor([row[:3] for row in rows])
    return LatentCache(tokens, locations, torch.tensor([row[3] for row in rows]), n_latents)


def test_quantile_examples_come_from_the_right_bins():
    cache = window_cache({0: {window: window + 1.0 for window in range(100)}}, n_latents=1)
    config = SamplingConfig(example_ctx_len=4, n_top=5, n_quantiles=10, n_per_quantile=3)
    examples = sample_examples(ContextWindows(cache, 4), 0, config, top_tokens=[])
    assert examples.n_activating_windows == 100 and examples.window_firing_rate == 1.0
    assert [e.max_activation for e in examples.top] == [100.0, 99.0, 98.0, 97.0, 96.0]
    assert examples.quantile_ranges == [(10.0 * q + 1, 10.0 * q + 10) for q in range(10)]
    for q, bin_ in enumerate(examples.quantiles):
        assert len(bin_) == 3
        for example in bin_:
            assert example.quantile == q
            low, high = examples.quantile_ranges[q]
            assert low <= example.max_activation <= min(high, 95)  # the top 5 are excluded
            assert sum(a > 0 for a in example.activations) == 1


def test_fewer_activating_windows_than_bins_leave_bins_empty():
    cache = window_cache({0: {0: 1.0, 1: 2.0, 2: 3.0}}, n_latents=1, n_windows=8)
    config = SamplingConfig(example_ctx_len=4, n_top=0, n_quantiles=10)
    examples = sample_examples(ContextWindows(cache, 4), 0, config, [])
    assert examples.quantile_ranges == [None] * 3 + [(1.0, 1.0)] + [None] * 2 + [(2.0, 2.0)] + \
        [None] * 2 + [(3.0, 3.0)]
    assert [len(bin_) for bin_ in examples.quantiles] == [0, 0, 0, 1, 0, 0, 1, 0, 0, 1]


def test_negatives_are_truly_non_activating():
    cache = window_cache({0: {0: 5.0, 1: 4.0, 2: 3.0},
                          1: {1: 1.0, 2: 2.0, 3: 9.0, 4: 8.0},
                          2: {5: 1.0}}, n_latents=3, n_windows=8)
    neighbours = (torch.tensor([[1, 2], [0, 2], [0, 1]]), torch.tensor([[0.9, 0.5]] * 3))
    config = SamplingConfig(example_ctx_len=4, n_random=3, n_neighbour=10)
    examples = sample_examples(ContextWindows(cache, 4), 0, config, [], neighbours)
    # latent 1's strongest silent windows (3, 4) interleaved with latent 2's (5)
    assert [(e.window, e.neighbour) for e in examples.neighbour_negatives] == [(3, 1), (5, 2),
                                                                               (4, 1)]
    assert examples.neighbour_negatives[0].similarity == pytest.approx(0.9)
    assert len(examples.random_negatives) == 3
    for example in examples.neighbour_negatives + examples.random_negatives:
        assert example.window not in (0, 1, 2)
        assert example.activations == [0.0] * 4


def test_same_token_negatives_hold_the_token_but_not_the_activation():
    tokens = torch.full((2, 16), 50)
    tokens[0, [0, 5, 9]] = 10  # token 10 in windows 0, 1, 2; the latent fires in window 0 only
    tokens[1, 14] = 10  # and in window 7
    cache = LatentCache(tokens, torch.tensor([[0, 0, 0]]), torch.tensor([2.0]), 1)
    config = SamplingConfig(example_ctx_len=4, n_same_token=10)
    examples = sample_examples(ContextWindows(cache, 4), 0, config, top_tokens=[10])
    assert [e.window for e in examples.same_token_negatives] == [1, 2, 7]
    assert all(10 in e.tokens and max(e.activations) == 0 for e in examples.same_token_negatives)


def test_windows_must_tile_the_context():
    with pytest.raises(ValueError, match="must divide"):
        ContextWindows(random_cache(), 3)


def test_a_dead_latent_gets_no_activating_examples_but_still_negatives():
    cache = window_cache({0: {0: 1.0}}, n_latents=2, n_windows=8)
    examples = sample_examples(ContextWindows(cache, 4), 1, SamplingConfig(example_ctx_len=4), [])
    assert examples.n_activating_windows == 0 and examples.top == []
    assert all(bin_ == [] for bin_ in examples.quantiles)
    assert examples.quantile_ranges == [None] * 10
    assert len(examples.random_negatives) == 8


def test_linear_decoder_directions_are_the_decoder_rows():
    sae = DeepSAEModel(DeepSAEConfig(d_in=8, n_latents=16, k=2))
    torch.testing.assert_close(decoder_directions(sae, batch_size=5), sae.W_dec.detach())


@pytest.mark.parametrize("architecture", [
    {"decoder_hidden": [12], "encoder_hidden": [12]},  # deep: nonlinear decoder
    {"n_stacked": 2},  # stacked: latents 16..31 belong to the second stage
])
def test_decoder_direction_is_decode_one_hot_minus_decode_zero(architecture):
    sae = DeepSAEModel(DeepSAEConfig(d_in=8, n_latents=16, k=2, **architecture)).eval()
    n = sae.config.n_total_latents
    scale = torch.rand(n) + 0.5
    with torch.no_grad():
        expected = sae.decode(torch.diag(scale)) - sae.decode(torch.zeros(1, n))
    torch.testing.assert_close(decoder_directions(sae, scale, batch_size=7), expected)


def test_nearest_latents_rank_by_cosine_similarity_and_skip_non_candidates():
    directions = torch.tensor([[1.0, 0, 0], [2.0, 0.4, 0], [0, 1, 0], [0.9, 0, 0.1]])
    indices, similarities = nearest_latents(directions, 2)
    assert indices[0].tolist() == [3, 1]  # self excluded, scale ignored
    assert similarities[0, 0] == pytest.approx(0.9 / np.hypot(0.9, 0.1))
    indices, _ = nearest_latents(directions, 2, candidates=torch.tensor([True, True, True, False]))
    assert indices[0].tolist() == [1, 2]
    indices, similarities = nearest_latents(directions, 3, candidates=torch.tensor(
        [True, True, False, False]))
    assert indices[0].tolist() == [1, -1, -1] and similarities[0, 1] == -torch.inf


# ---------------------------------------------------------------- statistics


def test_statistics_of_latents_that_fire_on_known_tokens():
    model, sae = token_latent_setup()
    cache = build_latent_cache(model, sae, planted_tokens())
    statistics = compute_statistics(cache, n_top_tokens=2)
    assert statistics.firing_counts.tolist() == [5, 3, 10, 0, 0, 0, 0, 0]
    assert statistics.firing_rate[0] == pytest.approx(5 / 64)
    assert statistics.mean_activation[:3].tolist() == pytest.approx([4.0, 2.0, 1.8])
    assert statistics.max_activation.tolist() == [4.0, 2.0, 3.0, 0, 0, 0, 0, 0]
    assert statistics.top_tokens[:4].tolist() == [[10, -1], [11, -1], [13, 12], [-1, -1]]
    assert statistics.top_token_counts[2].tolist() == [6, 4]
    assert statistics.top_token_share[:3].tolist() == pytest.approx([1.0, 1.0, 0.6])
    assert statistics.single_token.tolist() == [True, True] + [False] * 6
    assert statistics.dead.tolist() == [False] * 3 + [True] * 5
    summary = statistics.summary()
    assert (summary["n_dead"], summary["n_single_token"]) == (5, 2)
    assert summary["dead_fraction"] == pytest.approx(5 / 8)


def test_single_token_flag_looks_at_the_strongest_firings_only():
    model, sae = token_latent_setup()
    cache = build_latent_cache(model, sae, planted_tokens())
    # latent 2's 3 strongest firings are all token 12 (activation 3), though 13 is more frequent
    statistics = compute_statistics(cache, n_strongest=3)
    assert statistics.top_token_share[2] == 1.0 and statistics.single_token[2]


def test_latent_record_is_json_ready_with_token_texts():
    model, sae = token_latent_setup()
    statistics = compute_statistics(build_latent_cache(model, sae, planted_tokens()))
    record = statistics.latent_record(2, word_tokenizer())
    assert record["top_tokens"][0] == {"id": 13, "text": " w13", "count": 6}
    assert statistics.latent_record(5)["dead"] is True
    json.dumps(record)
    json.dumps(statistics.columns())
