"""Streaming accumulators of the metrics SAEs are compared by; they only need tensors.

`ActivationMetrics`: reconstruction and sparsity on activations — FVU (sum of squared errors over
the total variance of the target, the sparsify/SAELens definition, with the dataset mean), explained
variance, MSE, cosine similarity, L0 (mean and histogram), L1, per-latent firing density, dead and
dense fractions, relative reconstruction bias and L2 ratio. `LanguageModelMetrics`: next-token
cross-entropy clean, with SAE(s) spliced in and with the site(s) zero-ablated, the CE-loss score,
KL(clean || spliced) and its score. Both keep running float64 sums (never all activations) and
`merge`, so data-parallel workers or shards combine exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..sites import check_token_batch, describe_value

DENSE_DENSITY_THRESHOLD = 0.1
"""A latent firing on more than this fraction of tokens counts as dense (not a sparse feature)."""
VARIANCE_RESOLUTION = (64 * torch.finfo(torch.float64).eps) ** 2
"""A total variance below this fraction of `Σ‖x‖²` is rounding error of the mean, not variance."""


@dataclass
class ActivationMetricsResult:
    """Activation-level metrics over `n_tokens` tokens `x` with reconstructions `x̂`.

    - `fvu`: `Σ‖x - x̂‖² / Σ‖x - mean(x)‖²` over all tokens; `explained_variance = 1 - fvu`.
    - `mse`: mean squared error per element; `cosine_similarity`: mean over tokens of cos(x, x̂).
    - `relative_reconstruction_bias`: `E‖x̂‖² / E[x̂·x]`, the γ of Rajamanoharan et al. (2024):
      1 is unbiased, below 1 the reconstructions shrink. `l2_ratio`: mean `‖x̂‖ / ‖x‖`.
    - `l0`, `l0_std`: active (non-zero) latents per token; `l1`: mean `Σ|z|` per token.
    - `dead_fraction`: latents that never fired; `dense_fraction`: latents firing on more than
      the accumulator's `dense_threshold` of tokens.
    - `feature_density[i]`: fraction of tokens latent `i` fired on; `l0_histogram[j]`: tokens with
      exactly `j` active latents.

    Sparsity fields are `None` when no latents were given (reconstructions only).
    """

    n_tokens: int
    fvu: float
    explained_variance: float
    mse: float
    cosine_similarity: float
    relative_reconstruction_bias: float
    l2_ratio: float
    l0: float | None = None
    l0_std: float | None = None
    l1: float | None = None
    dead_fraction: float | None = None
    dense_fraction: float | None = None
    feature_density: Tensor | None = field(default=None, repr=False)
    l0_histogram: Tensor | None = field(default=None, repr=False)

    def scalars(self) -> dict[str, float | int]:
        """The scalar metrics (no per-latent arrays), e.g. for a table or `config.metrics`."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return {
            name: value
            for name, value in values.items()
            if value is not None and not isinstance(value, Tensor)
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready Python values (arrays become lists)."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return {
            name: value.tolist() if isinstance(value, Tensor) else value
            for name, value in values.items()
        }


