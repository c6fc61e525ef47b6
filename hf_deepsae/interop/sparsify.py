"""EleutherAI sparsify checkpoints both ways: SAEs, transcoders and skip transcoders, unchanged.

A sparsify folder holds `cfg.json` (`d_in`, `num_latents`/`expansion_factor`, `k`, `activation`,
`transcode`, `skip_connection`, ...) and `sae.safetensors` with `encoder.weight` `[n, d]`,
`encoder.bias`, `W_dec` `[n, d]`, `b_dec` `[d]` and, for skip transcoders, `W_skip` `[d, d]`. It
encodes `topk(relu(encoder(x - b_dec)))` (`x` unshifted for transcoders) and decodes
`z @ W_dec + b_dec (+ x @ W_skipᵀ)`. Repos hold one such folder per hookpoint.
"""

from __future__ import annotations

from pathlib import Path

from ..files import FileFormatError, load_safetensors, read_json
from ..modeling_deepsae import DeepSAEModel
from .linear import (
    build_sae,
    check_linear,
    check_tensors,
    checkpoint_folder,
    folded_linear_state,
    layer_of,
    linear_config,
    write_checkpoint,
)

SPARSIFY_FILES = ("cfg.json", "sae.safetensors")
_FIX = ("it is not a complete sparsify checkpoint: re-save it with sparsify's "
        "SparseCoder.save_to_disk (or re-download it)")
_SHAPES = {"encoder.weight": 2, "encoder.bias": 1, "W_dec": 2, "b_dec": 1, "W_skip": 2}


def from_sparsify(path_or_repo: str | Path, hookpoint: str | None = None, *,
                  revision: str | None = None, token: str | None = None) -> DeepSAEModel:
    """Load an EleutherAI sparsify SAE, transcoder or skip transcoder from a folder or Hub repo.

    Args:
        path_or_repo: a folder with `cfg.json` + `sae.safetensors`, a folder or repo with one such
            subfolder per hookpoint, or a repo id.
        hookpoint: the subfolder to load (e.g. `"layers.6.mlp"`); needed when there are several.
            It becomes `config.hookpoint`, which `splice` resolves relative to the base model.
    """
    folder = checkpoint_folder(path_or_repo, hookpoint, SPARSIFY_FILES, revision, token,
                               "hookpoint")
    cfg_path, weights_path = folder / "cfg.json", folder / "sae.safetensors"
    cfg = read_json(cfg_path, fix=_FIX, required=("k",))
    weights = load_safetensors(weights_path, fix=_FIX,
                               required=("encoder.weight", "encoder.bias", "W_dec", "b_dec"))
    check_tensors(weights_path, weights, _SHAPES, _FIX)
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"sparsify activation {cfg['activation']!r} has no DeepSAEModel "
                         f"equivalent; only 'topk' SAEs convert")
    if bool(cfg.get("skip_connection")) != ("W_skip" in weights):
        raise FileFormatError(cfg_path, f"skip_connection={cfg.get('skip_connection')} but "
                              f"{weights_path.name} {'lacks' if 'W_skip' not in weights else 'has'}"
                              " W_skip", _FIX)
    if not isinstance(cfg["k"], int) or isinstance(cfg["k"], bool) or cfg["k"] <= 0:
        raise FileFormatError(cfg_path, f"k={cfg['k']!r} is not a positive integer", _FIX)
    # sparsify names each SAE's folder after its hookpoint
    name = folder.resolve().name
    hookpoint = hookpoint or (name if layer_of(name) is not None else None)
    state = {"W_enc": weights["encoder.weight"].T, "b_enc": weights["encoder.bias"],
             "W_dec": weights["W_dec"], "b_dec": weights["b_dec"]}
    if "W_skip" in weights:
        state["W_skip"] = weights["W_skip"]
    config = linear_config(
        state, k=cfg["k"], sparsity="topk", transcoder=bool(cfg.get("transcode")),
        hookpoint=hookpoint, layer=layer_of(hookpoint),
        training_config={"converted_from": "eai-sparsify", "source": str(path_or_repo), **cfg},
    )
    return build_sae(config, state, weights_path, _FIX)


def to_sparsify(sae: DeepSAEModel, path: str | Path) -> Path:
    """Write a single-stage linear top-k SAE, transcoder or skip transcoder for sparsify.

    Load it back with `sparsify.SparseCoder.load_from_disk(path)`; stored input scales are folded
    into the weights, so sparsify computes the same reconstruction from raw activations.
    """
    config = sae.config
    check_linear(sae, "sparsify")
    if config.sparsity != "topk":
        raise ValueError(f"sparsify only holds top-k SAEs; this one is {config.sparsity!r} — use "
                         f"to_saelens, or push_sae_to_hub to keep every detail")
    if config.transcoder and config.d_out != config.d_in:
        raise ValueError(f"sparsify transcoders predict d_out == d_in; this one maps "
                         f"{config.d_in} -> {config.d_out}")
    state = folded_linear_state(sae)
    cfg = {
        "activation": "topk", "expansion_factor": max(1, config.n_latents // config.d_in),
        "normalize_decoder": True, "num_latents": config.n_latents, "k": config.k,
        "multi_topk": False, "skip_connection": config.skip_connection,
        "transcode": config.transcoder, "d_in": config.d_in,
    }
    weights = {"encoder.weight": state["W_enc"].T, "encoder.bias": state["b_enc"],
               "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    if "W_skip" in state:
        weights["W_skip"] = state["W_skip"]
    return write_checkpoint(path, {"cfg.json": cfg, "sae.safetensors": weights})
