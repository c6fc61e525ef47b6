"""Evaluate SAEs inside their language model: batches of token ids in, both metric kinds out.

`SAEEvaluator` captures each SAE's activations (`capture_activations`, stopping after the last
hooked layer) at the positions its `TokenMask` keeps (by default not the first position, BOS
tokens nor padding, as the trainer trains) for `ActivationMetrics`, and compares clean, spliced
(`splice(mode="replace")`) and zero-ablated forward passes for `LanguageModelMetrics`, for several
SAEs one at a time or jointly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..modeling_deepsae import DeepSAEModel
from ..sites import Site, attach_hook, check_token_batch, default_key
from ..splice import base_model_mismatch, capture_activations, sae_sites, splice
from ..token_mask import DEFAULT_TOKEN_MASK, TokenMask
from .metrics import (
    ActivationMetrics,
    ActivationMetricsResult,
    LanguageModelMetrics,
    LanguageModelMetricsResult,
)

JOINT = "joint"
"""Key of the language-model metrics when every SAE is spliced in at once (`jointly=True`)."""


@contextmanager
def zero_ablate(model: nn.Module, sites: Iterable[Site]) -> Iterator[None]:
    """Within the block, the activations at `sites` are replaced by zeros (the CE-loss baseline)."""
    hooks = [
        attach_hook(model.get_submodule(site.path), site.side, torch.zeros_like)
        for site in set(sites)
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@dataclass
class SAEEvaluationResult:
    """Results per SAE name (language-model ones per name, or under `JOINT`)."""

    activations: dict[str, ActivationMetricsResult]
    language_model: dict[str, LanguageModelMetricsResult]

    def scalars(self) -> dict[str, dict[str, float | int]]:
        """`{name: {metric: value}}`: activation and language-model metrics side by side."""
        names = [*self.activations, *(key for key in self.language_model if key == JOINT)]
        return {
            name: {
                **(self.activations[name].scalars() if name in self.activations else {}),
                **(self.language_model[name].scalars() if name in self.language_model else {}),
            }
            for name in names
        }

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """`scalars()` plus each SAE's `feature_density` and `l0_histogram` lists, for JSON."""
        return {
            name: {**self.activations[name].to_dict(), **values}
            if name in self.activations
            else values
            for name, values in self.scalars().items()
        }


@dataclass
class SAEEvaluationMetrics:
    """The accumulators of an evaluation; picklable, so workers can gather and `merge` them."""

    activations: dict[str, ActivationMetrics]
    language_model: dict[str, LanguageModelMetrics]

    def merge(self, other: SAEEvaluationMetrics) -> None:
        for mine, theirs in (
            (self.activations, other.activations),
            (self.language_model, other.language_model),
        ):
            for name, metrics in mine.items():
                metrics.merge(theirs[name])

    def compute(self, min_tokens: int = 2) -> SAEEvaluationResult:
        return SAEEvaluationResult(
            {name: metrics.compute(min_tokens) for name, metrics in self.activations.items()},
            {name: metrics.compute() for name, metrics in self.language_model.items()},
        )


