"""Detection and fuzzing scores match EleutherAI delphi's on the same examples and verdict rule.

delphi's scorers run as shipped (`DetectionScorer`, `FuzzingScorer`, `compute_confusion` +
`compute_classification_metrics`), with a delphi `Client` that applies the same deterministic
rule as our judge to the texts delphi puts in its prompts. Needs `pip install --no-deps
eai-delphi` and its light dependencies `orjson blobfile asyncer tiktoken`; delphi's heavy imports
that these scorers never call (vLLM, faiss, sentence-transformers) are stood in for while it is
imported.
"""

import importlib.util
import re
import sys
import types

import pytest
import torch
from test_interpret import word_tokenizer
from test_interpret_scoring import example, imperfect_latent

from hf_deepsae.interpret import highlighted_text, plain_text, score_latent, token_strings

UNUSED_HEAVY_MODULES = ("vllm", "vllm.distributed", "vllm.distributed.parallel_state",
                        "vllm.inputs", "faiss", "sentence_transformers")
EXPLANATION = " w10"


def token_rule(texts: list[str], marked: bool) -> list[bool]:
    """The judge of both sides: fuzzing marks are right when every marked span is the explained
    token; detection says the latent is there when the text holds it."""
    if marked:
        return [all(span == EXPLANATION for span in re.findall(r"<<(.*?)>>", t)) for t in texts]
    return [EXPLANATION in text for text in texts]


class RuleJudge:
    def explain(self, examples):
        return EXPLANATION

    def detect(self, explanation, texts):
        return token_rule(texts, marked=False)

    def fuzz(self, explanation, texts):
        return token_rule(texts, marked=True)


@pytest.fixture(scope="module")
def delphi():
    if importlib.util.find_spec("delphi") is None:
        pytest.skip("eai-delphi is not installed: pip install --no-deps eai-delphi; "
                    "pip install orjson blobfile asyncer tiktoken")
    missing = [name for name in UNUSED_HEAVY_MODULES if name not in sys.modules
               and importlib.util.find_spec(name.split(".")[0]) is None]
    for name in missing:
        stand_in = types.ModuleType(name)
        stand_in.__getattr__ = lambda attribute: type(attribute, (), {})
        sys.modules[name] = stand_in
    try:
        modules = [importlib.import_module(name) for name in (
            "delphi.clients.client", "delphi.latents", "delphi.log.result_analysis",
            "delphi.scorers")]
    except ImportError as error:
        pytest.skip(f"delphi's scorers cannot be imported here: {error}")
    finally:
        for name in missing:
            del sys.modules[name]
    return types.SimpleNamespace(**{name: value for module in modules
                                    for name, value in vars(module).items()})


def delphi_client(delphi, marked: bool):
    class RuleClient(delphi.Client):
        def __init__(self):
            super().__init__("rule")
            self.texts = []

        async def generate(self, prompt, **kwargs):
            examples = re.findall(r"^Example \d+: (.*)$", prompt[-1]["content"], re.MULTILINE)
            self.texts += examples
            return delphi.Response("[" + ",".join(str(int(v)) for v in token_rule(
                examples, marked)) + "]")

    return RuleClient()


def delphi_record(delphi, latent_examples, tokenizer, negatives):
    def strings(example):
        return token_strings(tokenizer, example.tokens)

    record = delphi.LatentRecord(delphi.Latent("layer", latent_examples.latent))
    record.test = [delphi.ActivatingExample(
        tokens=torch.tensor(e.tokens), activations=torch.tensor(e.activations),
        str_tokens=strings(e), quantile=e.quantile)
        for bin_ in latent_examples.quantiles for e in bin_]
    record.not_active = [delphi.NonActivatingExample(
        tokens=torch.tensor(e.tokens), activations=torch.zeros(len(e.tokens)),
        str_tokens=strings(e), distance=-1.0) for e in negatives]
    record.explanation = EXPLANATION
    return record


def delphi_scores(delphi, scorer_class, record, marked: bool):
    import pandas as pd

    client = delphi_client(delphi, marked)
    outputs = scorer_class(client, n_examples_shown=4).call_sync(record).score  # full batches
    assert all(output.prediction is not None for output in outputs)
    frame = pd.DataFrame([{"activating": o.activating, "prediction": o.prediction,
                           "distance": o.distance} for o in outputs])
    metrics = delphi.compute_classification_metrics(delphi.compute_confusion(frame))
    per_quantile = frame[frame.activating].groupby("distance").prediction.mean().to_dict()
    return metrics, per_quantile, client.texts


@pytest.mark.slow
@pytest.mark.parametrize("scorer", ["detection", "fuzzing"])
def test_scores_match_delphi_on_the_same_examples(delphi, scorer):
    tokenizer, examples = word_tokenizer(), imperfect_latent()
    if scorer == "fuzzing":  # negatives without the explained token: any random mark is wrong
        examples.neighbour_negatives = [example([40, 41], neighbour=1),
                                        example([42, 43], neighbour=1)]
    negatives = examples.neighbour_negatives + examples.random_negatives[:2]
    judge = RuleJudge()
    ours = score_latent(examples, judge, judge, tokenizer, firing_rate=0.01)
    ours = ours.fuzzing if scorer == "fuzzing" else ours
    record = delphi_record(delphi, examples, tokenizer, negatives)
    scorer_class = delphi.FuzzingScorer if scorer == "fuzzing" else delphi.DetectionScorer
    metrics, per_quantile, texts = delphi_scores(delphi, scorer_class, record,
                                                 scorer == "fuzzing")
    positives = [e for bin_ in examples.quantiles for e in bin_]
    if scorer == "fuzzing":
        expected = {highlighted_text(e, tokenizer) for e in positives}
        assert expected <= set(texts)  # positives marked exactly as delphi marks them
        assert all(text.count("<<") == 1 for text in set(texts) - expected)
    else:
        assert {plain_text(e, tokenizer) for e in positives + negatives} == set(texts)
    assert ours.recall == pytest.approx(metrics["true_positive_rate"])
    assert ours.specificity == pytest.approx(metrics["true_negative_rate"])
    assert ours.balanced_accuracy == pytest.approx(metrics["accuracy"])  # delphi's is balanced
    assert ours.recall_per_quantile == [pytest.approx(per_quantile[q]) for q in (0, 1)]
