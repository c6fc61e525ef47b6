"""Model cards for SAEs: the templates in `model_cards/` filled from the SAE's own config.

Everything a card says comes from the checkpoint: the architecture (`DeepSAEConfig`), provenance
(`base_model_name_or_path`, `hookpoint`, `layer`), the training record (`config.training_config`)
and evaluation results (`config.metrics`, as `hf_deepsae.evaluation` computes them). Templates are
rendered with `StrictUndefined`, so a card can never silently miss a field; values a checkpoint
doesn't record are said to be unrecorded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .configuration_deepsae import DeepSAEConfig
from .modeling_deepsae import DeepSAEModel
from .provenance import (
    install_command,
    is_hub_id,
    public_value,
    training_corpus,
    training_record,
)

DEFAULT_LICENSE = "apache-2.0"
NEURONPEDIA_URL = "https://www.neuronpedia.org"

# Installed wheels carry the templates inside the package; a source checkout keeps them at the root.
_PACKAGED_TEMPLATES = Path(__file__).with_name("model_cards")
TEMPLATE_DIR = (
    _PACKAGED_TEMPLATES if _PACKAGED_TEMPLATES.is_dir()
    else Path(__file__).resolve().parent.parent / "model_cards"
)

METRICS: dict[str, tuple[str, str]] = {
    "fvu": ("FVU", "fraction of variance unexplained (lower is better)"),
    "explained_variance": ("Explained variance", "1 − FVU"),
    "mse": ("MSE", "mean squared reconstruction error per dimension"),
    "cosine_similarity": ("Cosine similarity", "between activations and reconstructions"),
    "l0": ("L0", "active latents per token"),
    "l0_std": ("L0 std", "spread of active latents per token"),
    "l1": ("L1", "sum of latent activations per token"),
    "dead_fraction": ("Dead latents", "latents that never fired on the evaluation tokens"),
    "dense_fraction": ("Dense latents", "latents firing on more than 10% of tokens"),
    "relative_reconstruction_bias": ("Reconstruction bias", "1 = reconstructions not shrunk"),
    "l2_ratio": ("L2 ratio", "‖reconstruction‖ / ‖activation‖"),
    "ce_loss_score": ("CE-loss score", "1 = splicing the SAE in loses nothing, 0 = as bad as "
                      "zero-ablating the site"),
    "ce_loss_increase": ("CE-loss increase", "next-token loss with the SAE minus without (nats)"),
    "ce_clean": ("CE clean", "next-token loss of the unmodified model (nats)"),
    "ce_spliced": ("CE spliced", "next-token loss with the SAE spliced in (nats)"),
    "ce_ablated": ("CE ablated", "next-token loss with the site zero-ablated (nats)"),
    "kl_spliced": ("KL spliced", "KL(clean ‖ spliced) per token (nats)"),
    "kl_ablated": ("KL ablated", "KL(clean ‖ ablated) per token (nats)"),
    "kl_score": ("KL score", "the CE-loss score with KL in place of CE"),
    "n_tokens": ("Evaluation tokens", "tokens the metrics were measured on"),
    "dead_fraction_training": ("Dead latents (training)", "latents silent for the trainer's "
                               "dead threshold at the end of training"),
    "train_tokens": ("Training tokens", "activation rows the SAE was trained on"),
    "nonfinite_rows_skipped": ("Non-finite rows skipped", "NaN/inf activations left out"),
    "absorption_fraction": ("Absorption fraction", "share of a first letter's probe projection "
                            "carried by other latents than the letter's (lower is better)"),
    "full_absorption_rate": ("Full absorption", "words whose letter latents stay silent while "
                             "another latent carries the letter (lower is better)"),
    "first_letter_f1": ("First-letter F1 (1 latent)", "best single latent as a first-letter "
                        "classifier"),
    "first_letter_main_latents_f1": ("First-letter F1 (main latents)", "the letter's main "
                                     "latents as a classifier"),
    "first_letter_main_latents": ("Latents per letter", "main latents per first letter (above "
                                  "1: feature splitting)"),
    "first_letter_probe_f1": ("First-letter probe F1", "linear probe on the raw activations at "
                              "this site: the ceiling of the two F1s above"),
    "sparse_probing_sae_accuracy": ("Sparse probing, all latents", "probe accuracy on all "
                                    "mean-pooled latents"),
    "sparse_probing_llm_accuracy": ("Sparse probing, raw activations", "probe accuracy on the "
                                    "mean-pooled activations: the ceiling"),
    **{f"sparse_probing_top_{k}_accuracy": (f"Sparse probing, {k} latent{'s' * (k > 1)}",
                                            f"probe accuracy on the {k} most telling latents")
       for k in (1, 2, 5, 10, 20, 50)},
    "autointerp_detection_balanced_accuracy": ("Auto-interp detection", "balanced accuracy of "
                                               "the judge's detection verdicts"),
    "autointerp_fuzzing_balanced_accuracy": ("Auto-interp fuzzing", "balanced accuracy of the "
                                             "judge's fuzzing verdicts"),
    "autointerp_detection_accuracy_weighted": ("Auto-interp accuracy (weighted)", "detection "
                                               "accuracy at each latent's firing rate, weighted "
                                               "by it"),
    "autointerp_detection_perfect_fraction": ("Auto-interp perfect", "latents with a perfect "
                                              "detection score"),
    "autointerp_quantile_agreement": ("Auto-interp quantile agreement", "verdicts shared by "
                                      "explanations of strong and of weak activations"),
}
# Counts and baselines, not results of the SAE: shown in the table, kept out of the model-index.
_NOT_RESULTS = ("n_tokens", "train_tokens", "nonfinite_rows_skipped", "first_letter_probe_f1",
                "sparse_probing_llm_accuracy")
_SPARSITY_WORDS = {
    "topk": "TopK keeps the {k} largest pre-activations of each token (after a ReLU) and zeroes "
            "the rest",
    "batchtopk": "BatchTopK keeps the {k}·batch largest pre-activations of each training batch "
                 "({k} per token on average); at inference a learned threshold replaces the batch "
                 "selection",
    "jumprelu": "JumpReLU lets each latent fire when its pre-activation exceeds its own learned "
                "threshold",
    "relu": "a ReLU keeps the positive pre-activations, made sparse by an L1 penalty",
}
_FAMILIES = {
    "shallow": "shallow {kind}",
    "mlp-encoder": "{kind} with an MLP encoder",
    "mlp-decoder": "{kind} with an MLP decoder",
    "deep": "deep {kind}",
    "stacked": "stack of {n} residual {kind}s",
}
_TITLES = {"shallow": "Shallow", "mlp-encoder": "MLP-encoder", "mlp-decoder": "MLP-decoder",
           "deep": "Deep", "stacked": "Stacked"}
_HOOK_SITES = {"mlp_out": "MLP output", "mlp_in": "MLP input", "resid": "residual stream"}


def describe_architecture(config: DeepSAEConfig) -> str:
    """The architecture in plain words and numbers, for the card's prose."""
    kind = "transcoder" if config.transcoder else "sparse autoencoder"
    family = _FAMILIES[config.architecture.removesuffix("-transcoder")]
    reads = f"It reads {config.d_in}-dimensional activations"
    if config.transcoder:
        reads += f" (the MLP input) and predicts the {config.d_out}-dimensional MLP output"
    encoder = "a linear encoder"
    if config.encoder_hidden:
        encoder = f"{_dense_words(config.encoder_hidden, config)}, then a linear layer,"
    if config.n_stacked > 1:
        encoder = f"in each stage, {encoder}"
    sentences = [
        f"A {family.format(kind=kind, n=config.n_stacked)}.",
        f"{reads}. {encoder[0].upper()}{encoder[1:]} maps them to {config.n_latents:,} latents;",
        _SPARSITY_WORDS[config.sparsity].format(k=config.k) + ".",
    ]
    if config.is_linear_decoder:
        sentences.append(f"A linear decoder with unit-norm rows (`W_dec`, {config.n_latents:,} × "
                         f"{config.d_out}) maps the active latents back to {config.d_out} dims.")
    else:
        first, *rest = config.decoder_hidden
        norm = " + LayerNorm" if config.layer_norm else ""
        then = f"{_dense_words(rest, config)}, then " if rest else ""
        sentences.append(
            f"The active latents select rows of `W_dec` into a {first}-wide hidden layer "
            f"({config.hidden_act}{norm}); {then}a linear layer maps it to {config.d_out} dims."
        )
    if config.n_stacked > 1:
        sentences.append(f"Stage i encodes what the stages before it left unexplained; the "
                         f"{config.n_stacked} reconstructions add up and L0 is their sum.")
    if config.matryoshka_prefixes:
        sentences.append(_matryoshka_words(config))
    if config.normalize_input:
        sentences.append("Inputs are multiplied by a scale fitted on the training data and "
                         "stored with the weights (outputs are divided by it).")
    return " ".join(sentences)


