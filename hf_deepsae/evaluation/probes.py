"""Linear probes for the probing benchmarks: logistic regression in torch, k-sparse selection, F1.

Absorption and sparse probing both ask "how well does a linear read-out of these features predict
that label?", over a model's activations or over an SAE's latents. `fit_logistic_regression` fits
one-vs-rest logistic regression probes full-batch (L-BFGS, or FISTA when an L1 penalty makes the
loss non-smooth) on standardised features, so the penalties mean the same for activations of any
scale and for latents of any magnitude; the returned `LinearProbe` reads the raw features.
`top_mean_difference` picks the k features whose means differ most between the classes (the
selection of Gurnee et al. 2023 and SAEBench's sparse probing), `prefix_probes` fits the probes
on the top 1, 2, ... k of them in one batch, and `binary_scores` gives accuracy, precision, recall
and F1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor


@dataclass
class LinearProbe:
    """`logits = features @ weight.T + bias`: one output per probe (one-vs-rest).

    Args:
        weight: `[n_outputs, d]` weights on the raw (unstandardised) features.
        bias: `[n_outputs]` biases.
    """

    weight: Tensor
    bias: Tensor

    def logits(self, features: Tensor) -> Tensor:
        """`[n, n_outputs]` logits of `[n, d]` features."""
        return features.to(self.weight.dtype) @ self.weight.T + self.bias

    def predict(self, features: Tensor) -> Tensor:
        """`[n, n_outputs]` bool: positive where the logit is above 0."""
        return self.logits(features) > 0

    @property
    def directions(self) -> Tensor:
        """`[n_outputs, d]` unit-norm weight rows: the direction each probe reads."""
        return self.weight / self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass
class BinaryScores:
    """Accuracy, precision, recall and F1 of binary predictions (0 where a ratio is 0/0)."""

    accuracy: float
    precision: float
    recall: float
    f1: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def binary_scores(predicted: Tensor, actual: Tensor) -> BinaryScores:
    """Scores of bool predictions `[n]` against bool labels `[n]`."""
    predicted, actual = predicted.bool().reshape(-1), actual.bool().reshape(-1)
    if predicted.shape != actual.shape or predicted.numel() == 0:
        raise ValueError(f"predictions {tuple(predicted.shape)} and labels {tuple(actual.shape)} "
                         "must be non-empty and of the same length")
    true_positives = float((predicted & actual).sum())
    precision = true_positives / float(predicted.sum()) if predicted.any() else 0.0
    recall = true_positives / float(actual.sum()) if actual.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = float((predicted == actual).double().mean())
    return BinaryScores(accuracy, precision, recall, f1)


def top_mean_difference(features: Tensor, positive: Tensor, k: int) -> Tensor:
    """`[k]` ids of the features whose mean differs most (in absolute value) between the rows
    where `positive` is true and the others, largest difference first (ties: lower id first)."""
    positive = positive.bool()
    if positive.all() or not positive.any():
        raise ValueError("selecting features by mean difference needs both classes among the rows")
    difference = (features[positive].float().mean(0) - features[~positive].float().mean(0)).abs()
    return difference.argsort(descending=True, stable=True)[:k]


def prefix_probes(features: Tensor, labels: Tensor, ks: list[int], *, l2: float = 1e-3
                  ) -> LinearProbe:
    """One probe per k in `ks` reading only the first k columns of `features` `[n, d]` (e.g.
    features ranked best first), all fitted in one batch: output j is the k = `ks[j]` probe."""
    mask = torch.arange(features.shape[1]).unsqueeze(0) < torch.tensor(ks).unsqueeze(1)
    return fit_logistic_regression(features, labels.reshape(-1, 1).expand(-1, len(ks)), l2=l2,
                                   feature_mask=mask)


def _class_weights(targets: Tensor) -> Tensor:
    """`[n, c]` per-row weights making each output's classes count equally (sklearn's balanced)."""
    n_rows = targets.shape[0]
    n_positive = targets.sum(0)
    missing = ((n_positive == 0) | (n_positive == n_rows)).nonzero()[:, 0].tolist()
    if missing:
        raise ValueError(f"probe outputs {missing[:8]} have a single class among the {n_rows} "
                         "rows; a probe needs positive and negative examples")
    positive_weight = n_rows / (2 * n_positive)
    negative_weight = n_rows / (2 * (n_rows - n_positive))
    return torch.where(targets, positive_weight, negative_weight)


def _loss(weight: Tensor, bias: Tensor, features: Tensor, targets: Tensor, row_weights: Tensor,
          l2: float, mask: Tensor) -> Tensor:
    logits = features @ (weight * mask).T + bias
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, targets.to(logits.dtype), weight=row_weights, reduction="sum")
    return bce / features.shape[0] + 0.5 * l2 * weight.pow(2).sum()


def _fit_lbfgs(features: Tensor, targets: Tensor, row_weights: Tensor, l2: float,
               max_iter: int, mask: Tensor) -> tuple[Tensor, Tensor]:
    weight = torch.zeros(targets.shape[1], features.shape[1], requires_grad=True)
    bias = torch.zeros(targets.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter,
                                  tolerance_grad=1e-6, tolerance_change=1e-10,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = _loss(weight, bias, features, targets, row_weights, l2, mask)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach() * mask, bias.detach()


def _largest_eigenvalue(features: Tensor, iterations: int = 30) -> float:
    """Largest eigenvalue of `[X, 1]ᵀ[X, 1] / n` by power iteration (the loss's curvature bound)."""
    augmented = torch.cat([features, torch.ones(features.shape[0], 1)], dim=1)
    vector = torch.ones(augmented.shape[1]) / augmented.shape[1] ** 0.5
    value = 0.0
    for _ in range(iterations):
        product = augmented.T @ (augmented @ vector) / features.shape[0]
        value = float(product.norm())
        vector = product / max(value, 1e-12)
    return value


def _fit_fista(features: Tensor, targets: Tensor, row_weights: Tensor, l1: float, l2: float,
               max_iter: int, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Accelerated proximal gradient (FISTA) with the step 1/L of the smooth part's curvature."""
    n_rows = features.shape[0]
    step = 1.0 / (0.25 * float(row_weights.max()) * _largest_eigenvalue(features) + l2)
    weight = torch.zeros(targets.shape[1], features.shape[1])
    bias = torch.zeros(targets.shape[1])
    point_weight, point_bias, t = weight, bias, 1.0
    for _ in range(max_iter):
        residual = (torch.sigmoid(features @ point_weight.T + point_bias) - targets.float())
        residual = residual * row_weights / n_rows
        shrunk = point_weight - step * (residual.T @ features + l2 * point_weight)
        new_weight = shrunk.sign() * (shrunk.abs() - step * l1).clamp_min(0) * mask
        new_bias = point_bias - step * residual.sum(0)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        change = float((new_weight - weight).abs().max())
        point_weight = new_weight + (t - 1) / t_next * (new_weight - weight)
        point_bias = new_bias + (t - 1) / t_next * (new_bias - bias)
        weight, bias, t = new_weight, new_bias, t_next
        if change < 1e-5 * max(float(weight.abs().max()), 1e-3):
            break
    return weight, bias


def fit_logistic_regression(features: Tensor, targets: Tensor, *, l2: float = 1e-3,
                            l1: float = 0.0, max_iter: int = 500,
                            feature_mask: Tensor | None = None) -> LinearProbe:
    """Class-balanced logistic regression probes, one per column of `targets`.

    Args:
        features: `[n, d]` rows to classify (activations, or latents).
        targets: `[n]` bool labels (one probe) or `[n, c]` bool (c one-vs-rest probes, fitted
            independently in one batch).
        l2, l1: penalties on the weights of the standardised features (the bias is free); with
            `l1 > 0` the weights are sparse and FISTA replaces L-BFGS.
        max_iter: optimiser iterations.
        feature_mask: `[c, d]` bool, the features each probe may read (e.g. nested top-k sets,
            fitted in one batch); the others keep weight 0. Default: all.

    Each output's loss is its mean binary cross-entropy with the positive and negative rows
    weighted to count equally (sklearn's `class_weight="balanced"`), plus the penalties.
    Features are standardised by their mean and std over the rows (constant ones are left at
    zero weight), and the probe is mapped back to read the raw features.
    """
    if features.dim() != 2 or targets.shape[0] != features.shape[0]:
        raise ValueError(f"features must be [n, d] and targets [n] or [n, c] over the same rows, "
                         f"got {tuple(features.shape)} and {tuple(targets.shape)}")
    targets = (targets.unsqueeze(1) if targets.dim() == 1 else targets).bool().cpu()
    features = features.detach().float().cpu()
    mean, std = features.mean(0), features.std(0)
    std = torch.where(std > 1e-8 * (1 + mean.abs()), std, torch.ones_like(std))
    standardised = (features - mean) / std
    row_weights = _class_weights(targets)
    mask = torch.ones(targets.shape[1], features.shape[1]) if feature_mask is None \
        else feature_mask.float().cpu().expand(targets.shape[1], features.shape[1])
    if l1 > 0:
        weight, bias = _fit_fista(standardised, targets, row_weights, l1, l2, max_iter, mask)
    else:
        weight, bias = _fit_lbfgs(standardised, targets, row_weights, l2, max_iter, mask)
    raw_weight = weight / std
    return LinearProbe(raw_weight, bias - raw_weight @ mean)
