"""Bring SAEs from EleutherAI sparsify and SAELens, and send linear ones back: identical outputs.

Both formats keep one SAE per folder (repos hold one folder per hookpoint):

- sparsify: `cfg.json` (`d_in`, `num_latents`/`expansion_factor`, `k`, `activation`, `transcode`,
  `skip_connection`, ...) and `sae.safetensors` with `encoder.weight` `[n, d]`, `encoder.bias`,
  `W_dec` `[n, d]`, `b_dec` `[d]`. It encodes `topk(relu(encoder(x - b_dec)))` (`x` unshifted for
  transcoders) and decodes `z @ W_dec + b_dec`.
- SAELens: `cfg.json` (`architecture` standard/topk/jumprelu, `d_in`, `d_sae`,
  `apply_b_dec_to_input`, `normalize_activations`, `k`, `rescale_acts_by_decoder_norm`,
  `metadata`) and `sae_weights.safetensors` with `W_enc` `[d, n]`, `b_enc`, `W_dec` `[n, d]`,
  `b_dec`, `threshold` (jumprelu). It encodes `act((x - b_dec) @ W_enc + b_enc)`: ReLU (standard),
  ReLU of the top k (topk), ReLU masked by `pre > threshold` (jumprelu).

Every difference between these and `DeepSAEModel` is folded into the weights exactly (no b_dec
shift, decoder-norm rescaling, stored input scales), so converted SAEs compute the same function.
Formats that can't hold an SAE (deep, stacked, skip connections, per-token normalization) raise.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from safetensors.torch import load_file, save_file

from .configuration_deepsae import DeepSAEConfig
from .modeling_deepsae import DeepSAEModel

SPARSIFY_FILES = ("cfg.json", "sae.safetensors")
SAELENS_FILES = ("cfg.json", "sae_weights.safetensors")
SAELENS_SPARSITY = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
# SAELens hook names (TransformerLens) -> (layer offset, DeepSAEConfig.hook_site).
_SAELENS_SITES = {
    "hook_resid_post": (0, "resid"),
    "hook_resid_pre": (-1, "resid"),  # the residual stream entering block L leaves block L - 1
    "hook_mlp_out": (0, "mlp_out"),
    "hook_mlp_in": (0, "mlp_in"),
    "ln2.hook_normalized": (0, "mlp_in"),
}
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def from_sparsify(path_or_repo: str | Path, hookpoint: str | None = None, *,
                  revision: str | None = None, token: str | None = None) -> DeepSAEModel:
    """Load an EleutherAI sparsify SAE or transcoder from a folder or Hub repo.

    Args:
        path_or_repo: a folder with `cfg.json` + `sae.safetensors`, a folder or repo with one such
            subfolder per hookpoint, or a repo id.
        hookpoint: the subfolder to load (e.g. `"layers.6.mlp"`); needed when there are several.
            It becomes `config.hookpoint`, which `splice` resolves relative to the base model.
    """
    folder = _checkpoint_folder(path_or_repo, hookpoint, SPARSIFY_FILES, revision, token,
                                "hookpoint")
    cfg = json.loads((folder / "cfg.json").read_text())
    weights = load_file(folder / "sae.safetensors")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"sparsify activation {cfg['activation']!r} has no DeepSAEModel "
                         f"equivalent; only 'topk' SAEs convert")
    if cfg.get("skip_connection") or "W_skip" in weights:
        raise ValueError("this sparsify SAE has a skip connection (W_skip), which DeepSAEModel "
                         "can't represent")
    # sparsify names each SAE's folder after its hookpoint
    hookpoint = hookpoint or (folder.resolve().name if _layer_of(folder.resolve().name) is not None
                              else None)
    n_latents, d_in = weights["encoder.weight"].shape
    config = DeepSAEConfig(
        d_in=d_in, n_latents=n_latents, k=cfg["k"], sparsity="topk",
        transcoder=bool(cfg.get("transcode")), d_out=weights["W_dec"].shape[1],
        hookpoint=hookpoint, layer=_layer_of(hookpoint),
        training_config={"converted_from": "eai-sparsify", "source": str(path_or_repo), **cfg},
    )
    return _build(config, {
        "encoder.weight": weights["encoder.weight"], "encoder.bias": weights["encoder.bias"],
        "W_dec": weights["W_dec"], "b_dec": weights["b_dec"],
    })


def from_saelens(path_or_repo: str | Path, subfolder: str | None = None, *,
                 hookpoint: str | None = None, revision: str | None = None,
                 token: str | None = None) -> DeepSAEModel:
    """Load a SAELens SAE (standard, topk or jumprelu) from a folder or Hub repo.

    Args:
        path_or_repo: a folder with `cfg.json` + `sae_weights.safetensors`, or a repo id.
        subfolder: the SAE's folder inside it (SAELens repos hold one per hook, e.g.
            `"blocks.8.hook_resid_pre"`).
        hookpoint: the module path in the transformers base model, if you know it. SAELens names
            TransformerLens hooks; the layer and site (residual stream, MLP in/out) are read from
            them, which `splice` can use without a hookpoint.
    """
    folder = _checkpoint_folder(path_or_repo, subfolder, SAELENS_FILES, revision, token,
                                "subfolder")
    cfg = json.loads((folder / "cfg.json").read_text())
    metadata = {**cfg, **(cfg.get("metadata") or {})}
    weights = load_file(folder / "sae_weights.safetensors")
    architecture = cfg.get("architecture")
    if architecture is None:  # SAELens < 6 kept the kind in activation_fn(_str)
        kind = cfg.get("activation_fn") or cfg.get("activation_fn_str")
        architecture = "topk" if kind == "topk" else "standard"
    if architecture not in SAELENS_SPARSITY:
        raise ValueError(f"SAELens architecture {architecture!r} has no DeepSAEModel equivalent; "
                         f"convertible: {sorted(SAELENS_SPARSITY)}")
    _check_saelens_normalization(cfg.get("normalize_activations"))
    scaling = weights.get("scaling_factor", weights.get("finetuning_scaling_factor"))
    if scaling is not None and not torch.all(scaling == 1):
        raise ValueError("this SAELens SAE has a finetuning scaling factor, which DeepSAEModel "
                         "can't represent")
    W_enc, b_enc, W_dec, b_dec = (weights[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if not cfg.get("apply_b_dec_to_input", True):  # DeepSAEModel always subtracts b_dec first
        b_enc = b_enc + b_dec @ W_enc
    if architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        norms = W_dec.norm(dim=-1)  # select on pre·‖W_dec‖, decode with rows / ‖W_dec‖
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    state = {"encoder.weight": W_enc.T, "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if architecture == "jumprelu":
        threshold = weights.get("threshold")
        if threshold is None:
            threshold = weights["log_threshold"].exp()
        state["sparsity.threshold"] = threshold.clamp_min(0)  # SAELens ReLUs before the threshold
    hook_name = metadata.get("hook_name") or metadata.get("hook_point")
    layer, hook_site = _saelens_site(hook_name)
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    config = DeepSAEConfig(
        d_in=W_enc.shape[0], n_latents=W_enc.shape[1], **({"k": k} if k else {}),
        sparsity=SAELENS_SPARSITY[architecture], hookpoint=hookpoint, layer=layer,
        hook_site=hook_site, base_model_name_or_path=metadata.get("model_name"),
        training_config={"converted_from": "sae-lens", "source": str(path_or_repo),
                         "architecture": architecture, **{
                             key: value for key, value in metadata.items()
                             if key in ("hook_name", "hook_point", "dataset_path",
                                        "context_size", "prepend_bos", "sae_lens_version")}},
    )
    return _build(config, state)


def to_sparsify(sae: DeepSAEModel, path: str | Path) -> Path:
    """Write a single-stage linear top-k SAE (or transcoder) as a sparsify checkpoint folder.

    Load it back with `sparsify.SparseCoder.load_from_disk(path)`; stored input scales are folded
    into the weights, so sparsify computes the same reconstruction from raw activations.
    """
    config = sae.config
    _check_linear(sae, "sparsify")
    if config.sparsity != "topk":
        raise ValueError(f"sparsify only holds top-k SAEs; this one is {config.sparsity!r} — use "
                         f"to_saelens, or push_sae_to_hub to keep every detail")
    if config.transcoder and config.d_out != config.d_in:
        raise ValueError(f"sparsify transcoders predict d_out == d_in; this one maps "
                         f"{config.d_in} -> {config.d_out}")
    state = _folded_linear_state(sae)
    cfg = {
        "activation": "topk", "expansion_factor": max(1, config.n_latents // config.d_in),
        "normalize_decoder": True, "num_latents": config.n_latents, "k": config.k,
        "multi_topk": False, "skip_connection": False, "transcode": config.transcoder,
        "d_in": config.d_in,
    }
    return _write(path, "cfg.json", cfg, "sae.safetensors", {
        "encoder.weight": state["W_enc"].T, "encoder.bias": state["b_enc"],
        "W_dec": state["W_dec"], "b_dec": state["b_dec"],
    })


def to_saelens(sae: DeepSAEModel, path: str | Path) -> Path:
    """Write a single-stage linear SAE as a SAELens checkpoint folder (`SAE.load_from_disk`).

    topk → `topk`, relu → `standard`, jumprelu → `jumprelu`, and batchtopk → `jumprelu` with its
    learned inference threshold (or `topk` before one is learned, as the SAE itself behaves).
    """
    config = sae.config
    _check_linear(sae, "SAELens")
    if config.transcoder:
        raise ValueError("SAELens SAEs read and write the same activations; this is a transcoder "
                         "— use to_sparsify (same widths) or push_sae_to_hub")
    state = _folded_linear_state(sae)
    cfg: dict[str, Any] = {
        "d_in": config.d_in, "d_sae": config.n_latents, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.0.0",  # the cfg.json layout this writes
                     "model_name": config.base_model_name_or_path,
                     "hook_name": config.hookpoint},
    }
    threshold = sae.stages[0].sparsity.threshold.detach() if config.sparsity in (
        "jumprelu", "batchtopk") else None
    if config.sparsity == "batchtopk" and threshold < 0:
        threshold = None  # not learned yet: the SAE selects the top k per row
    if config.sparsity == "topk" or (config.sparsity == "batchtopk" and threshold is None):
        cfg.update(architecture="topk", k=config.k, rescale_acts_by_decoder_norm=False)
    elif threshold is not None:
        if (threshold < 0).any():
            raise ValueError("SAELens applies a ReLU before the JumpReLU threshold, so negative "
                             "thresholds can't be written; clamp them to 0 first if acceptable")
        cfg["architecture"] = "jumprelu"
        state["threshold"] = threshold.float().expand(config.n_latents)
    else:
        cfg["architecture"] = "standard"
    return _write(path, "cfg.json", cfg, "sae_weights.safetensors", state)


def _check_linear(sae: DeepSAEModel, format_name: str) -> None:
    config = sae.config
    if config.n_stacked != 1 or config.encoder_hidden or config.decoder_hidden:
        raise ValueError(
            f"{format_name} holds single-stage SAEs with a linear encoder and decoder; this SAE "
            f"is {config.architecture!r} (encoder_hidden={config.encoder_hidden}, decoder_hidden="
            f"{config.decoder_hidden}, n_stacked={config.n_stacked}). Share it with "
            f"push_sae_to_hub or save_pretrained instead"
        )


def _folded_linear_state(sae: DeepSAEModel) -> dict[str, torch.Tensor]:
    """`W_enc` `[d, n]`, `b_enc`, `W_dec`, `b_dec` of an SAE on raw activations, `x - b_dec` in.

    DeepSAEModel encodes `x·s_in` and divides its output by `s_out`; both scales fold into the
    weights. The shared `b_dec` needs `s_in == s_out` unless it is a transcoder.
    """
    stage, config = sae.stages[0], sae.config
    s_in, s_out = float(sae.input_scale), float(sae.output_scale)
    if not config.transcoder and s_in != s_out:
        raise ValueError(f"input_scale {s_in} != output_scale {s_out}: the b_dec shared by the "
                         f"encoder and decoder can't absorb both")
    state = {
        "W_enc": stage.encoder.weight.detach().float().T * s_in,
        "b_enc": stage.encoder.bias.detach().float(),
        "W_dec": stage.W_dec.detach().float() / s_out,
        "b_dec": stage.b_dec.detach().float() / s_out,
    }
    return {name: tensor.contiguous() for name, tensor in state.items()}


def _build(config: DeepSAEConfig, stage_state: dict[str, torch.Tensor]) -> DeepSAEModel:
    """A DeepSAEModel with these single-stage weights, in the checkpoint's dtype."""
    sae = DeepSAEModel(config)
    state = sae.state_dict() | {f"stages.0.{name}": tensor for name, tensor in stage_state.items()}
    sae.load_state_dict(state)
    return sae.to(stage_state["W_dec"].dtype).eval()