def _matryoshka_words(config: DeepSAEConfig) -> str:
    """Matryoshka training in words: which nested prefixes reconstruct on their own."""
    prefixes = ", ".join(f"{prefix:,}" for prefix in config.matryoshka_prefixes)
    weights = (f"weights {', '.join(map(str, config.matryoshka_weights))}"
               if config.matryoshka_weights else "equal weights")
    return (f"Matryoshka training (Bussmann et al. 2025): the first {prefixes} latents each "
            f"learned to reconstruct on their own (the loss averages their FVUs with {weights}), "
            f"so lower latent ids hold the more general features and `encode(x, prefix=…)` "
            f"gives a smaller model.")


def _dense_words(widths: list[int], config: DeepSAEConfig) -> str:
    norm = " + LayerNorm" if config.layer_norm else ""
    plural = "s" if len(widths) > 1 else ""
    return (f"{len(widths)} dense layer{plural} of width {', '.join(map(str, widths))} "
            f"({config.hidden_act}{norm})")


def _architecture_rows(sae: DeepSAEModel) -> list[tuple[str, str]]:
    config = sae.config
    rows = [
        ("Architecture", f"`{config.architecture}`"),
        ("Input width `d_in`", str(config.d_in)),
        ("Output width `d_out`", str(config.d_out)),
        ("Latents per stage", f"{config.n_latents:,}"),
        ("Stacked stages", str(config.n_stacked)),
        ("Sparsity", f"`{config.sparsity}`"),
    ]
    if config.sparsity in ("topk", "batchtopk"):
        rows.append(("k (active latents per token and stage)", str(config.k)))
    rows += [
        ("Encoder hidden widths", str(config.encoder_hidden or "none (linear)")),
        ("Decoder hidden widths", str(config.decoder_hidden or "none (linear)")),
    ]
    if config.encoder_hidden or config.decoder_hidden:
        rows += [("Hidden activation", config.hidden_act), ("LayerNorm", str(config.layer_norm))]
    if config.matryoshka_prefixes:
        rows.append(("Matryoshka prefixes", ", ".join(map(str, config.matryoshka_prefixes))))
    if config.normalize_input:
        rows.append(("Input scale", f"{float(sae.input_scale):.4g}"))
    rows.append(("Parameters", f"{sae.num_parameters():,}"))
    return rows


