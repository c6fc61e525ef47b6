"""Where SAEs attach in a transformers model: MLP sites per layer, and capturing activations there.

A `Site` is one side (input or output) of one module. An SAE reads its activations at one site and
writes its reconstruction to another: the same site for SAEs, the MLP's input and output for
transcoders. `find_mlp_sites` maps each layer to the module whose output is the MLP's own
contribution to the residual stream, before any residual add, dropout-add or post-norm that
includes the residual (Bloom's `dense_4h_to_h`, BERT's `output.dense`, T5's `wo`).
"""

from __future__ import annotations

import difflib
import math
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.pytorch_utils import Conv1D

from .configuration_deepsae import DeepSAEConfig

SiteKey = int | str


class Site(NamedTuple):
    """One side of one module: `Site("model.layers.6.mlp", "input")` is the MLP input of layer 6."""

    path: str
    side: Literal["input", "output"] = "output"


class MlpLayout(NamedTuple):
    """Where a model family keeps its MLPs.

    `layers` is the path suffix of the `ModuleList` of layers; `mlp_input` (whose input is the MLP
    input) and `mlp_output` (whose output is the MLP output) are paths relative to each layer.
    """

    layers: str
    mlp_input: str
    mlp_output: str


_LLAMA = MlpLayout("layers", "mlp", "mlp.down_proj")
_MOE = MlpLayout("layers", "mlp", "mlp")  # the whole sparse-MoE block (router, experts, shared)
_POST_NORM = MlpLayout("layers", "mlp", "post_feedforward_layernorm")  # as Gemma Scope's mlp_out
_GPT2 = MlpLayout("h", "mlp", "mlp.c_proj")  # a Conv1D
_DENSE_4H_TO_H = MlpLayout("h", "mlp", "mlp.dense_4h_to_h")  # BloomMLP's output adds the residual
_BERT = MlpLayout("layer", "intermediate", "output.dense")  # BertOutput adds residual + LayerNorm
_T5 = MlpLayout("encoder.block", "layer.1.DenseReluDense", "layer.1.DenseReluDense.wo")

MLP_LAYOUTS: dict[str, MlpLayout] = {
    "gpt2": _GPT2, "gpt_neo": _GPT2, "gptj": MlpLayout("h", "mlp", "mlp.fc_out"),
    "gpt_neox": MlpLayout("layers", "mlp", "mlp.dense_4h_to_h"),
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA,
    "phi3": _LLAMA, "mixtral": _MOE, "qwen2_moe": _MOE, "qwen3_moe": _MOE,
    "gemma2": _POST_NORM, "gemma3": _POST_NORM, "gemma3_text": _POST_NORM, "olmo2": _POST_NORM,
    "phi": MlpLayout("layers", "mlp", "mlp.fc2"), "opt": MlpLayout("layers", "fc1", "fc2"),
    "bloom": _DENSE_4H_TO_H, "falcon": _DENSE_4H_TO_H,
    "bert": _BERT, "roberta": _BERT, "t5": _T5,
}
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe", "mlp_block")


class _LayerSites(NamedTuple):
    layer: str
    mlp_input: str
    mlp_output: str


def linear_width(module: nn.Module, side: str) -> int | None:
    """Feature count of a Linear or GPT-2 `Conv1D` on one side; None for other modules."""
    if isinstance(module, nn.Linear):
        return module.in_features if side == "input" else module.out_features
    if isinstance(module, Conv1D):
        return module.nx if side == "input" else module.nf
    return None


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _fallback_mlp(block: nn.Module, hidden_size: int | None) -> tuple[str, str] | None:
    """(input, output) paths of a block's MLP: an MLP-named child (whole if MoE, else its last
    hidden-width Linear), or fairseq-style `fc1`/`fc2` children."""
    children = dict(block.named_children())
    name = next((name for name in MLP_NAMES if name in children), None)
    if name is None:
        return ("fc1", "fc2") if {"fc1", "fc2"} <= children.keys() else None
    mlp = children[name]
    if _has(mlp, "experts"):
        return name, name
    widths = {path: linear_width(module, "output") for path, module in mlp.named_modules()}
    linears = [path for path, width in widths.items()
               if path and width is not None and hidden_size in (None, width)]
    return name, f"{name}.{linears[-1]}" if linears else name


