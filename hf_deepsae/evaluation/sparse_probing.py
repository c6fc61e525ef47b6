"""Sparse probing (Gurnee et al. 2023; SAEBench's `sparse_probing`): do a few latents carry a label?

For each task (`probing_tasks.py`) and each class, a balanced binary problem "this class or
another" (one problem for two-class tasks) over documents, each represented by the mean of its
tokens (special tokens left out) at the SAE's read site:

- `llm_accuracy`: a logistic-regression probe on the raw mean activations (the ceiling);
- `llm_top_k_accuracy[k]`: the same on the k activation dimensions whose class means differ most;
- `sae_accuracy`: a probe on all mean-pooled latents;
- `sae_top_k_accuracy[k]`: on the k latents whose class means differ most (k-sparse probing).

Test accuracy on held-out documents, averaged over a task's problems, then over tasks. A latent
that fires exactly when the label holds gives `sae_top_k_accuracy["1"] = 1`. The activations of
a task (`probing_activations`) are computed once and serve every SAE at that site.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ..modeling_deepsae import DeepSAEModel
from ..sites import Site, capture_activations
from .latent_effects import compact_latents, sparse_latents
from .probes import (
    binary_scores,
    fit_logistic_regression,
    prefix_probes,
    top_mean_difference,
)
from .probing_tasks import TextClassificationTask


@dataclass
class SparseProbingConfig:
    """How tasks are sampled and probed."""

    ks: list[int] = field(default_factory=lambda: [1, 2, 5, 20], metadata={
        "help": "numbers of latents (and activation dimensions) the sparse probes may read"})
    n_train_per_class: int = field(default=300, metadata={
        "help": "training documents per class (fewer if the task has fewer)"})
    n_test_per_class: int = field(default=100, metadata={"help": "test documents per class"})
    context_length: int = field(default=128, metadata={"help": "tokens read per document"})
    probe_l2: float = field(default=1e-3, metadata={
        "help": "L2 penalty of every probe (standardised features)"})
    lm_batch_size: int = field(default=16, metadata={"help": "documents per forward pass"})
    seed: int = field(default=42, metadata={"help": "seed of the document sample and split"})

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be positive numbers of latents, got {self.ks}")
        if min(self.n_train_per_class, self.n_test_per_class) < 1:
            raise ValueError("n_train_per_class and n_test_per_class must be at least 1")


@dataclass
class ProbingActivations:
    """One task's documents at one site: token activations, their documents, labels, split.

    Args:
        task: the task's name; `classes` its class names; `notes` what was left out building it.
        labels: `[n_documents]` class index.
        is_test: `[n_documents]` bool.
        tokens: `[n_tokens, d]` activations of every kept (non-special) token.
        document: `[n_tokens]` the document of each token.
        site: where the activations were read.
    """

    task: str
    classes: list[str]
    labels: Tensor
    is_test: Tensor
    tokens: Tensor
    document: Tensor
    site: Site
    notes: list[str] = field(default_factory=list)

    llm_results: dict[tuple, tuple[list[float], dict[str, list[float]]]] = field(
        default_factory=dict, repr=False)
    """Probe accuracies on the raw activations per settings: they serve every SAE."""

    def token_counts(self) -> Tensor:
        """`[n_documents]` kept tokens per document (at least 1, to divide by)."""
        return torch.bincount(self.document, minlength=len(self.labels)).clamp_min(1)

    def pooled(self, features: Tensor) -> Tensor:
        """`[n_documents, f]` mean of per-token `features` `[n_tokens, f]` over each document."""
        sums = torch.zeros(len(self.labels), features.shape[1]).index_add_(0, self.document,
                                                                           features)
        return sums / self.token_counts().unsqueeze(1)


@dataclass
class ProbingTaskResult:
    """Accuracies of one task (means over its binary problems), keys of `*_top_k_*` are `str(k)`.

    `top_latents[class]` lists the latents the largest-k probe of that problem read, best first.
    """

    task: str
    classes: list[str]
    n_train: int
    n_test: int
    llm_accuracy: float
    llm_top_k_accuracy: dict[str, float]
    sae_accuracy: float
    sae_top_k_accuracy: dict[str, float]
    top_latents: dict[str, list[int]]
    notes: list[str] = field(default_factory=list)


@dataclass
class SparseProbingResult:
    """Means over tasks of `ProbingTaskResult`'s accuracies, and the tasks themselves."""

    ks: list[int]
    llm_accuracy: float
    llm_top_k_accuracy: dict[str, float]
    sae_accuracy: float
    sae_top_k_accuracy: dict[str, float]
    tasks: list[ProbingTaskResult]

    def scalars(self) -> dict[str, float]:
        """The headline numbers under model-card names (`hf_deepsae.model_card.METRICS`)."""
        return {"sparse_probing_llm_accuracy": self.llm_accuracy,
                "sparse_probing_sae_accuracy": self.sae_accuracy,
                **{f"sparse_probing_top_{k}_accuracy": value
                   for k, value in self.sae_top_k_accuracy.items()}}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _balanced_sample(task: TextClassificationTask, config: SparseProbingConfig
                     ) -> tuple[list[int], list[bool]]:
    """Document indices (train then test per class, seeded) and whether each is a test one."""
    rng = random.Random(config.seed)
    chosen, is_test = [], []
    for name in task.classes:
        members = [i for i, label in enumerate(task.labels) if label == name]
        rng.shuffle(members)
        n_test = min(config.n_test_per_class, len(members) // 2)
        n_train = min(config.n_train_per_class, len(members) - n_test)
        if n_test < 1:
            raise ValueError(f"class {name!r} of task {task.name!r} has {len(members)} document(s);"
                             " sparse probing needs at least 2 per class (one to test)")
        chosen += members[:n_train + n_test]
        is_test += [False] * n_train + [True] * n_test
    return chosen, is_test


@torch.no_grad()
def probing_activations(model: nn.Module, tokenizer: PreTrainedTokenizerBase, site: Site,
                        task: TextClassificationTask, config: SparseProbingConfig | None = None
                        ) -> ProbingActivations:
    """Token activations at `site` (an SAE's read site) of a balanced sample of `task`."""
    config = config or SparseProbingConfig()
    if len(task.classes) < 2:
        raise ValueError(f"task {task.name!r} has the classes {task.classes}; probing needs two")
    chosen, is_test = _balanced_sample(task, config)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    tokens, documents = [], []
    for first in range(0, len(chosen), config.lm_batch_size):
        texts = [task.texts[i] for i in chosen[first:first + config.lm_batch_size]]
        encoded = [tokenizer.encode(text, truncation=True, max_length=config.context_length)
                   for text in texts]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids in encoded])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in encoded])
        activations = capture_activations(model, input_ids.to(device), [site], mask.to(device))
        keep = mask.bool() & ~torch.isin(input_ids, special)
        tokens.append(activations[site][keep.to(device)].float().cpu())
        documents.append((torch.arange(len(texts)) + first).unsqueeze(1).expand_as(keep)[keep])
    labels = torch.tensor([task.classes.index(task.labels[i]) for i in chosen])
    return ProbingActivations(task.name, task.classes, labels, torch.tensor(is_test),
                              torch.cat(tokens), torch.cat(documents), site, list(task.notes))