def _flat(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """A record's scalar entries; nested dicts are flattened (`optimizer.lr`), lists joined,
    local paths reduced to their names."""
    flat: dict[str, Any] = {}
    for key, value in (record or {}).items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{inner}": v for inner, v in _flat(value).items()})
        elif isinstance(value, list | tuple):
            flat[key] = ", ".join(str(public_value(item)) for item in value)
        elif value is not None:
            flat[key] = public_value(value)
    return flat


def _format(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.2%}" if "fraction" in key.split("_") else f"{value:.4g}"


def _metrics(config: DeepSAEConfig) -> dict[str, float]:
    """Numeric evaluation results of `config.metrics`, nested groups flattened to their keys."""
    metrics: dict[str, float] = {}
    for key, value in _flat(config.metrics).items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics[key.rsplit(".", 1)[-1]] = value
    return metrics


def _eval_results(config: DeepSAEConfig, hookpoint: str | None = None) -> list[EvalResult]:
    dataset = training_corpus(config).index_name
    results = []
    for key, value in _metrics(config).items():
        if key in _NOT_RESULTS or not math.isfinite(value):
            continue
        label = METRICS.get(key, (key, ""))[0]
        results.append(EvalResult(
            task_type="feature-extraction", task_name="Sparse autoencoding",
            dataset_type=dataset, dataset_name=dataset, metric_type=key,
            metric_name=f"{label} @ {hookpoint}" if hookpoint else label,
            metric_config=hookpoint, metric_value=float(value),
        ))
    return results


def _card_data(configs: Mapping[str, DeepSAEConfig], model_name: str, license: str,
               per_hookpoint: bool) -> ModelCardData:
    base_models = sorted({c.base_model_name_or_path for c in configs.values()
                          if is_hub_id(c.base_model_name_or_path)})
    datasets = sorted({d for c in configs.values() for d in training_corpus(c).hub_datasets})
    tags = ["sparse-autoencoder", "interpretability"]
    for config in configs.values():
        architecture = config.architecture
        tags += [architecture if config.transcoder else f"{architecture}-sae", config.sparsity]
        tags += ["matryoshka"] if config.matryoshka_prefixes else []
    eval_results = [
        result for name, config in configs.items()
        for result in _eval_results(config, name if per_hookpoint else None)
    ]
    neuronpedia = {name: config.neuronpedia_id for name, config in configs.items()
                   if config.neuronpedia_id}
    links = ({"neuronpedia_id": neuronpedia[""]} if "" in neuronpedia
             else {"neuronpedia_ids": neuronpedia} if neuronpedia else {})
    return ModelCardData(
        library_name="hf_deepsae", license=license, tags=list(dict.fromkeys(tags)),
        base_model=base_models or None, datasets=datasets or None, model_name=model_name,
        eval_results=eval_results or None, **links,
    )


def _render(template: str, **variables: Any) -> ModelCard:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR), undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False,
    )
    return ModelCard(environment.get_template(template).render(**variables))