def _layer_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and len(module) > 0]


def _sites_from_table(model: nn.Module, n_layers: int | None) -> list[_LayerSites] | None:
    """Sites from `MLP_LAYOUTS`, if the model's type is there and its modules match the layout."""
    layout = MLP_LAYOUTS.get(getattr(getattr(model, "config", None), "model_type", None))
    if layout is None:
        return None
    matching = [
        (name, blocks) for name, blocks in _layer_lists(model)
        if (name == layout.layers or name.endswith("." + layout.layers))
        and all(_has(block, layout.mlp_input) and _has(block, layout.mlp_output)
                for block in blocks)
    ]
    if not matching:
        return None
    name, blocks = min(matching, key=lambda item: len(item[1]) != n_layers)
    return [_LayerSites(f"{name}.{i}", f"{name}.{i}.{layout.mlp_input}",
                        f"{name}.{i}.{layout.mlp_output}") for i in range(len(blocks))]


def _sites_from_fallback(model: nn.Module, n_layers: int | None,
                         hidden_size: int | None) -> list[_LayerSites] | None:
    """Sites of the first layer list (`_no_split_modules` blocks first) whose blocks have an MLP."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    lists = sorted(_layer_lists(model), key=lambda item: (
        type(item[1][0]).__name__ not in no_split, len(item[1]) != n_layers))
    for name, blocks in lists:
        mlps = [_fallback_mlp(block, hidden_size) for block in blocks]
        if all(mlps):
            return [_LayerSites(f"{name}.{i}", f"{name}.{i}.{mlp_in}", f"{name}.{i}.{mlp_out}")
                    for i, (mlp_in, mlp_out) in enumerate(mlps)]
    return None


def _find_layer_sites(model: nn.Module) -> list[_LayerSites]:
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = getattr(text_config, "num_hidden_layers", None)
    sites = _sites_from_table(model, n_layers) or _sites_from_fallback(
        model, n_layers, getattr(text_config, "hidden_size", None))
    if sites is not None:
        return sites
    candidates = [name for name, module in model.named_modules()
                  if ".0." in f".{name}." and linear_width(module, "output") is not None][:20]
    raise ValueError(
        f"cannot find the MLP of each layer in {type(model).__name__}: no layout in MLP_LAYOUTS "
        f"matches and no ModuleList of layers has a child named one of {list(MLP_NAMES)} (or "
        f"fc1/fc2). Linear modules of layer 0: {candidates}. Pass module paths instead, e.g. "
        f"splice(model, {{'<path of the MLP output projection>': sae}})"
    )


def check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got "
                        f"{type(model).__name__}")


def find_mlp_sites(model: nn.Module) -> dict[int, str]:
    """Layer index → path of the module whose output is that layer's MLP output.

    Known families come from `MLP_LAYOUTS` (keyed by `model.config.model_type`); others fall back to
    the `ModuleList` of layers (`_no_split_modules` classes or `num_hidden_layers` long), its child
    named like an MLP (`MLP_NAMES`) and that child's last hidden-width Linear (the whole child for
    mixture-of-experts blocks). Raises `ValueError` listing candidate modules when nothing fits.
    """
    check_model(model)
    return {i: sites.mlp_output for i, sites in enumerate(_find_layer_sites(model))}


def resolve_path(model: nn.Module, path: str) -> str:
    """`path` as named in `model`, accepting paths relative to the base model (`layers.6.mlp`)."""
    names = {name for name, _ in model.named_modules()}
    prefix = getattr(model, "base_model_prefix", "")
    for candidate in (path, f"{prefix}.{path}", path.removeprefix(f"{prefix}.")):
        if candidate in names:
            return candidate
    close = difflib.get_close_matches(path, names, n=3, cutoff=0.6)
    raise ValueError(f"{type(model).__name__} has no module {path!r}; did you mean one of {close}? "
                     f"find_mlp_sites(model) lists each layer's MLP output")


def resolve_sites(model: nn.Module, key: SiteKey, transcoder: bool = False,
                  hook_site: str = "mlp_out") -> tuple[Site, Site]:
    """(read, write) sites for a layer index or module path.

    A layer index picks the site `hook_site` names at that layer (`"mlp_out"`, `"mlp_in"` or
    `"resid"`: the layer's output); a module path is read at its output (input for `"mlp_in"`). A
    transcoder reads the MLP input and writes the MLP output of the layer its key names.
    """
    if isinstance(key, bool) or not isinstance(key, int | str):
        raise TypeError(f"sites are layer indices (int) or module paths (str), got {key!r}")
    layers = _find_layer_sites(model) if isinstance(key, int) or transcoder else []
    if isinstance(key, int):
        if not 0 <= key < len(layers):
            raise ValueError(f"layer {key} is out of range: {type(model).__name__} has "
                             f"{len(layers)} layers with an MLP (0..{len(layers) - 1})")
        sites = layers[key]
    else:
        path = resolve_path(model, key)
        sites = next((s for s in layers if path in (s.mlp_input, s.mlp_output)),
                     _LayerSites(path, path, path))
    if transcoder:
        return Site(sites.mlp_input, "input"), Site(sites.mlp_output, "output")
    if isinstance(key, str):
        site = Site(sites.mlp_output, "input" if hook_site == "mlp_in" else "output")
    elif hook_site == "mlp_in":
        site = Site(sites.mlp_input, "input")
    elif hook_site == "resid":
        site = Site(sites.layer, "output")
    else:
        site = Site(sites.mlp_output, "output")
    return site, site


def default_key(config: DeepSAEConfig) -> SiteKey:
    """The site an SAE config names: its `hookpoint`, else its `layer`."""
    key = config.hookpoint if config.hookpoint is not None else config.layer
    if key is None:
        raise ValueError("the SAE's config names no hookpoint or layer; pass {layer_or_path: sae}")
    return key


def sae_sites(model: nn.Module, config: DeepSAEConfig, key: SiteKey | None = None
              ) -> tuple[Site, Site]:
    """Where an SAE with `config` reads its input and writes its reconstruction in `model`.

    `key` (layer index or module path) defaults to `config.hookpoint`, then `config.layer`; see
    `resolve_sites`. For training: `capture_activations(model, ids, sae_sites(model, config))`.
    """
    key = default_key(config) if key is None else key
    return resolve_sites(model, key, config.transcoder, config.hook_site)


def attach_hook(module: nn.Module, side: str,
                fn: Callable[[torch.Tensor], torch.Tensor | None]) -> RemovableHandle:
    """Call `fn` on the hidden states at one side of `module`; a returned tensor replaces them.

    Inputs are the first positional argument (or `hidden_states=`); outputs are the tensor, or the
    first element of a tuple or `ModelOutput`, as transformers layers return them.
    """
    if side == "input":
        def pre_hook(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def post_hook(_: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return fn(output)
        new = fn(output[0])
        if new is None:
            return None
        if isinstance(output, dict):  # a ModelOutput: replace its first field
            output[next(iter(output))] = new
            return output
        return type(output)((new, *output[1:]))
    return module.register_forward_hook(post_hook, with_kwargs=True)


def check_token_batch(input_ids: Any, attention_mask: Any = None) -> None:
    """`input_ids` is an integer `[batch, seq]` tensor and `attention_mask` (if any) matches it."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 \
            or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor of token ids [batch, seq], got "
                         f"{describe_value(input_ids)}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty ({tuple(input_ids.shape)}); pass at least one token")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        raise ValueError(f"attention_mask must have the shape of input_ids "
                         f"{tuple(input_ids.shape)}, got {describe_value(attention_mask)}")


