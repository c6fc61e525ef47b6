"""Model-level metrics: CE-loss score and KL, by hand on tiny logits and through `splice`."""

import math

import pytest
import torch
from test_splice import make_sae
from tiny_models import tiny_input_ids, tiny_model

from hf_deepsae.evaluation import JOINT, LanguageModelMetrics, SAEEvaluator, evaluate_saes
from hf_deepsae.splice import capture_activations, sae_sites

LN3 = math.log(3.0)


def lm_metrics(clean, spliced, ablated, input_ids, attention_mask=None):
    metrics = LanguageModelMetrics()
    metrics.update(input_ids, clean, spliced, ablated, attention_mask)
    return metrics.compute()


def test_scores_from_hand_computed_logits():
    # One predicted token (label 1); the padded third position must be ignored.
    input_ids = torch.tensor([[0, 1, 0]])
    attention_mask = torch.tensor([[1, 1, 0]])
    garbage = torch.tensor([[9.0, -9.0]])

    def logits(first):
        return torch.cat([torch.tensor([first]), garbage, garbage]).unsqueeze(0)

    result = lm_metrics(
        logits([0.0, 0.0]), logits([0.0, LN3]), logits([LN3, 0.0]), input_ids, attention_mask
    )
    assert result.n_predicted_tokens == 1
    assert result.ce_clean == pytest.approx(math.log(2))
    assert result.ce_spliced == pytest.approx(-math.log(0.75))
    assert result.ce_ablated == pytest.approx(math.log(4))
    assert result.ce_loss_increase == pytest.approx(-math.log(0.75) - math.log(2))
    assert result.ce_loss_score == pytest.approx(LN3 / math.log(2))
    # KL((.5, .5) || (.25, .75)) = .5 ln 2 + .5 ln(2/3) = KL((.5, .5) || (.75, .25))
    assert result.kl_spliced == pytest.approx(0.5 * math.log(4 / 3))
    assert result.kl_ablated == pytest.approx(0.5 * math.log(4 / 3))
    assert result.kl_score == pytest.approx(0.0)


def random_logits(generator, shape=(2, 5, 7)):
    return torch.randn(*shape, generator=generator)


def test_perfect_splice_scores_one_and_ablation_equivalent_scores_zero():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(7, (2, 5), generator=generator)
    clean, ablated = random_logits(generator), random_logits(generator)
    perfect = lm_metrics(clean, clean, ablated, input_ids)
    assert perfect.ce_loss_score == pytest.approx(1.0)
    assert perfect.kl_spliced == pytest.approx(0.0, abs=1e-7)
    assert perfect.kl_score == pytest.approx(1.0)
    useless = lm_metrics(clean, ablated, ablated, input_ids)
    assert useless.ce_loss_score == pytest.approx(0.0)
    assert useless.kl_score == pytest.approx(0.0)


def test_batches_merge_like_one_batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(7, (2, 5), generator=generator)
    logits = [random_logits(generator) for _ in range(3)]
    merged = LanguageModelMetrics()
    for row in range(2):
        part = LanguageModelMetrics()
        part.update(input_ids[row : row + 1], *(values[row : row + 1] for values in logits))
        merged.merge(part)
    whole = lm_metrics(*logits, input_ids)
    assert merged.compute().scalars() == pytest.approx(whole.scalars(), rel=1e-6)


def test_no_predicted_tokens_is_a_clear_error():
    metrics = LanguageModelMetrics()
    single_tokens = torch.zeros(3, 1, dtype=torch.long)
    logits = torch.zeros(3, 1, 7)
    metrics.update(single_tokens, logits, logits, logits)
    with pytest.raises(ValueError, match="only 0 next-token predictions"):
        metrics.compute()


# ---- through splice on a tiny random model ---------------------------------------------------


def saes_at(*kinds, **config):
    """`{name: SAE}` with one SAE per layer, each kind as `test_splice.make_sae` builds it."""
    return {
        f"{kind}_{layer}": hooked(make_sae(kind, **config), layer)
        for layer, kind in enumerate(kinds)
    }


def hooked(sae, layer):
    sae.config.hookpoint = f"model.layers.{layer}.mlp.down_proj"
    return sae


def batches(n_batches=2):
    return [tiny_input_ids(2, 8, seed) for seed in range(n_batches)]


def test_exact_sae_scores_one_and_loses_nothing():
    result = evaluate_saes(tiny_model("llama"), saes_at("exact"), batches())
    scalars = result.scalars()["exact_0"]
    assert scalars["fvu"] == 0.0
    assert scalars["ce_loss_score"] == pytest.approx(1.0)
    assert scalars["kl_spliced"] == pytest.approx(0.0, abs=1e-9)
    assert scalars["n_tokens"] == 28  # 4 sequences of 8, each first position left out
    assert scalars["n_predicted_tokens"] == 28


def test_zero_reconstruction_scores_like_zero_ablation():
    scalars = evaluate_saes(tiny_model("llama"), saes_at("zero"), batches()).scalars()["zero_0"]
    assert scalars["ce_loss_score"] == pytest.approx(0.0)
    assert scalars["kl_score"] == pytest.approx(0.0)
    assert scalars["fvu"] >= 1.0


