"""Absorption on constructed first-letter data with known answers, and on a tiny real model."""

import pytest
import torch
from tiny_models import tiny_model, word_tokenizer

from hf_deepsae import DeepSAEConfig, DeepSAEModel
from hf_deepsae.evaluation import (
    AbsorptionConfig,
    evaluate_absorption,
    first_letter_data,
    fit_first_letter_probes,
)
from hf_deepsae.evaluation.first_letter import alphabetic_tokens
from hf_deepsae.sites import Site, sae_sites

D = 16
LETTERS = "abcd"
N_PER_LETTER = 40
ABSORBED = [0, 4, 8, 12]
"""Test words of 'a' (every 4th word is a test word) taken over by a token-specific latent."""


def basis() -> torch.Tensor:
    """`[D, D]` orthonormal rows: 0-3 the letters, 4-7 token-specific parts, the rest unused."""
    return torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0)))[0].T


def tied_sae(directions: torch.Tensor, k: int = 1) -> DeepSAEModel:
    """A shallow top-k SAE whose latents read and write exactly `directions` (unit rows)."""
    sae = DeepSAEModel(DeepSAEConfig(d_in=D, n_latents=directions.shape[0], k=k)).eval()
    with torch.no_grad():
        stage = sae.stages[0]
        stage.encoder.weight.copy_(directions)
        stage.encoder.bias.zero_()
        stage.W_dec.copy_(directions)
        stage.b_dec.zero_()
    return sae


def letter_data(absorbed: list[int], target_scale: float = 1.0):
    """Words `x = 3·u_letter + noise`; the `absorbed` test words of 'a' also carry `3·v_j`.
    The targets are `target_scale·x`."""
    rows = basis()
    generator = torch.Generator().manual_seed(1)
    inputs, letters, is_test = [], [], []
    for letter in range(len(LETTERS)):
        for i in range(N_PER_LETTER):
            x = 3 * rows[letter] + 0.1 * torch.randn(D, generator=generator)
            if letter == 0 and i in absorbed:
                x = x + 3 * rows[4 + absorbed.index(i)]
            inputs.append(x)
            letters.append(letter)
            is_test.append(i % 4 == 0)
    inputs = torch.stack(inputs)
    n = len(letters)
    return fit_first_letter_probes(
        [f"w{i}" for i in range(n)], torch.arange(n), torch.tensor(letters), LETTERS,
        torch.tensor(is_test), inputs, target_scale * inputs, (Site("x"), Site("x")))


def letter_sae(data, token_latents: int = 0, k: int = 1) -> DeepSAEModel:
    """Latents 0-3 are exactly the letter probes' directions; then `token_latents` latents
    `(p_a + v_j)/√2` that win the top-1 choice on the absorbed words; the rest read unused
    directions."""
    rows, probes = basis(), data.probe.directions
    token = probes[0] + rows[4:4 + token_latents]
    token = token / token.norm(dim=1, keepdim=True)
    return tied_sae(torch.cat([probes, token, rows[8:]]), k)


def test_latents_that_are_the_letter_directions_have_no_absorption_and_f1_one():
    data = letter_data([])
    result = evaluate_absorption(letter_sae(data), data)
    assert result.n_letters_evaluated == 4
    assert [record.main_latents for record in result.letters] == [[0], [1], [2], [3]]
    assert result.first_letter_f1 == pytest.approx(1.0)
    assert result.main_latents_f1 == pytest.approx(1.0) and result.n_main_latents == 1
    assert result.mean_absorption_fraction == pytest.approx(0.0, abs=1e-6)
    assert result.full_absorption_rate == 0.0
    assert [r.decoder_probe_cosine for r in result.letters] == [pytest.approx([1.0])] * 4
    assert result.contribution_additivity_error == pytest.approx(0.0, abs=1e-5)