def _accuracy(features: Tensor, positive: Tensor, is_test: Tensor, l2: float) -> float:
    probe = fit_logistic_regression(features[~is_test], positive[~is_test], l2=l2)
    return binary_scores(probe.predict(features[is_test])[:, 0], positive[is_test]).accuracy


def _binary_problems(activations: ProbingActivations, seed: int) -> list[tuple[str, Tensor]]:
    """`(class, rows)` per one-vs-rest problem: the class's documents and as many of the others
    (drawn evenly, seeded) in each split; one problem for two classes."""
    generator = torch.Generator().manual_seed(seed)
    problems = []
    for index, name in enumerate(activations.classes[:1 if len(activations.classes) == 2
                                                      else None]):
        rows = []
        for split in (False, True):
            in_split = activations.is_test == split
            positives = (in_split & (activations.labels == index)).nonzero()[:, 0]
            others = (in_split & (activations.labels != index)).nonzero()[:, 0]
            others = others[torch.randperm(len(others), generator=generator)[:len(positives)]]
            rows += [positives, others]
        problems.append((name, torch.cat(rows)))
    return problems


def _probe_accuracies(activations: ProbingActivations, features: Tensor,
                      config: SparseProbingConfig) -> tuple[list[float], dict[str, list[float]],
                                                            dict[str, list[int]]]:
    """Per binary problem: accuracy on all `features`, on the top k of them per k, and the
    features the largest-k probe read."""
    scores, top_k, chosen_features = [], {str(k): [] for k in config.ks}, {}
    for name, rows in _binary_problems(activations, config.seed):
        positive = activations.labels[rows] == activations.classes.index(name)
        is_test = activations.is_test[rows]
        scores.append(_accuracy(features[rows], positive, is_test, config.probe_l2))
        ks = sorted(config.ks)
        chosen = top_mean_difference(features[rows][~is_test], positive[~is_test], ks[-1])
        ks = [min(k, len(chosen)) for k in ks]
        ranked = features[rows][:, chosen]
        probe = prefix_probes(ranked[~is_test], positive[~is_test], ks, l2=config.probe_l2)
        predicted = probe.predict(ranked[is_test])
        for j, k in enumerate(sorted(config.ks)):
            top_k[str(k)].append(binary_scores(predicted[:, j], positive[is_test]).accuracy)
        chosen_features[name] = chosen.tolist()
    return scores, top_k, chosen_features