def test_several_saes_one_at_a_time_or_jointly():
    model, saes = tiny_model("llama"), saes_at("exact", "random")
    separate = evaluate_saes(model, saes, batches()).scalars()
    joint = evaluate_saes(model, saes, batches(), jointly=True).scalars()
    assert set(separate) == {"exact_0", "random_1"}
    assert set(joint) == {"exact_0", "random_1", JOINT}
    assert "ce_loss_score" not in joint["exact_0"]
    assert joint[JOINT]["kl_spliced"] == pytest.approx(separate["random_1"]["kl_spliced"])
    assert joint["random_1"]["fvu"] == separate["random_1"]["fvu"]


def test_padding_is_left_out_of_every_metric():
    model, saes = tiny_model("llama"), saes_at("random")
    input_ids = tiny_input_ids(2, 8)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    padded = evaluate_saes(
        model, saes, [{"input_ids": input_ids, "attention_mask": attention_mask}]
    )
    split = evaluate_saes(model, saes, [input_ids[:1], input_ids[1:, :5]])
    padded, split = padded.scalars()["random_0"], split.scalars()["random_0"]
    assert padded["n_tokens"] == 11  # 8 + 5 real tokens, less each sequence's first
    # Scores divide tiny differences of CE values (a random model barely uses its MLPs): compare
    # the quantities they derive from, which padding changes only by float noise: sums of ≤ ~10²
    # fp32 terms, and KLs of ~1e-5 whose error follows from their inputs' (`kl_tolerance`).
    for derived in ("ce_loss_increase", "ce_loss_score", "kl_score"):
        del padded[derived], split[derived]
    for kl in ("kl_spliced", "kl_ablated"):
        tolerance = kl_tolerance(split[kl], split["ce_clean"])
        assert padded.pop(kl) == pytest.approx(split.pop(kl), abs=tolerance, rel=0)
    assert padded == pytest.approx(split, rel=128 * FLOAT32_EPS)


FLOAT32_EPS = torch.finfo(torch.float32).eps


def kl_tolerance(kl: float, ce: float) -> float:
    """Absolute error of an fp32 KL between nearby next-token distributions.

    Each log-probability carries an error of up to ~ε·CE (fp32; different batch shapes take
    different GEMM kernels), and the KL weighs those errors by log-ratios of size ~sqrt(2·KL);
    the factor 16 covers the vocabulary sum and the kernels (measured up to ~5 with AVX2 kernels,
    where a KL of 7.5e-6 moved by 1.3e-8, 1.7e-3 of itself).
    """
    return 16 * FLOAT32_EPS * ce * math.sqrt(2 * kl)


def test_transcoder_is_scored_against_the_mlp_output():
    model = tiny_model("llama")
    transcoder = make_sae("random", transcoder=True, layer=0)
    input_ids = tiny_input_ids(2, 8)
    result = evaluate_saes(model, {"tc": transcoder}, [input_ids], language_model_metrics=False,
                           token_mask=None)
    mlp_input, mlp_output = sae_sites(model, transcoder.config)
    captured = capture_activations(model, input_ids, [mlp_input, mlp_output])
    expected = transcoder(captured[mlp_input], target=captured[mlp_output]).fvu
    assert result.activations["tc"].fvu == pytest.approx(expected.item(), rel=1e-5)
    assert result.language_model == {}


@pytest.mark.parametrize(
    ("saes", "kwargs", "match"),
    [
        ({}, {}, "no SAEs to evaluate"),
        ({"a": make_sae("random")}, {}, "SAE 'a' names no site .* config.hookpoint"),
        ({"a": hooked(make_sae("random", d=16), 0)}, {}, "SAE 'a' does not fit .*d_in=16"),
        (
            {"a": hooked(make_sae("random", base_model_name_or_path="gpt2"), 0)},
            {},
            "SAE 'a': .*trained on 'gpt2'.* allow_base_model_mismatch",
        ),
        (
            {"a": hooked(make_sae("random"), 0), "b": hooked(make_sae("random"), 0)},
            {"jointly": True},
            "several write the same site",
        ),
    ],
)
def test_mismatches_are_clear_errors(saes, kwargs, match):
    model = tiny_model("llama")
    model.config._name_or_path = "tiny/llama"
    with pytest.raises(ValueError, match=match):
        SAEEvaluator(model, saes, **kwargs)


def test_base_model_mismatch_can_be_allowed():
    model = tiny_model("llama")
    model.config._name_or_path = "tiny/llama"
    sae = hooked(make_sae("random", base_model_name_or_path="gpt2"), 0)
    with pytest.warns(UserWarning, match="trained on 'gpt2'"):
        SAEEvaluator(model, {"a": sae}, allow_base_model_mismatch=True)


def test_language_model_metrics_need_a_causal_lm():
    sae = make_sae("random", layer=0)
    with pytest.raises(ValueError, match="not a causal language model"):
        SAEEvaluator(tiny_model("bert"), {"a": sae})
    SAEEvaluator(tiny_model("bert"), {"a": sae}, language_model_metrics=False)


def test_empty_batches_are_a_clear_error():
    with pytest.raises(ValueError, match="no tokens were evaluated"):
        evaluate_saes(tiny_model("llama"), saes_at("random"), [])