def _write(path: str | Path, cfg_name: str, cfg: dict, weights_name: str,
           weights: dict[str, torch.Tensor]) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / cfg_name).write_text(json.dumps(cfg, indent=2))
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, path / weights_name)
    return path


def _checkpoint_folder(path_or_repo: str | Path, subfolder: str | None,
                       filenames: tuple[str, ...], revision: str | None, token: str | None,
                       argument: str) -> Path:
    """The local folder holding `filenames`, downloading them from the Hub if needed.

    When they aren't there, the error lists the subfolders that hold them (pass one as
    `argument`).
    """
    local = Path(path_or_repo)
    if local.is_dir():
        folder = local / (subfolder or "")
        if all((folder / name).is_file() for name in filenames):
            return folder
        found = local.glob(f"*/{filenames[0]}")
        candidates = sorted(str(path.parent.relative_to(local)) for path in found)
    else:
        try:
            paths = [hf_hub_download(str(path_or_repo), name, subfolder=subfolder,
                                     revision=revision, token=token) for name in filenames]
            return Path(paths[0]).parent
        except EntryNotFoundError:
            files = HfApi(token=token).list_repo_files(str(path_or_repo), revision=revision)
            candidates = sorted(file.rsplit("/", 1)[0] for file in files
                                if file.endswith(f"/{filenames[0]}"))
    where = f"{path_or_repo}/{subfolder}" if subfolder else str(path_or_repo)
    hint = (f"; it holds SAEs in {candidates}: pass {argument}=<one of them>" if candidates
            else "; is this the right path or repo?")
    raise FileNotFoundError(f"{where} has no {' + '.join(filenames)}{hint}")


def _layer_of(hookpoint: str | None) -> int | None:
    match = _LAYER.search(hookpoint or "")
    return int(match.group(1)) if match else None


def _saelens_site(hook_name: str | None) -> tuple[int | None, str]:
    """Layer index and `hook_site` of a TransformerLens hook name like `blocks.8.hook_mlp_out`."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook_name or "")
    if match is None or match.group(2) not in _SAELENS_SITES:
        return None, "mlp_out"
    offset, site = _SAELENS_SITES[match.group(2)]
    layer = int(match.group(1)) + offset
    return (layer if layer >= 0 else None), site


def _check_saelens_normalization(mode: str | bool | None) -> None:
    if mode in (None, False, "none"):
        return
    if mode in (True, "expected_average_only_in"):
        warnings.warn("this SAELens SAE was trained on activations scaled to norm sqrt(d_in) and "
                      "doesn't store the factor; like SAELens' load_from_disk, the converted SAE "
                      "applies none — scale its inputs yourself", stacklevel=3)
        return
    raise ValueError(f"SAELens normalize_activations={mode!r} normalizes each token at run time, "
                     f"which DeepSAEModel can't represent")