class ActivationMetrics:
    """Streaming accumulator of `ActivationMetricsResult`.

    Call `update` once per batch, then `compute`. State is O(d + n_latents) float64/int64 tensors
    on the CPU (cheap next to the forward pass that made the batch, and picklable for gathering).

    Total variance uses Chan et al.'s pairwise update of (count, mean, sum of squared deviations)
    per dimension: exact for any batch split and free of the cancellation `E[x^2] - E[x]^2` suffers
    when activations have a large mean (massive residual-stream dimensions).

    Args:
        n_latents: latents of the SAE (`config.n_total_latents`). Needed for sparse latents
            (`latent_indices` given); inferred from dense latents otherwise.
        dense_threshold: firing density above which a latent counts as dense.
    """

    def __init__(
        self, n_latents: int | None = None, dense_threshold: float = DENSE_DENSITY_THRESHOLD
    ) -> None:
        if n_latents is not None and (isinstance(n_latents, bool) or not isinstance(n_latents, int)
                                      or n_latents <= 0):
            raise ValueError(f"n_latents={n_latents!r} must be a positive int (or None)")
        if isinstance(dense_threshold, bool) or not isinstance(dense_threshold, int | float) \
                or not 0 <= dense_threshold <= 1:
            raise ValueError(f"dense_threshold={dense_threshold!r} must be a fraction in [0, 1]")
        self.n_latents = n_latents
        self.dense_threshold = dense_threshold
        self.n_tokens = 0
        self.state: dict[str, Tensor] = {}

    def update(
        self,
        target: Tensor,
        reconstruction: Tensor,
        latent_acts: Tensor | None = None,
        latent_indices: Tensor | None = None,
    ) -> None:
        """Add a batch.

        Args:
            target: `[..., d]` activations the SAE should reproduce (its input, or a transcoder's
                target).
            reconstruction: `[..., d]` the SAE's output.
            latent_acts: `[..., k]` active values with `latent_indices` (top-k kinds), or dense
                `[..., n_latents]` latents. Optional: without it only reconstruction metrics exist.
            latent_indices: `[..., k]` int latent ids of `latent_acts`, or `None` for dense latents.
        """
        _check_values("target", target)
        _check_values("reconstruction", reconstruction)
        if target.shape != reconstruction.shape:
            raise ValueError(
                f"target {tuple(target.shape)} and reconstruction {tuple(reconstruction.shape)} "
                "must have the same shape"
            )
        if latent_indices is not None and latent_acts is None:
            raise ValueError("latent_indices needs latent_acts (the values of those latents)")
        if latent_acts is not None:
            self._check_latents(target, latent_acts, latent_indices)
        target = target.detach().reshape(-1, target.shape[-1]).double()
        reconstruction = reconstruction.detach().reshape(target.shape).double()
        if target.shape[0] == 0:
            return
        with torch.no_grad():
            batch = self._reconstruction_sums(target, reconstruction)
            if latent_acts is not None:
                batch.update(self._sparsity_sums(latent_acts.detach(), latent_indices))
            self._merge_state(batch, target.shape[0])

    def merge(self, other: ActivationMetrics) -> None:
        """Fold another accumulator (another worker, another shard) into this one."""
        if other.n_latents != self.n_latents and None not in (other.n_latents, self.n_latents):
            raise ValueError(f"can't merge metrics of {other.n_latents} latents into metrics of "
                             f"{self.n_latents}: they come from different SAEs")
        if other.n_tokens:
            self._merge_state(other.state, other.n_tokens)

    def _check_latents(self, target: Tensor, latent_acts: Tensor,
                       latent_indices: Tensor | None) -> None:
        """One row of finite latents per target row; integer ids in `[0, n_latents)`."""
        _check_values("latent_acts", latent_acts)
        if latent_acts.shape[:-1] != target.shape[:-1]:
            raise ValueError(f"latent_acts {tuple(latent_acts.shape)} must have one row per "
                             f"target row {tuple(target.shape)}")
        if latent_indices is None:
            return
        if not isinstance(latent_indices, Tensor) or latent_indices.is_floating_point() \
                or latent_indices.dtype == torch.bool or latent_indices.shape != latent_acts.shape:
            raise ValueError(f"latent_indices must be integer latent ids shaped like latent_acts "
                             f"{tuple(latent_acts.shape)}, got {describe_value(latent_indices)}")
        if self.n_latents is None or not latent_indices.numel():
            return
        lowest, highest = int(latent_indices.min()), int(latent_indices.max())
        if lowest < 0 or highest >= self.n_latents:
            found = f"reach {highest}, beyond" if highest >= self.n_latents else \
                f"hold the negative id {lowest}, outside"
            raise ValueError(f"latent_indices {found} n_latents={self.n_latents}: ids must lie "
                             f"in [0, {self.n_latents})")

    def compute(self, min_tokens: int = 2) -> ActivationMetricsResult:
        """The metrics so far; raises `ValueError` below `min_tokens` tokens (variance needs 2)."""
        if self.n_tokens == 0:
            raise ValueError("no tokens were evaluated: the dataset or batches are empty")
        if self.n_tokens < max(min_tokens, 2):
            raise ValueError(
                f"only {self.n_tokens} tokens were evaluated, fewer than the {max(min_tokens, 2)} "
                "needed; evaluate more tokens"
            )
        s = self.state
        total_variance = s["m2"].sum().item()
        sum_of_squares = (s["m2"] + self.n_tokens * s["mean"].pow(2)).sum().item()
        if total_variance <= VARIANCE_RESOLUTION * sum_of_squares:
            raise ValueError(
                "the target activations are constant over the evaluated tokens, so FVU "
                "(error / total variance) is undefined; evaluate more varied text"
            )
        fvu = s["sse"].item() / total_variance
        n_tokens = self.n_tokens
        result = ActivationMetricsResult(
            n_tokens=n_tokens,
            fvu=fvu,
            explained_variance=1.0 - fvu,
            mse=s["sse"].item() / (n_tokens * s["mean"].numel()),
            cosine_similarity=s["cosine"].item() / n_tokens,
            relative_reconstruction_bias=(s["recon_sq"] / s["recon_dot_target"]).item(),
            l2_ratio=(s["l2_ratio"] / s["l2_ratio_tokens"]).item(),
        )
        if "firing_counts" in s:
            histogram = s["l0_histogram"]
            l0_values = torch.arange(histogram.numel(), dtype=torch.float64)
            l0 = (histogram * l0_values).sum().item() / n_tokens
            l0_var = (histogram * (l0_values - l0) ** 2).sum().item() / n_tokens
            density = s["firing_counts"].double() / n_tokens
            result.l0, result.l0_std = l0, l0_var**0.5
            result.l1 = s["l1"].item() / n_tokens
            result.dead_fraction = (density == 0).double().mean().item()
            result.dense_fraction = (density > self.dense_threshold).double().mean().item()
            result.feature_density, result.l0_histogram = density, histogram
        return result

    @staticmethod
    def _reconstruction_sums(target: Tensor, reconstruction: Tensor) -> dict[str, Tensor]:
        mean = target.mean(0)
        target_norm = target.norm(dim=-1)
        recon_norm = reconstruction.norm(dim=-1)
        has_norm = target_norm > 0
        return {
            "mean": mean,
            "m2": (target - mean).pow(2).sum(0),
            "sse": (target - reconstruction).pow(2).sum(),
            "cosine": torch.nn.functional.cosine_similarity(target, reconstruction, dim=-1).sum(),
            "recon_sq": recon_norm.pow(2).sum(),
            "recon_dot_target": (reconstruction * target).sum(),
            "l2_ratio": (recon_norm[has_norm] / target_norm[has_norm]).sum(),
            "l2_ratio_tokens": has_norm.sum(dtype=torch.float64),
        }

    def _sparsity_sums(
        self, latent_acts: Tensor, latent_indices: Tensor | None
    ) -> dict[str, Tensor]:
        latent_acts = latent_acts.reshape(-1, latent_acts.shape[-1])
        if latent_indices is None:
            if self.n_latents is None:
                self.n_latents = latent_acts.shape[-1]
            elif latent_acts.shape[-1] != self.n_latents:
                raise ValueError(
                    f"dense latent_acts have {latent_acts.shape[-1]} latents, expected "
                    f"n_latents={self.n_latents}"
                )
            active = latent_acts != 0
            firing_counts = active.sum(0, dtype=torch.int64)
        else:
            if self.n_latents is None:
                raise ValueError("sparse latents (latent_indices given) need n_latents")
            latent_indices = latent_indices.reshape(latent_acts.shape)
            active = latent_acts != 0
            firing_counts = torch.bincount(latent_indices[active], minlength=self.n_latents)
        l0_per_token = active.sum(-1)
        return {
            "firing_counts": firing_counts,
            "l0_histogram": torch.bincount(l0_per_token, minlength=self.n_latents + 1),
            "l1": latent_acts.abs().sum(dtype=torch.float64),
        }

    def _merge_state(self, batch: dict[str, Tensor], batch_tokens: int) -> None:
        """Chan's parallel merge for mean/m2; every other entry is a plain sum."""
        batch = {name: value.cpu() for name, value in batch.items()}
        if not self.state:
            self.state, self.n_tokens = batch, batch_tokens
            return
        if ("firing_counts" in self.state) != ("firing_counts" in batch):
            raise ValueError("give latents with every batch or with none")
        if batch["mean"].shape != self.state["mean"].shape:
            raise ValueError(
                f"activation width changed from {self.state['mean'].numel()} to "
                f"{batch['mean'].numel()} between batches"
            )
        n_before, n_total = self.n_tokens, self.n_tokens + batch_tokens
        delta = batch["mean"] - self.state["mean"]
        between_batches = delta.pow(2) * (n_before * batch_tokens / n_total)
        merged = {
            "mean": self.state["mean"] + delta * (batch_tokens / n_total),
            "m2": self.state["m2"] + batch["m2"] + between_batches,
        }
        for name, value in batch.items():
            if name not in merged:
                merged[name] = self.state[name] + value
        self.state, self.n_tokens = merged, n_total


