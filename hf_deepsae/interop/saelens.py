"""SAELens checkpoints both ways: standard/topk/jumprelu SAEs and (skip) transcoders, unchanged.

A SAELens folder holds `cfg.json` (`architecture`, `d_in`, `d_sae`, `d_out` for transcoders,
`apply_b_dec_to_input`, `normalize_activations`, `k`, `rescale_acts_by_decoder_norm`,
`metadata.hook_name`/`hook_name_out`) and `sae_weights.safetensors` with `W_enc` `[d, n]`, `b_enc`,
`W_dec` `[n, d_out]`, `b_dec`, `threshold` (jumprelu) and `W_skip` `[d_out, d]` (skip
transcoders). It encodes `act((x - b_dec) @ W_enc + b_enc)` (no `b_dec` shift for transcoders):
ReLU (standard, transcoder), ReLU of the top k (topk), ReLU masked by `pre > threshold`
(jumprelu). Every difference from `DeepSAEModel` is folded into the weights exactly; what SAELens
can't hold (deep, stacked, per-token normalisation) raises. Nonlinear SAEs run inside SAELens'
`HookedSAETransformer` through `to_hooked_sae` (`hooked_sae.py`) instead.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..files import FileFormatError, load_safetensors, read_json
from ..modeling_deepsae import DeepSAEModel
from .linear import (
    build_sae,
    check_linear,
    check_tensors,
    checkpoint_folder,
    folded_linear_state,
    linear_config,
    write_checkpoint,
)

SAELENS_FILES = ("cfg.json", "sae_weights.safetensors")
# SAELens architecture -> (DeepSAEConfig.sparsity, transcoder, skip connection)
SAELENS_ARCHITECTURES = {
    "standard": ("relu", False, False),
    "topk": ("topk", False, False),
    "jumprelu": ("jumprelu", False, False),
    "transcoder": ("relu", True, False),
    "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
}
# SAELens hook names (TransformerLens) -> (layer offset, DeepSAEConfig.hook_site).
_SAELENS_SITES = {
    "hook_resid_post": (0, "resid"),
    "hook_resid_pre": (-1, "resid"),  # the residual stream entering block L leaves block L - 1
    "hook_mlp_out": (0, "mlp_out"),
    "hook_mlp_in": (0, "mlp_in"),
    "ln2.hook_normalized": (0, "mlp_in"),
    "mlp.hook_in": (0, "mlp_in"),
}
_FIX = "it is not a complete SAELens checkpoint: re-save it with SAE.save_model (or re-download it)"
_SHAPES = {"W_enc": 2, "b_enc": 1, "W_dec": 2, "b_dec": 1, "W_skip": 2, "threshold": 1,
           "log_threshold": 1}


def from_saelens(path_or_repo: str | Path, subfolder: str | None = None, *,
                 hookpoint: str | None = None, revision: str | None = None,
                 token: str | None = None) -> DeepSAEModel:
    """Load a SAELens SAE (standard, topk, jumprelu) or transcoder from a folder or Hub repo.

    Args:
        path_or_repo: a folder with `cfg.json` + `sae_weights.safetensors`, or a repo id.
        subfolder: the SAE's folder inside it (SAELens repos hold one per hook, e.g.
            `"blocks.8.hook_resid_pre"`).
        hookpoint: the module path in the transformers base model, if you know it. SAELens names
            TransformerLens hooks; the layer and site (residual stream, MLP in/out) are read from
            them, which `splice` can use without a hookpoint.
    """
    folder = checkpoint_folder(path_or_repo, subfolder, SAELENS_FILES, revision, token,
                               "subfolder")
    cfg_path, weights_path = folder / "cfg.json", folder / "sae_weights.safetensors"
    cfg = read_json(cfg_path, fix=_FIX)
    metadata = {**cfg, **(cfg.get("metadata") or {})}
    architecture = _architecture(cfg)
    sparsity, transcoder, skip = SAELENS_ARCHITECTURES[architecture]
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if sparsity == "topk" and (not isinstance(k, int) or isinstance(k, bool) or k <= 0):
        raise FileFormatError(cfg_path, f"a 'topk' SAE needs a positive integer 'k' (found "
                              f"{k!r})", "add the k it was trained with to cfg.json")
    _check_normalization(cfg.get("normalize_activations"))
    weights = load_safetensors(weights_path, fix=_FIX, required=(
        "W_enc", "b_enc", "W_dec", "b_dec", *(("W_skip",) if skip else ())))
    check_tensors(weights_path, weights, _SHAPES, _FIX)
    scaling = weights.get("scaling_factor", weights.get("finetuning_scaling_factor"))
    if scaling is not None and not torch.all(scaling == 1):
        raise ValueError("this SAELens SAE has a finetuning scaling factor, which DeepSAEModel "
                         "can't represent")
    state = {name: weights[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if skip:
        state["W_skip"] = weights["W_skip"]
    if not transcoder and not cfg.get("apply_b_dec_to_input", True):
        state["b_enc"] = state["b_enc"] + state["b_dec"] @ state["W_enc"]  # we always shift
    if sparsity == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        norms = state["W_dec"].norm(dim=-1)  # select on pre·‖W_dec‖, decode with rows / ‖W_dec‖
        state.update(W_enc=state["W_enc"] * norms, b_enc=state["b_enc"] * norms,
                     W_dec=state["W_dec"] / norms[:, None])
    if sparsity == "jumprelu":
        if "threshold" not in weights and "log_threshold" not in weights:
            raise FileFormatError(weights_path, "a jumprelu SAE without 'threshold' (or "
                                  "'log_threshold')", _FIX)
        threshold = (weights["threshold"] if "threshold" in weights
                     else weights["log_threshold"].exp())
        state["threshold"] = threshold.clamp_min(0)  # SAELens ReLUs before the threshold
    hook_name = metadata.get("hook_name") or metadata.get("hook_point")
    layer, hook_site = _saelens_site(hook_name)
    config = linear_config(
        state, **({"k": k} if k else {}), sparsity=sparsity, transcoder=transcoder,
        hookpoint=hookpoint, layer=layer, hook_site="mlp_out" if transcoder else hook_site,
        base_model_name_or_path=metadata.get("model_name"),
        training_config={"converted_from": "sae-lens", "source": str(path_or_repo),
                         "architecture": architecture, **{
                             key: value for key, value in metadata.items()
                             if key in ("hook_name", "hook_name_out", "hook_point",
                                        "dataset_path", "context_size", "prepend_bos",
                                        "sae_lens_version")}},
    )
    return build_sae(config, state, weights_path, _FIX)


def to_saelens(sae: DeepSAEModel, path: str | Path, *, hook_name: str | None = None,
               hook_name_out: str | None = None) -> Path:
    """Write a single-stage linear SAE or transcoder as a SAELens folder (`SAE.load_from_disk`).

    topk → `topk`, relu → `standard`, jumprelu → `jumprelu`, and batchtopk → `jumprelu` with its
    learned inference threshold (or `topk` before one is learned, as the SAE itself behaves).
    Transcoders become `transcoder`/`jumprelu_transcoder` (with `skip_` for skip transcoders);
    SAELens has no top-k transcoder. For deep and stacked SAEs use `to_hooked_sae`.

    Args:
        hook_name: the TransformerLens hook the SAE reads (e.g. `"blocks.3.hook_mlp_out"`), which
            `HookedSAETransformer.add_sae` attaches it to; defaults to `config.hookpoint`.
        hook_name_out: for transcoders, the hook it writes (e.g. `"blocks.3.hook_mlp_out"`).
    """
    config = sae.config
    check_linear(sae, "SAELens")
    state = folded_linear_state(sae)
    threshold = _inference_threshold(sae)
    if config.transcoder and (config.sparsity == "topk" or threshold is None
                              and config.sparsity == "batchtopk"):
        raise ValueError("SAELens has no top-k transcoder; export it with to_sparsify or "
                         "to_circuit_tracer, or share it with push_sae_to_hub")
    cfg: dict[str, Any] = {
        "d_in": config.d_in, "d_sae": config.n_latents, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": not config.transcoder, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.0.0",  # the cfg.json layout this writes
                     "model_name": config.base_model_name_or_path,
                     "hook_name": hook_name or config.hookpoint},
    }
    if config.transcoder:
        cfg["d_out"] = config.d_out
        cfg["metadata"]["hook_name_out"] = hook_name_out
    if threshold is None and config.sparsity in ("topk", "batchtopk"):
        cfg.update(architecture="topk", k=config.k, rescale_acts_by_decoder_norm=False)
    elif threshold is not None:
        if (threshold < 0).any():
            raise ValueError("SAELens applies a ReLU before the JumpReLU threshold, so negative "
                             "thresholds can't be written; clamp them to 0 first if acceptable")
        cfg["architecture"] = "jumprelu"
        state["threshold"] = threshold.float().expand(config.n_latents).contiguous()
    else:
        cfg["architecture"] = "standard"
    if config.transcoder:
        kind = "jumprelu_" if cfg["architecture"] == "jumprelu" else ""
        cfg["architecture"] = f"{kind}{'skip_' if config.skip_connection else ''}transcoder"
    return write_checkpoint(path, {"cfg.json": cfg, "sae_weights.safetensors": state})


def _inference_threshold(sae: DeepSAEModel) -> torch.Tensor | None:
    """The per-latent (jumprelu) or global (learned batchtopk) threshold; None for the others."""
    if sae.config.sparsity not in ("jumprelu", "batchtopk"):
        return None
    threshold = sae.stages[0].sparsity.threshold.detach()
    if sae.config.sparsity == "batchtopk" and threshold < 0:
        return None  # not learned yet: the SAE selects the top k per row
    return threshold


def _architecture(cfg: dict[str, Any]) -> str:
    architecture = cfg.get("architecture")
    if architecture is None:  # SAELens < 6 kept the kind in activation_fn(_str)
        kind = cfg.get("activation_fn") or cfg.get("activation_fn_str")
        architecture = "topk" if kind == "topk" else "standard"
    if architecture not in SAELENS_ARCHITECTURES:
        raise ValueError(f"SAELens architecture {architecture!r} has no DeepSAEModel equivalent; "
                         f"convertible: {sorted(SAELENS_ARCHITECTURES)}")
    return architecture


def _saelens_site(hook_name: str | None) -> tuple[int | None, str]:
    """Layer index and `hook_site` of a TransformerLens hook name like `blocks.8.hook_mlp_out`."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook_name or "")
    if match is None or match.group(2) not in _SAELENS_SITES:
        return None, "mlp_out"
    offset, site = _SAELENS_SITES[match.group(2)]
    layer = int(match.group(1)) + offset
    return (layer if layer >= 0 else None), site


def _check_normalization(mode: str | bool | None) -> None:
    if mode in (None, False, "none"):
        return
    if mode in (True, "expected_average_only_in"):
        warnings.warn("this SAELens SAE was trained on activations scaled to norm sqrt(d_in) and "
                      "doesn't store the factor; like SAELens' load_from_disk, the converted SAE "
                      "applies none — scale its inputs yourself", stacklevel=3)
        return
    raise ValueError(f"SAELens normalize_activations={mode!r} normalizes each token at run time, "
                     f"which DeepSAEModel can't represent")