def neuronpedia_url(neuronpedia_id: str) -> str:
    """The feature pages of an SAE's Neuronpedia id (`"<model_id>/<source>"`)."""
    return f"{NEURONPEDIA_URL}/{neuronpedia_id}"


def _where(config: DeepSAEConfig) -> str:
    site = _HOOK_SITES.get(config.hook_site, config.hook_site)
    if config.hookpoint is not None:
        return f"`{config.hookpoint}` ({site})"
    if config.layer is not None:
        return f"the {site} of layer {config.layer}"
    return "an unrecorded hookpoint"


def sae_card(sae: DeepSAEModel, *, repo_id: str, subfolder: str | None = None,
             density_plot: str | None = None, license: str = DEFAULT_LICENSE) -> ModelCard:
    """The model card of one SAE, from `model_cards/sae.md`.

    Args:
        repo_id: where the SAE lives (the card's loading code uses it).
        subfolder: its folder inside the repo, if any.
        density_plot: file name of the feature-density image next to the card, if any.
    """
    config = sae.config
    base = config.base_model_name_or_path
    tokens, data = training_corpus(config)[:2]
    weights = (config.training_config or {}).get("model_weights")
    metrics = _metrics(config)
    noun = "transcoder" if config.transcoder else "SAE"
    title = f"{_TITLES[config.architecture.removesuffix('-transcoder')]} {noun}"
    if base:
        title += f" for {base.rstrip('/').split('/')[-1]}"
    if config.layer is not None:
        site = "MLP" if config.transcoder else _HOOK_SITES.get(config.hook_site, config.hook_site)
        title += f", layer {config.layer} {site}"
    l0 = (f"{config.n_stacked * config.k}" if config.sparsity == "topk"
          else _format("l0", metrics["l0"]) if "l0" in metrics else "data-dependent")
    trained_on = (f"{tokens:,} tokens" if tokens else "an unrecorded number of tokens") + (
        f" of {data}" if data else "")
    facts = [
        ("Base model", (f"`{public_value(base)}`" if base else "unrecorded")
         + (f" (weights: {weights})" if weights else "")),
        ("Hookpoint", _where(config)),
        ("Layer", "unrecorded" if config.layer is None else str(config.layer)),
        ("Latents", f"{config.n_total_latents:,}"),
        ("Active latents per token (L0)", l0),
        ("Trained on", trained_on),
    ] + [(METRICS[key][0], _format(key, metrics[key])) for key in ("fvu", "ce_loss_score")
         if key in metrics]
    if config.neuronpedia_id:
        facts.append(("Feature pages", f"[Neuronpedia: {config.neuronpedia_id}]"
                                       f"({neuronpedia_url(config.neuronpedia_id)})"))
    summary = (f"A sparse autoencoder made with hf_deepsae: {config.n_total_latents:,} latents "
               f"({config.architecture}, {config.sparsity}) reading {_where(config)} of "
               f"{f'`{public_value(base)}`' if base else 'its language model'}.")
    if config.transcoder:
        summary = summary.replace("A sparse autoencoder", "A transcoder")
    training_words = (f"Trained on {trained_on}." if config.training_config else
                      "No training record was saved with this SAE (`config.training_config`).")
    card_data = _card_data({"": config}, repo_id.rstrip("/").split("/")[-1], license, False)
    d_out = config.d_out
    return _render(
        "sae.md",
        card_data=card_data.to_yaml(), title=title, summary=summary, facts=facts,
        architecture_words=describe_architecture(config),
        architecture_rows=_architecture_rows(sae), training_words=training_words,
        training_rows=[(key, _format(key, value)) for key, value in
                       _flat(training_record(config)).items()],
        metric_rows=[(METRICS.get(key, (key, ""))[0], _format(key, value),
                      METRICS.get(key, ("", ""))[1]) for key, value in metrics.items()],
        density_plot=density_plot, repo_id=repo_id, d_in=config.d_in,
        subfolder_arg=f', subfolder="{subfolder}"' if subfolder else "",
        target_arg=f", target=torch.randn(8, {d_out})" if config.transcoder else "",
        hookpoint_words=_where(config), base_model=base or "<base model>",
        install_command=install_command(),
        splice_target="sae" if config.hookpoint or config.layer is not None
        else '{"<module path>": sae}',
    )