@dataclass
class LanguageModelMetricsResult:
    """Next-token metrics of a language model over `n_predicted_tokens` (nats per token).

    `ce_loss_score = (ce_ablated - ce_spliced) / (ce_ablated - ce_clean)`: 1 when splicing the SAE
    loses nothing, 0 when it is as bad as deleting the site. `kl_score` is the same with
    KL(clean || ·) in place of CE (KL(clean || clean) = 0). Scores are NaN when ablation costs
    nothing.
    """

    n_predicted_tokens: int
    ce_clean: float
    ce_spliced: float
    ce_ablated: float
    ce_loss_increase: float
    ce_loss_score: float
    kl_spliced: float
    kl_ablated: float
    kl_score: float

    def scalars(self) -> dict[str, float | int]:
        return asdict(self)


def _check_values(name: str, values: Any) -> None:
    """A numeric tensor of at least one dimension, without NaN or inf."""
    if not isinstance(values, Tensor) or values.dim() == 0 or values.dtype == torch.bool \
            or values.is_complex():
        raise ValueError(f"{name} must be a real tensor of shape [..., width], got "
                         f"{describe_value(values)}")
    if values.is_floating_point() and not torch.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or inf, which would make every metric NaN; "
                         f"evaluate finite activations (check SAEs with sae.nonfinite_weights())")