def _task_result(activations: ProbingActivations, latents: Tensor, columns: Tensor,
                 config: SparseProbingConfig) -> ProbingTaskResult:
    key = (tuple(config.ks), config.probe_l2, config.seed)
    if key not in activations.llm_results:
        llm = _probe_accuracies(activations, activations.pooled(activations.tokens), config)
        activations.llm_results[key] = llm[:2]
    llm_scores, llm_top_k = activations.llm_results[key]
    sae_scores, sae_top_k, top_latents = _probe_accuracies(activations, latents, config)
    n_test = int(activations.is_test.sum())
    return ProbingTaskResult(
        task=activations.task, classes=activations.classes,
        n_train=len(activations.labels) - n_test, n_test=n_test,
        llm_accuracy=_mean(llm_scores), sae_accuracy=_mean(sae_scores),
        llm_top_k_accuracy={k: _mean(v) for k, v in llm_top_k.items()},
        sae_top_k_accuracy={k: _mean(v) for k, v in sae_top_k.items()},
        top_latents={name: columns[chosen].tolist() for name, chosen in top_latents.items()},
        notes=activations.notes)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@torch.no_grad()
def evaluate_sparse_probing(sae: DeepSAEModel, tasks: list[ProbingActivations],
                            config: SparseProbingConfig | None = None) -> SparseProbingResult:
    """Sparse probing of `sae` on tasks whose activations were read at its read site."""
    config = config or SparseProbingConfig()
    results = []
    for activations in tasks:
        if activations.tokens.shape[1] != sae.config.d_in:
            raise ValueError(f"task {activations.task!r} has activations of width "
                             f"{activations.tokens.shape[1]}, the SAE reads d_in="
                             f"{sae.config.d_in}; build them at its read site")
        values, ids = sparse_latents(sae, activations.tokens)
        sums, columns = compact_latents(values, ids, activations.document,
                                        len(activations.labels))
        pooled = sums / activations.token_counts().unsqueeze(1)
        results.append(_task_result(activations, pooled, columns, config))
    ks = [str(k) for k in config.ks]
    return SparseProbingResult(
        ks=list(config.ks),
        llm_accuracy=_mean([r.llm_accuracy for r in results]),
        llm_top_k_accuracy={k: _mean([r.llm_top_k_accuracy[k] for r in results]) for k in ks},
        sae_accuracy=_mean([r.sae_accuracy for r in results]),
        sae_top_k_accuracy={k: _mean([r.sae_top_k_accuracy[k] for r in results]) for k in ks},
        tasks=results)
