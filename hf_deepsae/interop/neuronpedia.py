"""Neuronpedia export: an SAE's latents as the feature-dashboard batches Neuronpedia uploads.

Neuronpedia imports SAEs as `batch-<i>.json` files in the layout SAELens/sae-dashboard's
Neuronpedia runner writes (`NeuronpediaDashboardBatch`): `{"model_id", "layer", "sae_set",
"features": [...]}`, each feature with `feature_index`, `frac_nonzero`, the activation histogram
(`freq_hist_data_bar_values`/`_heights`), the logit effect of its decoder direction (`pos_str`,
`pos_values`, `neg_str`, `neg_values`, `logits_hist_data_bar_*`), its largest components in the
activation basis (`neuron_alignment_*`), `n_prompts_total`, `n_tokens_in_prompt`, `dataset`, and
`activations`: example windows with `tokens`, `values` and the bin they were drawn from
(`bin_min = -1` for top examples, the quantile's range and share otherwise).

Everything comes from `hf_deepsae.interpret` as it is: the `LatentCache` (firing rate, histogram,
corpus shape), `sample_examples`' `LatentExamples` (top and quantile windows) and, when given,
`score_latents`' `LatentScore`s, written to `explanations.json` (Neuronpedia's explanation fields,
plus hf_deepsae's detection scores). Directions are `latent_directions()`, the effective direction
for nonlinear decoders (the logit tables then describe the decoder near activation 1).
Correlated-neuron/feature tables and attention-head allocations aren't computed (empty lists).
`neuronpedia.json` holds the link fields (`neuronpedia_id`, url); the id is also recorded in
`sae.config.neuronpedia_id`, so the model card of the SAE saved or pushed afterwards links its
feature pages.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..files import atomic_write_json
from ..interpret import LatentCache, LatentExamples, LatentScore, token_strings
from ..model_card import neuronpedia_url
from ..modeling_deepsae import DeepSAEModel


def to_neuronpedia(folder: str | Path, sae: DeepSAEModel, cache: LatentCache,
                   examples: Sequence[LatentExamples], tokenizer: PreTrainedTokenizerBase, *,
                   model_id: str, sae_set: str, layer: int | None = None, dataset: str = "",
                   unembedding: torch.Tensor | None = None, scores: Sequence[LatentScore] = (),
                   explanation_model: str = "", n_logits: int = 10, n_bins: int = 40,
                   features_per_batch: int = 128) -> Path:
    """Write the latents of `examples` as Neuronpedia batches (and explanations) into `folder`.

    Args:
        cache, examples: `build_latent_cache` over the corpus and `sample_examples` per latent.
        model_id: Neuronpedia's id of the base model (e.g. `"gemma-2-2b"`).
        sae_set: the SAE set's id on Neuronpedia (e.g. `"deepsae-mlp"`); the SAE's source id
            is `"<layer>-<sae_set>"`.
        layer: the hookpoint's layer; defaults to `config.layer`.
        unembedding: `[vocab, d_out]` (e.g. `lm.get_output_embeddings().weight`) for the logit
            tables; without it they stay empty.
        scores: `score_latents` results, exported with their explanations.
        explanation_model: the judge that wrote the explanations.

    Records the SAE's Neuronpedia id in `sae.config.neuronpedia_id` (for its model card).
    """
    layer = sae.config.layer if layer is None else layer
    if layer is None:
        raise ValueError("Neuronpedia files sources by layer; pass layer= (the SAE's config "
                         "records none)")
    folder = Path(folder)
    features = [_feature(sae, cache, item, tokenizer, unembedding, dataset, n_logits, n_bins)
                for item in examples]
    for start in range(0, len(features), features_per_batch):
        atomic_write_json(folder / f"batch-{start // features_per_batch}.json", {
            "model_id": model_id, "layer": layer, "sae_set": sae_set,
            "features": features[start:start + features_per_batch]})
    source = f"{layer}-{sae_set}"
    if scores:
        atomic_write_json(folder / "explanations.json", [
            _explanation(score, model_id, source, explanation_model)
            for score in scores if score.explanation is not None])
    sae.config.neuronpedia_id = f"{model_id}/{source}"
    atomic_write_json(folder / "neuronpedia.json", {
        "neuronpedia_id": sae.config.neuronpedia_id,
        "neuronpedia_url": neuronpedia_url(sae.config.neuronpedia_id)})
    return folder



def _feature(sae: DeepSAEModel, cache: LatentCache, examples: LatentExamples,
             tokenizer: PreTrainedTokenizerBase, unembedding: torch.Tensor | None, dataset: str,
             n_logits: int, n_bins: int) -> dict[str, Any]:
    latent = examples.latent
    values = cache.activations[cache.latent_slice(latent)]
    direction = sae.latent_directions(torch.tensor([latent]))[0].float().cpu()
    heights, edges = (torch.histogram(values, bins=n_bins) if len(values)
                      else (torch.zeros(0), torch.zeros(1)))
    return {
        "feature_index": latent,
        **_alignment(direction),
        "correlated_neurons_indices": [], "correlated_neurons_l1": [],
        "correlated_neurons_pearson": [], "correlated_features_indices": [],
        "correlated_features_l1": [], "correlated_features_pearson": [],
        **_logit_tables(direction, unembedding, tokenizer, n_logits, n_bins),
        "frac_nonzero": len(values) / cache.n_tokens,
        "freq_hist_data_bar_values": _rounded((edges[:-1] + edges[1:]) / 2),
        "freq_hist_data_bar_heights": _rounded(heights),
        "n_prompts_total": cache.tokens.shape[0],
        "n_tokens_in_prompt": cache.tokens.shape[1],
        "dataset": dataset,
        "decoder_weights_dist": [],
        "activations": _activations(examples, tokenizer),
    }


def _alignment(direction: torch.Tensor, n: int = 3) -> dict[str, list]:
    """The direction's largest components in the activation basis (sae-dashboard's table)."""
    top = direction.abs().topk(min(n, len(direction))).indices
    share = direction[top].abs() / direction.abs().sum().clamp_min(1e-12)
    return {"neuron_alignment_indices": top.tolist(),
            "neuron_alignment_values": _rounded(direction[top]),
            "neuron_alignment_l1": _rounded(share)}


def _logit_tables(direction: torch.Tensor, unembedding: torch.Tensor | None,
                  tokenizer: PreTrainedTokenizerBase, n_logits: int, n_bins: int
                  ) -> dict[str, list]:
    """Tokens the direction promotes and suppresses most through the unembedding."""
    if unembedding is None:
        return {"pos_str": [], "pos_values": [], "neg_str": [], "neg_values": [],
                "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": []}
    logits = unembedding.detach().float().cpu() @ direction
    top, bottom = logits.topk(n_logits), logits.topk(n_logits, largest=False)
    heights, edges = torch.histogram(logits, bins=n_bins)
    return {"pos_str": token_strings(tokenizer, top.indices.tolist()),
            "pos_values": _rounded(top.values),
            "neg_str": token_strings(tokenizer, bottom.indices.tolist()),
            "neg_values": _rounded(bottom.values),
            "logits_hist_data_bar_heights": _rounded(heights),
            "logits_hist_data_bar_values": _rounded((edges[:-1] + edges[1:]) / 2)}


def _activations(examples: LatentExamples, tokenizer: PreTrainedTokenizerBase
                 ) -> list[dict[str, Any]]:
    """Top windows (bin -1..max) then each quantile's, with its range and share of windows."""
    def window(example, bin_min: float, bin_max: float, bin_contains: float) -> dict[str, Any]:
        return {"bin_min": bin_min, "bin_max": bin_max, "bin_contains": bin_contains,
                "tokens": token_strings(tokenizer, example.tokens),
                "values": [round(value, 3) for value in example.activations]}

    strongest = round(examples.top[0].max_activation, 3) if examples.top else 0.0
    rows = [window(example, -1, strongest, -1) for example in examples.top]
    n, n_bins = examples.n_activating_windows, len(examples.quantiles)
    for q, (bin_range, drawn) in enumerate(zip(examples.quantile_ranges, examples.quantiles,
                                               strict=True)):
        if bin_range is None:
            continue
        share = ((q + 1) * n // n_bins - q * n // n_bins) / max(n, 1)
        rows += [window(example, round(bin_range[0], 3), round(bin_range[1], 3), round(share, 4))
                 for example in drawn]
    return rows


def _explanation(score: LatentScore, model_id: str, source: str, explanation_model: str
                 ) -> dict[str, Any]:
    return {"modelId": model_id, "layer": source, "index": str(score.latent),
            "description": score.explanation, "explanationModelName": explanation_model,
            "typeName": "hf_deepsae-detection",
            "scores": {key: getattr(score, key) for key in (
                "balanced_accuracy", "recall", "specificity", "accuracy", "quantile_agreement")}}


def _rounded(values: torch.Tensor) -> list[float]:
    return [round(float(value), 3) for value in values]
