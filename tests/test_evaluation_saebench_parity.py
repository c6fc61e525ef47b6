"""Absorption matches SAEBench's `FeatureAbsorptionCalculator` on the same activations and SAE.

SAEBench runs as shipped; instead of running a TransformerLens model it is handed, through the
two model methods it calls, the very activations our first-letter data holds (the word is read
back from the prompt SAEBench builds). Its SAE is our SAE's dense encoder and `W_dec`. The SAE has
`b_dec = 0` and unit decoder rows, where SAEBench's projections (of `x`, and `a·cos` per latent)
and ours (of `x − decode(0)`, and `a·W_dec[i]·p`) coincide.
"""

import importlib.util

import pytest
import torch
from test_evaluation_absorption import ABSORBED, letter_data, letter_sae

from hf_deepsae.evaluation import evaluate_absorption

TEMPLATE = "{word} has the first letter:"


class ActivationsAsModel:
    """The two methods of a TransformerLens model SAEBench's calculator calls, answered from
    `{word: activation}`: the word sits at position -6 of a 6-position 'sequence'."""

    def __init__(self, activations: dict[str, torch.Tensor], hook: str) -> None:
        self.activations, self.hook = activations, hook

    def to_tokens(self, text: str) -> torch.Tensor:
        return torch.zeros(1, 6, dtype=torch.long)

    def run_with_cache(self, prompts, names_filter):
        batch = torch.zeros(len(prompts), 6, next(iter(self.activations.values())).shape[0])
        for row, prompt in enumerate(prompts):
            word = prompt.split("\n")[-1].removesuffix(TEMPLATE.removeprefix("{word}"))
            batch[row, 0] = self.activations[word]
        return None, {self.hook: batch}


@pytest.mark.slow
def test_absorption_matches_saebench():
    if importlib.util.find_spec("sae_bench") is None:
        pytest.skip("sae-bench is not installed (pip install --no-deps sae-bench)")
    calculator_module = pytest.importorskip(
        "sae_bench.evals.absorption.feature_absorption_calculator",
        reason="SAEBench's absorption calculator needs sae-lens and transformer-lens")
    data = letter_data(ABSORBED)
    sae = letter_sae(data, len(ABSORBED), k=2)  # two latents per word,
    with torch.no_grad():  # and a main latent that under-reads its letter
        sae.stages[0].encoder.bias[0] = -1.0
    ours = evaluate_absorption(sae, data).letters[0]
    hook = "blocks.0.hook_resid_post"
    words = [word for word, test, letter, logit in zip(
        data.words, data.is_test.tolist(), data.letters.tolist(),
        data.probe.logits(data.targets)[:, 0].tolist(), strict=True)
        if test and letter == 0 and logit > 0]
    activations = dict(zip(data.words, data.targets, strict=True))
    calculator = calculator_module.FeatureAbsorptionCalculator(
        ActivationsAsModel(activations, hook), icl_word_list=data.words, max_icl_examples=2,
        base_template=TEMPLATE, word_token_pos=-6)
    stand_in_sae = type("SAE", (), {"W_dec": sae.W_dec.detach(), "device": torch.device("cpu"),
                                    "encode": staticmethod(lambda x: sae.encode_dense(x))})()
    theirs = calculator.calculate_absorption(stand_in_sae, words, data.probe.weight[0],
                                             ours.main_latents, layer=0,
                                             show_progress=False).word_results
    assert len(theirs) == ours.n_probe_true_positives == len(words)
    fractions = [result.absorption_fraction for result in theirs]
    assert 0 < sum(fractions) / len(fractions) < 1  # partial absorption is part of the check
    assert ours.mean_absorption_fraction == pytest.approx(sum(fractions) / len(fractions))
    assert ours.n_full_absorption == sum(result.is_full_absorption for result in theirs)