def describe_value(value: Any) -> str:
    """`value` for an error message: a tensor's dtype and shape, else its type."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def unflatten_tokens(tensor: torch.Tensor, batch_shape: torch.Size | None) -> torch.Tensor:
    """`[batch * seq, d]` → `[batch, seq, d]`, undoing the flattening some layers (OPT) apply."""
    if (batch_shape and tensor.shape[:-1] != batch_shape
            and math.prod(tensor.shape[:-1]) == math.prod(batch_shape)):
        return tensor.reshape(*batch_shape, tensor.shape[-1])
    return tensor


class SiteUse(NamedTuple):
    """The sites one active splice reads and those it changes, and how to name it in errors."""

    owner: str
    reads: frozenset[Site]
    writes: frozenset[Site]


_ACTIVE_SPLICES: weakref.WeakKeyDictionary[nn.Module, dict[int, SiteUse]] = (
    weakref.WeakKeyDictionary())


def site_conflict(model: nn.Module, reads: Iterable[Site], writes: Iterable[Site]) -> str | None:
    """Why reading `reads` and changing `writes` of `model` would compose with an active splice.

    Two hooks on one site run in the order they were attached, so the later one would read (or
    overwrite) the earlier one's reconstruction: a result that depends on nesting order. Reading
    a site beside another reader is fine; anything else on a site some splice changes is not.
    """
    reads, writes = set(reads), set(writes)
    for use in _ACTIVE_SPLICES.get(model, {}).values():
        shared = (writes & (use.reads | use.writes)) | (reads & use.writes)
        if shared:
            return (f"{sorted(shared)} {'is' if len(shared) == 1 else 'are'} already used by "
                    f"{use.owner}; nested splices on one site would compose silently, so remove "
                    f"that splice first (leave its `with` block or call handle.remove())")
    return None


def register_splice(model: nn.Module, key: int, use: SiteUse) -> None:
    _ACTIVE_SPLICES.setdefault(model, {})[key] = use


def unregister_splice(model: nn.Module, key: int) -> None:
    _ACTIVE_SPLICES.get(model, {}).pop(key, None)


class _StopForward(Exception):
    """Raised by a capture hook once every requested site is recorded: skip the later layers."""


@torch.no_grad()
def capture_activations(model: nn.Module, input_ids: torch.Tensor, sites: Iterable[SiteKey | Site],
                        attention_mask: torch.Tensor | None = None) -> dict[Any, torch.Tensor]:
    """Run `model` on a batch and return the activations at `sites`, skipping layers after them.

    Args:
        sites: layer indices (that layer's MLP output), module paths (the module's output) or
            `Site`s (e.g. `Site(path, "input")`, as `sae_sites` returns for transcoders).
    Returns:
        `{site: [batch, seq, width]}` keyed as given, in the model's dtype; padding not removed.

    A site an active splice changes is refused: what it holds would depend on the splice.
    """
    check_model(model)
    check_token_batch(input_ids, attention_mask)
    wanted = {key: key if isinstance(key, Site) else resolve_sites(model, key)[0] for key in sites}
    wanted = {key: Site(resolve_path(model, site.path), site.side) for key, site in wanted.items()}
    unique_sites = set(wanted.values())
    conflict = site_conflict(model, unique_sites, ())
    if conflict is not None:
        raise ValueError(f"capture_activations: {conflict}")
    if not unique_sites:
        return {}
    captured: dict[Site, torch.Tensor] = {}

    def recorder(site: Site) -> Callable[[torch.Tensor], None]:
        def record(tensor: torch.Tensor) -> None:
            captured[site] = tensor.clone()  # a snapshot: Falcon adds to its MLP output in place
            if len(captured) == len(unique_sites):
                raise _StopForward
        return record

    hooks = [attach_hook(model.get_submodule(site.path), site.side, recorder(site))
             for site in unique_sites]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    except _StopForward:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    missing = sorted(unique_sites - captured.keys())
    if missing:
        raise ValueError(f"the forward pass never ran {missing}; pick sites the model executes")
    return {key: unflatten_tokens(captured[site], input_ids.shape) for key, site in wanted.items()}