def _check_logits(input_ids: Tensor, attention_mask: Tensor | None, **logits: Tensor) -> None:
    """Token ids `[batch, seq]` and logits `[batch, seq, vocab]` of one vocabulary that holds
    every id."""
    check_token_batch(input_ids, attention_mask)
    for name, value in logits.items():
        if not isinstance(value, Tensor) or value.shape[:-1] != input_ids.shape \
                or value.dim() != 3 or not value.is_floating_point():
            raise ValueError(f"{name}_logits must be float [batch, seq, vocab] matching input_ids "
                             f"{tuple(input_ids.shape)}, got {describe_value(value)}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= value.shape[-1]):
            raise ValueError(f"input_ids hold token ids in [{int(input_ids.min())}, "
                             f"{int(input_ids.max())}], outside the {value.shape[-1]} logits of "
                             f"{name}_logits")


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


class LanguageModelMetrics:
    """Streaming accumulator of `LanguageModelMetricsResult` from three sets of logits per batch:
    the clean model, the model with SAE(s) spliced in, and the model with the site(s) zero-ablated.
    """

    _SUMS = ("ce_clean", "ce_spliced", "ce_ablated", "kl_spliced", "kl_ablated")

    def __init__(self) -> None:
        self.n_tokens = 0
        self.sums = dict.fromkeys(self._SUMS, 0.0)

    def update(
        self,
        input_ids: Tensor,
        clean_logits: Tensor,
        spliced_logits: Tensor,
        ablated_logits: Tensor,
        attention_mask: Tensor | None = None,
    ) -> None:
        """Add a batch: `input_ids` `[batch, seq]`, logits `[batch, seq, vocab]`.

        Position `t` predicts token `t + 1`; pairs where either token is padding are skipped.
        """
        _check_logits(input_ids, attention_mask, clean=clean_logits, spliced=spliced_logits,
                      ablated=ablated_logits)
        with torch.no_grad():
            valid = torch.ones_like(input_ids, dtype=torch.bool)
            if attention_mask is not None:
                valid = attention_mask.bool()
            valid = valid[:, :-1] & valid[:, 1:]
            labels = input_ids[:, 1:][valid]
            log_probs = {
                name: logits[:, :-1][valid].float().log_softmax(-1)
                for name, logits in (
                    ("clean", clean_logits),
                    ("spliced", spliced_logits),
                    ("ablated", ablated_logits),
                )
            }
            batch = {
                f"ce_{name}": torch.nn.functional.nll_loss(values, labels, reduction="sum")
                for name, values in log_probs.items()
            }
            for name in ("spliced", "ablated"):
                batch[f"kl_{name}"] = torch.nn.functional.kl_div(
                    log_probs[name], log_probs["clean"], log_target=True, reduction="sum"
                )
        nonfinite = [name for name, value in batch.items() if not math.isfinite(value.item())]
        if nonfinite:
            raise ValueError(f"{nonfinite} of this batch are NaN or inf: the logits of a forward "
                             f"pass hold NaN/inf (an SAE spliced in reconstructs NaN, or the model "
                             f"overflows in its dtype); check SAEs with sae.nonfinite_weights()")
        for name, value in batch.items():
            self.sums[name] += value.item()
        self.n_tokens += labels.numel()

    def merge(self, other: LanguageModelMetrics) -> None:
        """Fold another accumulator (another worker, another shard) into this one."""
        for name, value in other.sums.items():
            self.sums[name] += value
        self.n_tokens += other.n_tokens

    def compute(self, min_tokens: int = 1) -> LanguageModelMetricsResult:
        if self.n_tokens < max(min_tokens, 1):
            raise ValueError(
                f"only {self.n_tokens} next-token predictions were evaluated, fewer than the "
                f"{max(min_tokens, 1)} needed; evaluate more (or longer) sequences"
            )
        mean = {name: value / self.n_tokens for name, value in self.sums.items()}
        return LanguageModelMetricsResult(
            n_predicted_tokens=self.n_tokens,
            **mean,
            ce_loss_increase=mean["ce_spliced"] - mean["ce_clean"],
            ce_loss_score=_ratio(
                mean["ce_ablated"] - mean["ce_spliced"], mean["ce_ablated"] - mean["ce_clean"]
            ),
            kl_score=_ratio(mean["kl_ablated"] - mean["kl_spliced"], mean["kl_ablated"]),
        )
