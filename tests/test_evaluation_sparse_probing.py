"""Sparse probing: a label carried by one latent, the task builders, the probes themselves."""

import shutil

import pytest
import torch
from tiny_models import tiny_model, word_tokenizer

from hf_deepsae import DeepSAEConfig, DeepSAEModel
from hf_deepsae.evaluation import (
    ProbingActivations,
    SparseProbingConfig,
    TextClassificationTask,
    binary_scores,
    default_probing_tasks,
    evaluate_sparse_probing,
    fit_logistic_regression,
    load_classification_task,
    probing_activations,
)
from hf_deepsae.evaluation.probing_tasks import BIBLE_INSTALL_HINT
from hf_deepsae.sites import Site

D = 16
TOKENS_PER_DOCUMENT = 5


def orthonormal_sae(k: int = 2) -> DeepSAEModel:
    """A shallow tied SAE whose 16 latents read and write the rows of a random rotation."""
    rows = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0)))[0].T
    sae = DeepSAEModel(DeepSAEConfig(d_in=D, n_latents=D, k=k)).eval()
    with torch.no_grad():
        sae.stages[0].encoder.weight.copy_(rows)
        sae.stages[0].encoder.bias.zero_()
        sae.stages[0].W_dec.copy_(rows)
        sae.stages[0].b_dec.zero_()
    return sae


def latent_three_task(n_documents: int = 80) -> ProbingActivations:
    """Documents of random latents 4-15; in the 'fires' half one token is latent 3 at 5."""
    sae = orthonormal_sae()
    rows = sae.stages[0].W_dec.detach()
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(n_documents) % 2
    tokens = []
    for document in range(n_documents):
        for position in range(TOKENS_PER_DOCUMENT):
            latents = torch.randint(4, D, (2,), generator=generator)
            x = (1 + torch.rand(2, 1, generator=generator)) * rows[latents]
            x = x.sum(0) + (5 * rows[3] if labels[document] and position == 2 else 0)
            tokens.append(x)
    return ProbingActivations(
        task="latent 3 fires", classes=["fires", "silent"], labels=1 - labels,
        is_test=torch.arange(n_documents) >= n_documents * 3 // 4, tokens=torch.stack(tokens),
        document=torch.arange(n_documents).repeat_interleave(TOKENS_PER_DOCUMENT),
        site=Site("x"))


def test_a_label_that_is_one_latent_firing_is_read_perfectly_at_k_1():
    result = evaluate_sparse_probing(orthonormal_sae(), [latent_three_task()],
                                     SparseProbingConfig(ks=[1, 2]))
    task = result.tasks[0]
    assert task.sae_top_k_accuracy["1"] == 1.0
    assert task.top_latents["fires"][0] == 3
    assert task.llm_accuracy == 1.0 and task.sae_accuracy == 1.0
    assert result.scalars()["sparse_probing_top_1_accuracy"] == 1.0
    assert (task.n_train, task.n_test) == (60, 20)


def test_raw_activation_probes_are_computed_once_per_task():
    task = latent_three_task()
    config = SparseProbingConfig(ks=[1])
    evaluate_sparse_probing(orthonormal_sae(), [task], config)
    cached = dict(task.llm_results)
    evaluate_sparse_probing(orthonormal_sae(k=1), [task], config)
    assert task.llm_results == cached and len(cached) == 1


def test_multiclass_tasks_average_one_against_the_rest_problems():
    task = latent_three_task()
    task.labels = torch.arange(len(task.labels)) % 3
    task.classes = ["x", "y", "z"]
    result = evaluate_sparse_probing(orthonormal_sae(), [task], SparseProbingConfig(ks=[1]))
    assert set(result.tasks[0].top_latents) == {"x", "y", "z"}


def test_activations_of_a_tiny_model_feed_the_probes():
    texts = ["ant bag cat dog egg"] * 6 + ["fan gap hat ice jam"] * 6
    task = TextClassificationTask("words", texts, ["first"] * 6 + ["second"] * 6)
    config = SparseProbingConfig(ks=[1], n_train_per_class=4, n_test_per_class=2,
                                 lm_batch_size=5)
    site = Site("model.layers.0.mlp.down_proj")
    activations = probing_activations(tiny_model("llama"), word_tokenizer(), site, task, config)
    assert activations.tokens.shape == (12 * 5, 32)  # no special tokens kept
    assert activations.labels.tolist() == [0] * 6 + [1] * 6
    assert activations.is_test.sum() == 4
    sae = DeepSAEModel(DeepSAEConfig(d_in=32, n_latents=64, k=4))
    result = evaluate_sparse_probing(sae, [activations], config)
    assert 0 <= result.sae_top_k_accuracy["1"] <= 1


def test_a_class_with_one_document_is_a_clear_error():
    task = TextClassificationTask("tiny", ["ant", "bag", "cat"], ["a", "a", "b"])
    with pytest.raises(ValueError, match="class 'b' of task 'tiny' has 1 document"):
        probing_activations(tiny_model("llama"), word_tokenizer(), Site("model.layers.0.mlp"),
                            task)


def test_a_local_csv_file_with_a_chosen_label_column(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("review,stars\ngood film,5\nbad film,1\nfine film,5\n")
    task = load_classification_task(str(path), text_column="review", label_column="stars")
    assert task.texts == ["good film", "bad film", "fine film"]
    assert task.labels == ["5", "1", "5"] and task.classes == ["1", "5"]
    with pytest.raises(ValueError, match="no column 'label'.*--label_column"):
        load_classification_task(str(path), text_column="review")


def test_offline_tasks_work_without_the_bible(monkeypatch):
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "bible" else which(name))
    source, code_vs_prose = default_probing_tasks(max_per_class=20)
    assert source.classes == ["python_docs", "stdlib_docstrings"]
    assert source.notes == [BIBLE_INSTALL_HINT]
    assert code_vs_prose.classes == ["code", "prose"] and len(code_vs_prose.texts) == 40


@pytest.mark.skipif(shutil.which("bible") is None, reason="bible-kjv is not installed")
def test_offline_source_task_has_three_corpora_with_the_bible():
    source, _ = default_probing_tasks(max_per_class=10)
    assert source.classes == ["bible_kjv", "python_docs", "stdlib_docstrings"]
    assert source.notes == []


def test_logistic_regression_separates_and_l1_keeps_the_informative_feature():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 10, generator=generator) * torch.arange(1, 11)
    labels = features[:, 3] > 0.5
    probe = fit_logistic_regression(features, labels)
    assert binary_scores(probe.predict(features)[:, 0], labels).accuracy == 1.0
    sparse = fit_logistic_regression(features, labels, l1=0.05)
    assert sparse.weight[0].abs().argmax() == 3
    assert (sparse.weight[0] != 0).sum() < 10


def test_a_probe_needs_both_classes():
    with pytest.raises(ValueError, match=r"probe outputs \[1\] have a single class"):
        fit_logistic_regression(torch.randn(6, 2), torch.tensor([[1, 1], [0, 1]] * 3).bool())


def test_binary_scores_count_precision_recall_and_f1():
    scores = binary_scores(torch.tensor([1, 1, 0, 0]).bool(), torch.tensor([1, 0, 1, 1]).bool())
    assert (scores.accuracy, scores.precision, scores.recall) == (0.25, 0.5, pytest.approx(1 / 3))
    assert scores.f1 == pytest.approx(0.4)