def test_a_token_specific_latent_taking_over_a_letter_is_absorption():
    data = letter_data(ABSORBED)
    result = evaluate_absorption(letter_sae(data, len(ABSORBED)), data)
    a, *others = result.letters
    assert a.main_latents == [0]  # the token latents never fire on training words
    assert a.n_probe_true_positives == N_PER_LETTER // 4
    assert a.n_full_absorption == len(ABSORBED)
    assert a.full_absorption_rate == pytest.approx(len(ABSORBED) / (N_PER_LETTER // 4))
    assert a.mean_absorption_fraction == pytest.approx(len(ABSORBED) / (N_PER_LETTER // 4))
    assert a.sparse_probe_f1[0] < 1.0  # the letter latent misses the absorbed words
    assert all(r.mean_absorption_fraction == pytest.approx(0.0, abs=1e-6) for r in others)
    assert result.mean_absorption_fraction == pytest.approx(a.mean_absorption_fraction / 4)


def test_a_skip_transcoders_skip_path_is_not_what_its_latents_must_explain():
    data = letter_data(ABSORBED, target_scale=4.0)  # targets x + W_skip x with W_skip = 3·I
    plain = letter_sae(data, len(ABSORBED))
    sae = DeepSAEModel(DeepSAEConfig(d_in=D, n_latents=plain.config.n_latents, k=1,
                                     transcoder=True, skip_connection=True)).eval()
    assert set(sae.load_state_dict(plain.state_dict(), strict=False).missing_keys) == {"W_skip"}
    with torch.no_grad():
        sae.W_skip.copy_(3 * torch.eye(D))
    a = evaluate_absorption(sae, data).letters[0]
    assert a.n_full_absorption == len(ABSORBED)  # 3 of 4·3 had looked like a quarter absorbed
    assert a.mean_absorption_fraction == pytest.approx(len(ABSORBED) / (N_PER_LETTER // 4))


def test_letters_the_site_does_not_encode_are_reported_not_scored():
    data = letter_data([])
    data.probe_f1[2] = 0.3
    result = evaluate_absorption(letter_sae(data), data, AbsorptionConfig(min_probe_f1=0.6))
    record = result.letters[2]
    assert not record.evaluated and "F1 0.30 < min_probe_f1 0.6" in record.reason
    assert result.n_letters_evaluated == 3


@pytest.mark.parametrize("architecture", [
    {"encoder_hidden": [24], "decoder_hidden": [24]},
    {"n_stacked": 2},
    {"encoder_hidden": [24]},
])
def test_every_architecture_is_scored_with_effective_directions(architecture):
    torch.manual_seed(0)
    sae = DeepSAEModel(DeepSAEConfig(d_in=D, n_latents=32, k=2, **architecture)).eval()
    with torch.no_grad():  # deep decoders start at zero output: give every layer some weight
        for parameter in sae.parameters():
            parameter.normal_(std=0.5)
    result = evaluate_absorption(sae, letter_data(ABSORBED))
    assert result.n_letters_evaluated == 4 and 0 <= result.mean_absorption_fraction <= 1
    if architecture.get("decoder_hidden"):
        assert result.decoder == "nonlinear" and result.contribution_additivity_error > 1e-3
    else:
        assert result.contribution_additivity_error == pytest.approx(0.0, abs=1e-5)
    if architecture.get("encoder_hidden"):
        assert "hidden layers" in result.not_applicable["encoder_probe_cosine"]
        assert all(r.encoder_probe_cosine is None for r in result.letters)
    else:
        assert result.not_applicable == {}
        assert all(len(r.encoder_probe_cosine) == len(r.main_latents) for r in result.letters)


def test_data_of_another_width_is_a_clear_error():
    sae = DeepSAEModel(DeepSAEConfig(d_in=8, n_latents=16, k=2))
    with pytest.raises(ValueError, match=r"width \(16, 16\).*d_in=8"):
        evaluate_absorption(sae, letter_data([]))


def test_vocabulary_words_are_alphabetic_tokens_with_an_optional_leading_space():
    ids, words = alphabetic_tokens(word_tokenizer())
    assert "apple" in words and " apple" not in words and "w1" not in words
    assert len(ids) == len(words)


def test_first_letter_data_from_a_tiny_model():
    model, tokenizer = tiny_model("llama"), word_tokenizer()
    sae = DeepSAEModel(DeepSAEConfig(d_in=32, n_latents=64, k=4, hookpoint="model.layers.0.mlp"
                                     ".down_proj"))
    config = AbsorptionConfig(n_words=0, min_words_per_letter=3, n_icl_examples=2)
    data = first_letter_data(model, tokenizer, sae_sites(model, sae.config), config)
    assert data.inputs.shape == (len(data.words), 32) and data.targets is data.inputs
    assert all(word[0] in data.letters_used for word in data.words)
    assert data.probe.weight.shape == (len(data.letters_used), 32)
    result = evaluate_absorption(sae, data, config)
    assert len(result.letters) == len(data.letters_used)