class SAEEvaluator:
    """Scores SAEs on a language model's text, batch by batch.

    Per batch: one forward pass, stopped after the last hooked layer, captures every SAE's input
    and target for the activation metrics. With `language_model_metrics`, a clean forward pass,
    then per SAE (or once for all with `jointly=True`) a pass with the reconstruction spliced in
    (`splice(mode="replace")`) and one with the site zero-ablated, feed `LanguageModelMetrics`.

    Args:
        model: the language model; a causal LM when `language_model_metrics` is on.
        saes: `{name: SAE}`, each spliced where its config says (`hookpoint`, else `layer`).
        jointly: splice all SAEs at once (and ablate all their sites at once) for the
            language-model metrics, instead of one at a time.
        allow_base_model_mismatch: evaluate SAEs whose `base_model_name_or_path` names another
            model (otherwise a `ValueError`).
        token_mask: the positions left out of the activation metrics (`masked_tokens` counts
            them; padding is always left out, and the language-model metrics score every
            predicted token); None: padding only.
        tokenizer: the tokens `token_mask` leaves out by id (BOS, special tokens); without it,
            the model config's `bos_token_id`.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        saes: Mapping[str, DeepSAEModel],
        *,
        language_model_metrics: bool = True,
        jointly: bool = False,
        allow_base_model_mismatch: bool = False,
        token_mask: TokenMask | None = DEFAULT_TOKEN_MASK,
        tokenizer: Any = None,
    ) -> None:
        if not saes:
            raise ValueError("no SAEs to evaluate")
        if language_model_metrics and not is_causal_lm(model):
            raise ValueError(
                f"{type(model).__name__} is not a causal language model, so next-token CE/KL are "
                "undefined; evaluate with language_model_metrics=False (--no_language_model)"
            )
        self.model, self.saes = model, dict(saes)
        self.token_mask = token_mask or TokenMask(mask_bos=False)
        self._masked_token_ids = self.token_mask.masked_token_ids(
            model.config if tokenizer is None else tokenizer)
        self.masked_tokens = 0
        """Real (non-padding) tokens left out of the activation metrics so far."""
        for name, sae in self.saes.items():
            _check_compatible(model, name, sae, allow_base_model_mismatch)
        self.sites = {name: sae_sites(model, sae.config) for name, sae in self.saes.items()}
        writes = [write for _, write in self.sites.values()]
        if jointly and len(set(writes)) < len(writes):
            raise ValueError(
                f"jointly=True splices every SAE at once, but several write the same site "
                f"({writes}); evaluate them one at a time"
            )
        lm_keys = ([JOINT] if jointly else list(self.saes)) if language_model_metrics else []
        self.metrics = SAEEvaluationMetrics(
            {name: ActivationMetrics(sae.config.n_total_latents) for name, sae in saes.items()},
            {key: LanguageModelMetrics() for key in lm_keys},
        )
        # SAEs writing the same sites share one zero-ablated forward pass per batch.
        self._ablation_groups: dict[frozenset[Site], list[str]] = {}
        for key in lm_keys:
            sites = frozenset(self.sites[name][1] for name in self._spliced_names(key))
            self._ablation_groups.setdefault(sites, []).append(key)

    @torch.no_grad()
    def update(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> None:
        """Add a batch of token ids `[batch, seq]`; padding (mask 0) is left out of every metric,
        the positions `token_mask` leaves out of the activation metrics."""
        check_token_batch(input_ids, attention_mask)
        input_ids = input_ids.to(self.model.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.model.device)
        tokens = self.token_mask.keep(input_ids, self._masked_token_ids, attention_mask)
        self.masked_tokens += int(attention_mask.bool().sum() - tokens.sum())
        sites = {site for pair in self.sites.values() for site in pair}
        captured = capture_activations(self.model, input_ids, sites, attention_mask)
        for name, sae in self.saes.items():
            read, write = self.sites[name]
            inputs, target = captured[read][tokens], captured[write][tokens]
            output = sae(
                inputs.to(sae.device, sae.dtype),
                target=target.to(sae.device, sae.dtype) if sae.config.transcoder else None,
            )
            self.metrics.activations[name].update(
                target, output.reconstruction, output.latent_acts, output.latent_indices
            )
        if not self.metrics.language_model:
            return
        clean = self._logits(input_ids, attention_mask)
        for write_sites, keys in self._ablation_groups.items():
            with zero_ablate(self.model, write_sites):
                ablated = self._logits(input_ids, attention_mask)
            for key in keys:
                saes = {
                    default_key(self.saes[name].config): self.saes[name]
                    for name in self._spliced_names(key)
                }
                with splice(self.model, saes):
                    spliced = self._logits(input_ids, attention_mask)
                self.metrics.language_model[key].update(
                    input_ids, clean, spliced, ablated, attention_mask
                )

    def _spliced_names(self, key: str) -> list[str]:
        return list(self.saes) if key == JOINT else [key]

    def _logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def is_causal_lm(model: PreTrainedModel) -> bool:
    """Whether `model` predicts next tokens (its logits define next-token CE and KL)."""
    return type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def _check_compatible(
    model: PreTrainedModel, name: str, sae: DeepSAEModel, allow_base_model_mismatch: bool
) -> None:
    """`splice`'s own checks (site widths vs `d_in`/`d_out`), and another base model made an
    error rather than `splice`'s warning: metrics of an SAE on a model it was not trained on
    mislead."""
    if not isinstance(sae, nn.Module) or getattr(getattr(sae, "config", None), "model_type",
                                                 None) != "deepsae":
        raise TypeError(f"saes[{name!r}] must be a DeepSAEModel, got {type(sae).__name__}")
    if sae.config.hookpoint is None and sae.config.layer is None:
        raise ValueError(
            f"SAE {name!r} names no site in its config: set config.hookpoint (a module path of "
            "the model) or config.layer"
        )
    mismatch = base_model_mismatch(model, sae)
    if mismatch is not None and not allow_base_model_mismatch:
        raise ValueError(
            f"SAE {name!r}: {mismatch}. Evaluate it with the model it was trained on, or pass "
            "allow_base_model_mismatch=True (--allow_base_model_mismatch)"
        )
    try:
        splice(model, {default_key(sae.config): sae}, mode="capture").remove()
    except ValueError as error:
        raise ValueError(f"SAE {name!r} does not fit {type(model).__name__}: {error}") from None


def evaluate_saes(
    model: PreTrainedModel,
    saes: Mapping[str, DeepSAEModel],
    batches: Iterable[Tensor | Mapping[str, Tensor]],
    *,
    min_tokens: int = 2,
    **evaluator_kwargs: Any,
) -> SAEEvaluationResult:
    """Evaluate `saes` on `batches` of token ids (tensors, or dicts with `input_ids` and an optional
    `attention_mask`); see `SAEEvaluator` for the keyword arguments."""
    evaluator = SAEEvaluator(model, saes, **evaluator_kwargs)
    for batch in batches:
        if isinstance(batch, Tensor):
            evaluator.update(batch)
        elif isinstance(batch, Mapping) and "input_ids" in batch:
            evaluator.update(batch["input_ids"], batch.get("attention_mask"))
        else:
            raise ValueError(f"each batch must be a tensor of token ids or a mapping with "
                             f"'input_ids' (and optionally 'attention_mask'), got "
                             f"{sorted(batch) if isinstance(batch, Mapping) else type(batch)}")
    return evaluator.metrics.compute(min_tokens)
