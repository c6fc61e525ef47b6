"""Detection and fuzzing scores: exact accuracies with a deterministic judge; judges' plumbing."""

import re

import pytest
import torch
from test_interpret import word_tokenizer
from tiny_models import judge_tokenizer, tiny_model

from hf_deepsae.interpret import (
    ChatJudge,
    ClassificationScores,
    Example,
    LatentExamples,
    ScoringConfig,
    TransformersJudge,
    highlighted_text,
    score_latent,
    summarize,
)


class TokenJudge:
    """Explains a latent by the first marked token; detects texts holding that token."""

    def __init__(self) -> None:
        self.seen: list[list[str]] = []

    def explain(self, examples):
        self.seen.append(list(examples))
        return re.search(r"<<(.*?)>>", examples[0]).group(1)

    def detect(self, explanation, texts):
        return [explanation in text for text in texts]


class MarkJudge(TokenJudge):
    """Also fuzzes: the marks are right when every marked span is the explained token."""

    def __init__(self) -> None:
        super().__init__()
        self.fuzzed: list[str] = []

    def fuzz(self, explanation, texts):
        self.fuzzed += texts
        return [all(span == explanation for span in re.findall(r"<<(.*?)>>", text))
                for text in texts]


def example(tokens, activations=None, quantile=None, neighbour=None):
    return Example(window=tokens[0], tokens=tokens, activations=activations or [0.0] * len(tokens),
                   quantile=quantile, neighbour=neighbour, similarity=None if neighbour is None
                   else 0.5)


def latent_examples(latent, top, quantiles, neighbour_negatives, random_negatives,
                    n_activating=10, window_firing_rate=0.1):
    return LatentExamples(latent, n_activating, window_firing_rate, top, [(0.0, 1.0), (1.0, 2.0)],
                          quantiles, random_negatives, neighbour_negatives, [])


def imperfect_latent() -> LatentExamples:
    """Explained as ' w10' (its top example's marked token): which contexts hold it sets every
    score below."""
    return latent_examples(
        0,
        top=[example([10, 20], [4.0, 0.0])],
        quantiles=[[example([22, 23], [0.0, 1.0], quantile=0), example([10, 21], [1.0, 0.0], 0)],
                   [example([10, 24], [3.0, 0.0], 1), example([10, 25], [3.0, 0.0], 1)]],
        neighbour_negatives=[example([10, 30], neighbour=1), example([10, 32], neighbour=1)],
        random_negatives=[example([33, 34]), example([35, 36]), example([37, 38])],
    )


def perfect_latent() -> LatentExamples:
    return latent_examples(
        1,
        top=[example([11, 40], [1.0, 0.0])],
        quantiles=[[example([11, 41], [1.0, 0.0], 0)], [example([11, 42], [2.0, 0.0], 1)]],
        neighbour_negatives=[example([43, 44], neighbour=0)],
        random_negatives=[example([45, 46])],
    )


def test_detection_scores_with_neighbour_negatives_are_exact():
    judge = TokenJudge()
    score = score_latent(imperfect_latent(), judge, judge, word_tokenizer(), firing_rate=0.01)
    assert score.status == "scored" and score.explanation == " w10"
    # positives: ' w22 w23' missed; the other three hold ' w10'
    assert score.recall == 0.75 and score.recall_per_quantile == [0.5, 1.0]
    # negatives: both neighbour contexts hold ' w10' (false positives), two random ones fill up
    assert (score.n_positives, score.n_neighbour_negatives, score.n_random_negatives) == (4, 2, 2)
    assert score.specificity == 0.5
    assert score.balanced_accuracy == 0.625
    assert score.accuracy == pytest.approx(0.1 * 0.75 + 0.9 * 0.5)  # at the true firing rate
    # quantile halves: the low bin's first example marks ' w23', the high bin's ' w10'; judged on
    # top + negatives (' w10 w20', ' w10 w30', ' w10 w32', ' w33 w34', ' w35 w36') they agree twice
    assert score.quantile_explanations == {"high": " w10", "low": " w23"}
    assert score.quantile_agreement == pytest.approx(2 / 5)