def collection_card(saes: Mapping[str, DeepSAEModel], *, repo_id: str,
                    license: str = DEFAULT_LICENSE) -> ModelCard:
    """The repo-level card of SAEs trained together (one subfolder each), from
    `model_cards/sae_collection.md`."""
    configs = {name: sae.config for name, sae in saes.items()}
    bases = sorted({c.base_model_name_or_path for c in configs.values()
                    if c.base_model_name_or_path})
    rows = []
    for name, config in configs.items():
        metrics = _metrics(config)
        rows.append({
            "subfolder": name, "hookpoint": _where(config), "architecture": config.architecture,
            "latents": f"{config.n_total_latents:,}",
            "neuronpedia": neuronpedia_url(config.neuronpedia_id) if config.neuronpedia_id
            else None,
            **{key: _format(key, metrics[key]) if key in metrics else "—"
               for key in ("l0", "fvu", "ce_loss_score")},
        })
        if config.sparsity == "topk":
            rows[-1]["l0"] = str(config.n_stacked * config.k)
    model_name = repo_id.rstrip("/").split("/")[-1]
    of = f" for {', '.join(f'`{public_value(b)}`' for b in bases)}" if bases else ""
    noun = ("transcoder" if all(c.transcoder for c in configs.values())
            else "sparse autoencoder") + ("s" if len(saes) > 1 else "")
    return _render(
        "sae_collection.md",
        card_data=_card_data(configs, model_name, license, True).to_yaml(),
        title=f"{len(saes)} {noun}{of}",
        summary=(f"{noun[0].upper()}{noun[1:]} made with hf_deepsae{of}, one per hookpoint, "
                 f"trained together. Each lives in its own subfolder." if len(saes) > 1 else
                 f"A {noun} made with hf_deepsae{of}, in the subfolder named after its hookpoint."),
        rows=rows, repo_id=repo_id, first_subfolder=next(iter(configs)),
        base_model=bases[0] if bases else "<base model>", release_name=model_name,
        install_command=install_command(),
        sae_ids=release_ids(configs),
    )


def release_ids(configs: Mapping[str, DeepSAEConfig]) -> dict[str, str]:
    """Short SAE ids for a release entry (`layer_6`, `layer_6_transcoder`) -> subfolder.

    Falls back to the subfolder names when layers are unknown or two SAEs share an id.
    """
    ids = {(f"layer_{config.layer}" + ("_transcoder" if config.transcoder else "")
            if config.layer is not None else name): name for name, config in configs.items()}
    return ids if len(ids) == len(configs) else {name: name for name in configs}