def test_fuzzing_marks_positives_where_the_latent_fires_and_negatives_at_random():
    judge = MarkJudge()
    score = score_latent(imperfect_latent(), judge, judge, word_tokenizer(), 0.01)
    positives = ["<< w10>> w24", "<< w10>> w25", "<< w10>> w21", " w22<< w23>>"]
    assert sorted(positives) == sorted(text for text in judge.fuzzed if text in positives)
    negatives = [text for text in judge.fuzzed if text not in positives]
    # each positive has one active token, so each negative gets one random token marked
    assert len(negatives) == 4 and all(text.count("<<") == 1 for text in negatives)
    fuzzing = score.fuzzing
    assert (fuzzing.n_positives, fuzzing.n_negatives) == (4, 4)
    assert fuzzing.recall == 0.75 and fuzzing.recall_per_quantile == [0.5, 1.0]
    wrong = sum(text in ("<< w10>> w30", "<< w10>> w32") for text in negatives)
    assert fuzzing.specificity == (4 - wrong) / 4
    assert fuzzing.balanced_accuracy_per_quantile == [(0.5 + fuzzing.specificity) / 2,
                                                      (1.0 + fuzzing.specificity) / 2]


def test_detection_per_quantile_balanced_accuracy_and_drop_off():
    judge = TokenJudge()
    score = score_latent(imperfect_latent(), judge, judge, word_tokenizer(), 0.01)
    assert score.balanced_accuracy_per_quantile == [0.5, 0.75]  # (recall_q + 0.5) / 2
    assert score.fuzzing is None  # TokenJudge cannot fuzz
    summary = summarize([score])
    assert summary["mean_balanced_accuracy_per_quantile"] == [0.5, 0.75]
    assert summary["quantile_drop_off"] == 0.25
    assert summary["n_fuzzed"] == 0 and summary["fuzzing_mean_balanced_accuracy"] is None


def test_fuzzing_can_be_turned_off():
    judge = MarkJudge()
    score = score_latent(perfect_latent(), judge, judge, word_tokenizer(), 0.01,
                         ScoringConfig(fuzzing=False))
    assert score.fuzzing is None and judge.fuzzed == []


def test_summary_of_fuzzing_counts_perfect_latents_and_weights_by_firing_rate():
    judge = MarkJudge()
    scores = [score_latent(perfect_latent(), judge, judge, word_tokenizer(), 0.03),
              score_latent(imperfect_latent(), judge, judge, word_tokenizer(), 0.01)]
    summary = summarize(scores)
    perfect, imperfect = (s.fuzzing.balanced_accuracy for s in scores)
    assert perfect == 1.0 and summary["fuzzing_perfect_fraction"] == 0.5
    assert summary["fuzzing_firing_rate_weighted_balanced_accuracy"] == pytest.approx(
        (perfect * 0.03 + imperfect * 0.01) / 0.04)
    assert isinstance(scores[0].fuzzing, ClassificationScores)
    assert scores[0].to_dict()["fuzzing"]["recall"] == 1.0


def test_latents_are_scored_the_same_in_threads():
    judge = MarkJudge()
    items = [imperfect_latent(), perfect_latent()]
    statistics = type("Rates", (), {"firing_rate": torch.tensor([0.01, 0.03]), "n_latents": 2})()
    from hf_deepsae.interpret import score_latents

    serial = score_latents(items, judge, judge, word_tokenizer(), statistics)
    threaded = score_latents(items, judge, judge, word_tokenizer(), statistics, max_workers=2)
    assert [s.to_dict() for s in threaded] == [s.to_dict() for s in serial]


def test_random_negatives_make_the_same_explanation_look_better():
    judge = TokenJudge()
    score = score_latent(imperfect_latent(), judge, judge, word_tokenizer(), 0.01,
                         ScoringConfig(negatives="random", quantile_agreement=False))
    assert (score.n_neighbour_negatives, score.n_random_negatives) == (0, 3)
    assert score.specificity == 1.0 and score.balanced_accuracy == 0.875
    assert score.quantile_agreement is None


def test_the_explainer_sees_the_top_examples_with_marked_tokens():
    judge = TokenJudge()
    score_latent(imperfect_latent(), judge, judge, word_tokenizer(), 0.01)
    assert judge.seen[0] == ["<< w10>> w20"]
    assert highlighted_text(example([10, 11, 12], [1.0, 0.5, 0.1]), word_tokenizer()) == \
        "<< w10 w11>> w12"


def test_summary_weights_by_firing_rate_and_counts_dead_latents():
    judge = TokenJudge()
    dead = latent_examples(2, [], [[], []], [], [example([50, 51])], n_activating=0,
                           window_firing_rate=0.0)
    scores = [score_latent(imperfect_latent(), judge, judge, word_tokenizer(), 0.01),
              score_latent(perfect_latent(), judge, judge, word_tokenizer(), 0.03),
              score_latent(dead, judge, judge, word_tokenizer(), 0.0)]
    assert [score.status for score in scores] == ["scored", "scored", "dead"]
    assert scores[1].balanced_accuracy == 1.0 and scores[1].accuracy == 1.0
    summary = summarize(scores)
    assert (summary["n_latents_selected"], summary["n_scored"], summary["n_dead"]) == (3, 2, 1)
    assert summary["mean_balanced_accuracy"] == pytest.approx((0.625 + 1.0) / 2)
    assert summary["firing_rate_weighted_balanced_accuracy"] == pytest.approx(
        (0.625 * 0.01 + 1.0 * 0.03) / 0.04)
    assert summary["firing_rate_weighted_accuracy"] == pytest.approx(
        (0.525 * 0.01 + 1.0 * 0.03) / 0.04)
    assert summary["perfect_fraction"] == 0.5
    assert summary["mean_quantile_agreement"] == pytest.approx((0.4 + 1.0) / 2)


def test_latents_without_held_out_positives_or_negatives_are_reported_not_scored():
    judge = TokenJudge()
    only_top = latent_examples(3, [example([10, 11], [1.0, 0.0])], [[], []], [], [])
    everywhere = latent_examples(4, [example([10, 11], [1.0, 0.0])],
                                 [[example([10, 12], [1.0, 0.0], 0)], []], [], [])
    statuses = [score_latent(item, judge, judge, word_tokenizer(), 0.5).status
                for item in (only_top, everywhere)]
    assert statuses == ["too_few_examples", "no_negatives"]


def test_chat_judge_reads_numbered_verdicts_from_any_chat_function():
    requests = []

    def chat(messages):
        requests.append(messages)
        if "What does the feature detect?" in messages[-1]["content"]:
            return '"numbers in code"\nBecause...'
        return "1: yes\n2. No\n3) YES"  # text 4 of the batch gets no verdict: counted as "no"

    judge = ChatJudge(chat, batch_size=4)
    assert judge.explain(["<<1>> + 2"]) == "numbers in code"
    assert judge.detect("numbers", ["a", "b", "c", "d", "e"]) == [True, False, True, False, True]
    assert len(requests) == 3 and "1. a" in requests[1][-1]["content"]


def test_chat_judge_fuzzes_with_marked_texts_and_reads_a_lone_yes():
    requests = []

    def chat(messages):
        requests.append(messages[-1]["content"])
        return "Yes, they are."

    judge = ChatJudge(chat, batch_size=4)
    assert judge.fuzz("numbers", ["<<1>> + 2"]) == [True]
    assert "<<1>> + 2" in requests[0] and "marked tokens correct" in requests[0]


def test_transformers_judge_batches_detection_exactly_like_single_texts():
    judge = TransformersJudge(tiny_model("llama"), judge_tokenizer(), max_new_tokens=4,
                              batch_size=3)
    assert judge.answer_ids == [[1], [2]]
    texts = ["w5", "w6 w7 w8 w9 w10", "w11 w12", "w13 w14 w15 w16", "w17"]
    batched = judge.detect("w20 w21", texts)
    assert batched == [judge.detect("w20 w21", [text])[0] for text in texts]
    assert isinstance(judge.explain(["<<w5>> w6"]), str)


def test_unknown_negative_source_is_rejected():
    with pytest.raises(ValueError, match="negatives"):
        ScoringConfig(negatives="hard")


@pytest.mark.slow
def test_detection_verdicts_of_the_offline_default_model():
    from hf_deepsae.activations import load_language_model

    model, tokenizer = load_language_model()
    judge = TransformersJudge(model, tokenizer, max_new_tokens=24)
    verdicts = judge.detect("the word 'cat'", ["The cat sat on the mat.", "Stock prices fell."])
    assert len(verdicts) == 2 and all(isinstance(v, bool) for v in verdicts)
    explanation = judge.explain(["The <<cat>> purred.", "A <<cat>> climbed the tree."])
    assert explanation and "\n" not in explanation
    assert torch.is_inference_mode_enabled() is False
