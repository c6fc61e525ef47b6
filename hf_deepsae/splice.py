"""Splice SAEs into any transformers model: replace, error term, capture, and latent edits.

Like `peft`, this attaches to modules found by name and detaches exactly: nothing but forward hooks
is added, so leaving `splice` (also on an exception) restores the model bit for bit. Where to attach
is `sites.py`'s job; `find_mlp_sites` and `capture_activations` are re-exported here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .modeling_deepsae import DeepSAEModel, SparseLatents
from .sites import (
    Site,
    SiteKey,
    SiteUse,
    attach_hook,
    capture_activations,
    check_model,
    default_key,
    find_mlp_sites,
    linear_width,
    register_splice,
    resolve_sites,
    sae_sites,
    site_conflict,
    unflatten_tokens,
    unregister_splice,
)

__all__ = [
    "LatentEdit", "Site", "SpliceHandle", "add_to_latents", "base_model_mismatch",
    "capture_activations", "clamp_latents", "find_mlp_sites", "sae_sites", "scale_latents",
    "splice", "zero_latents",
]

LatentEdit = Callable[[torch.Tensor], torch.Tensor]
MODES = ("replace", "error", "capture")


@dataclass(frozen=True)
class _Binding:
    key: SiteKey
    sae: DeepSAEModel | None
    read: Site
    write: Site
    edit: LatentEdit | None


class SpliceHandle:
    """SAEs attached to a model by `splice`; also a context manager that detaches them on exit.

    Attributes:
        mode: `"replace"`, `"error"` or `"capture"`.
        sites: `{key: (read site, write site)}` per spliced SAE.
        latents: `{key: SparseLatents}` of the latest forward pass, on the autograd graph in
            `error` and `replace` modes; dense `[..., n_total_latents]` (`latent_indices` None)
            after an edit.
        activations: `{key: tensor}` the SAE input of the latest forward pass (the MLP input for
            transcoders).
    Recorded tensors are `[batch, seq, ...]`; each forward pass (each generated token) overwrites
    them.
    """

    def __init__(self, model: nn.Module, bindings: list[_Binding], mode: str) -> None:
        self.model = model
        self.mode = mode
        self.sites = {binding.key: (binding.read, binding.write) for binding in bindings}
        self.latents: dict[SiteKey, SparseLatents] = {}
        self.activations: dict[SiteKey, torch.Tensor] = {}
        self._pending: dict[SiteKey, torch.Tensor] = {}
        self._batch_shape: torch.Size | None = None
        self._hooks = [model.register_forward_pre_hook(self._remember_batch_shape,
                                                       with_kwargs=True)]
        owner = f"an active splice(mode={mode!r}) of SAEs {[binding.key for binding in bindings]}"
        register_splice(model, id(self), SiteUse(owner, *_site_use(bindings, mode)))
        for binding in bindings:
            if binding.read != binding.write:
                self._attach(binding.read, partial(self._pending.__setitem__, binding.key))
            self._attach(binding.write, partial(self._apply, binding))

    def __enter__(self) -> SpliceHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "attached" if self._hooks else "removed"
        return f"SpliceHandle(mode={self.mode!r}, sites={list(self.sites)}, {state})"

    def remove(self) -> None:
        """Detach every hook; the model is exactly as before `splice`. Safe to call twice."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._pending.clear()
        unregister_splice(self.model, id(self))

    def _remember_batch_shape(self, _: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        if isinstance(input_ids, torch.Tensor):
            self._batch_shape = input_ids.shape
        elif isinstance(embeds, torch.Tensor):
            self._batch_shape = embeds.shape[:-1]

    def _attach(self, site: Site, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        self._hooks.append(attach_hook(self.model.get_submodule(site.path), site.side, fn))

    def _apply(self, binding: _Binding, target: torch.Tensor) -> torch.Tensor | None:
        """Encode (and in `replace`/`error` mode decode) at the write site of one SAE."""
        separate = binding.read != binding.write
        source = self._pending.pop(binding.key) if separate else target
        # A snapshot: layers may modify the tensor in place afterwards (Falcon's `mlp_output +=`).
        self.activations[binding.key] = unflatten_tokens(source.clone(), self._batch_shape)
        sae = binding.sae
        if sae is None:
            return None
        _check_width(binding, "d_in", source.shape[-1])
        _check_width(binding, "d_out", target.shape[-1])
        inputs = source.to(sae.device, sae.dtype)
        if self.mode == "capture":
            with torch.no_grad():
                self._record(binding.key, sae.encode(inputs))
            return None
        latents = sae.encode(inputs)
        if binding.edit is None:
            reconstruction = clean = sae.decode(*latents, x=inputs)
        else:
            edited = _checked_edit(binding, sae.densify(*latents))
            reconstruction = sae.decode(edited, x=inputs)
            clean = sae.decode(*latents, x=inputs) if self.mode == "error" else reconstruction
            latents = SparseLatents(edited, None)
        self._record(binding.key, latents)
        reconstruction = reconstruction.to(target.device, target.dtype).reshape(target.shape)
        if self.mode == "replace":
            return reconstruction
        clean = clean.to(target.device, target.dtype).reshape(target.shape)
        # Equals `target` (plus the edit's effect) exactly, yet the gradient reaches the latents.
        return target.detach() + (reconstruction - clean.detach())

    def _record(self, key: SiteKey, latents: SparseLatents) -> None:
        acts, indices = (None if tensor is None else unflatten_tokens(tensor, self._batch_shape)
                         for tensor in latents)
        self.latents[key] = SparseLatents(acts, indices)


def _site_use(bindings: Sequence[_Binding], mode: str) -> tuple[frozenset[Site], frozenset[Site]]:
    """`(sites read, sites changed)` by SAEs spliced in `mode` (capture changes nothing)."""
    reads = frozenset(site for binding in bindings for site in (binding.read, binding.write))
    writes = frozenset() if mode == "capture" else frozenset(
        binding.write for binding in bindings if binding.sae is not None)
    return reads, writes


def _checked_edit(binding: _Binding, latents: torch.Tensor) -> torch.Tensor:
    """The edit's result, which must be finite dense latents of the same shape."""
    edited = binding.edit(latents)
    if not isinstance(edited, torch.Tensor) or edited.shape != latents.shape:
        raise ValueError(f"the edit of SAE {binding.key!r} must return the dense latents' shape "
                         f"{tuple(latents.shape)}, got "
                         f"{tuple(edited.shape) if isinstance(edited, torch.Tensor) else edited!r}")
    if not edited.is_floating_point() or not torch.isfinite(edited).all():
        raise ValueError(f"the edit of SAE {binding.key!r} returned NaN/inf or non-float latents; "
                         f"edits must produce finite values")
    return edited


def _check_width(binding: _Binding, field: str, width: int | None) -> None:
    expected = getattr(binding.sae.config, field)
    if width is not None and width != expected:
        site = binding.read if field == "d_in" else binding.write
        raise ValueError(
            f"SAE {binding.key!r} has {field}={expected} but the {site.side} of {site.path!r} has "
            f"width {width}; splice it where it was trained (config.hookpoint="
            f"{binding.sae.config.hookpoint!r}) or at a site of width {expected}"
        )


def _is_sae(obj: object) -> bool:
    """A `DeepSAEModel`, also when loaded as remote code (a different class object)."""
    config = getattr(obj, "config", None)
    return isinstance(obj, nn.Module) and getattr(config, "model_type", None) == "deepsae"


def base_model_mismatch(model: nn.Module, sae: DeepSAEModel) -> str | None:
    """Why `sae`'s latents may mean nothing in `model`, or None when it was trained there.

    Compares `sae.config.base_model_name_or_path` with the model's `name_or_path`; a local copy
    matches the Hub id its path ends with (`/models/org/name` is `org/name`), and an unknown name
    on either side matches anything. `splice` warns with the message; callers that must not go on
    (`SAEEvaluator`) raise it, so the rule and its wording live here alone.
    """
    trained_on = (sae.config.base_model_name_or_path or "").rstrip("/")
    spliced_into = (getattr(getattr(model, "config", None), "_name_or_path", "")
                    or getattr(model, "name_or_path", "") or "").rstrip("/")
    same = trained_on == spliced_into or spliced_into.endswith("/" + trained_on) or \
        trained_on.endswith("/" + spliced_into)
    if not trained_on or not spliced_into or same:
        return None
    return (f"it was trained on {trained_on!r} but is spliced into {spliced_into!r}; its latents "
            f"may mean nothing there")


def splice(model: nn.Module, saes: DeepSAEModel | Mapping[SiteKey, DeepSAEModel | None],
           mode: str = "replace",
           edit: LatentEdit | Mapping[SiteKey, LatentEdit] | None = None) -> SpliceHandle:
    """Attach SAEs to `model`; use as `with splice(...) as handle:` or call `handle.remove()`.

    Args:
        saes: `{layer index or module path: SAE}` or one SAE whose config names its `hookpoint` (or
            `layer`). Layer indices use `find_mlp_sites`. Transcoders read the MLP input and write
            the MLP output. In `capture` mode an SAE may be `None` to record raw activations only.
        mode: `"replace"`: downstream sees the reconstruction. `"error"`: downstream sees
            `x̂ + (x − x̂)` — bit-identical outputs, but the latents sit on the autograd graph (the
            error term is a constant, as in SAELens). `"capture"`: outputs untouched; latents are
            computed without gradient and recorded with the raw activations.
        edit: a function of the dense latents `[..., n_total_latents]` returning edited latents
            (`zero_latents`, `clamp_latents`, `scale_latents`, `add_to_latents`), or `{key: edit}`.
            In `error` mode outputs change by exactly `decode(edited) − decode(latents)`.

    The SAE runs in its own dtype and device; its result is cast back to the model's. An SAE
    whose weights hold NaN or inf is refused, and so is a site another active splice reads or
    changes when this one changes it (or the reverse): nested splices would compose silently.
    """
    check_model(model)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if not isinstance(saes, Mapping):
        saes = {default_key(saes.config) if _is_sae(saes) else None: saes}
    if edit is not None and mode == "capture":
        raise ValueError("edit has no effect in capture mode; use mode='replace' or 'error'")
    edits = dict(edit) if isinstance(edit, Mapping) else dict.fromkeys(saes, edit)
    if not all(callable(function) for function in edits.values() if function is not None):
        raise TypeError("edit must be a function of the dense latents (e.g. zero_latents([3])) "
                        "or a {key: function} mapping")
    if set(edits) - set(saes):
        raise ValueError(f"edit keys {sorted(map(str, set(edits) - set(saes)))} match no SAE key "
                         f"({list(saes)})")
    bindings = []
    for key, sae in saes.items():
        if sae is None and mode == "capture":
            read = write = resolve_sites(model, key)[0]
        elif _is_sae(sae):
            read, write = sae_sites(model, sae.config, key)
        else:
            raise TypeError(f"saes[{key!r}] must be a DeepSAEModel (None only in capture mode), "
                            f"got {type(sae).__name__}")
        binding = _Binding(key, sae, read, write, edits.get(key))
        if sae is not None:
            nonfinite = sae.nonfinite_weights()
            if nonfinite:
                raise ValueError(f"SAE {key!r} has NaN or inf in {nonfinite}: every activation it "
                                 f"reconstructs would be NaN; load a healthy checkpoint")
            for field, site in (("d_in", read), ("d_out", write)):
                width = linear_width(model.get_submodule(site.path), site.side)
                _check_width(binding, field, width)
            mismatch = base_model_mismatch(model, sae)
            if mismatch is not None:
                warnings.warn(f"SAE {key!r}: {mismatch}", UserWarning, stacklevel=2)
        bindings.append(binding)
    for i, binding in enumerate(bindings):
        others = bindings[:i] + bindings[i + 1:]
        reads, writes = _site_use([binding], mode)
        other_reads, other_writes = _site_use(others, mode)
        if writes & (other_reads | other_writes) or reads & other_writes:
            raise ValueError(f"SAE {binding.key!r} and another SAE of this splice use the same "
                             f"site ({binding.write}) and one changes it; splice one SAE per site")
        conflict = site_conflict(model, reads, writes)
        if conflict is not None:
            raise ValueError(f"SAE {binding.key!r}: {conflict}")
    return SpliceHandle(model, bindings, mode)


def _edit_latents(latent_ids: int | Sequence[int],
                  change: Callable[[torch.Tensor], torch.Tensor]) -> LatentEdit:
    single = isinstance(latent_ids, int) and not isinstance(latent_ids, bool)
    iterable = isinstance(latent_ids, Iterable) and not isinstance(latent_ids, str | bytes)
    ids = [latent_ids] if single else list(latent_ids) if iterable else []
    if not ids or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids):
        raise ValueError(f"latent_ids must be non-negative ints (one, or a non-empty list), got "
                         f"{latent_ids!r}")
    ids = sorted(set(ids))

    def edit(latents: torch.Tensor) -> torch.Tensor:
        if ids[-1] >= latents.shape[-1]:
            raise ValueError(f"latent id {ids[-1]} is out of range for {latents.shape[-1]} latents")
        index = torch.tensor(ids, device=latents.device)
        return latents.index_copy(-1, index, change(latents.index_select(-1, index)))
    return edit


def zero_latents(latent_ids: int | Sequence[int]) -> LatentEdit:
    """An edit that switches latents off (ablation)."""
    return _edit_latents(latent_ids, torch.zeros_like)


def clamp_latents(latent_ids: int | Sequence[int], min: float | None = None,
                  max: float | None = None) -> LatentEdit:
    """An edit that clamps latents to `[min, max]` (e.g. pin a feature on with `min=5.0`)."""
    if min is None and max is None:
        raise ValueError("clamp_latents needs min= or max= (or both)")
    for name, bound in (("min", min), ("max", max)):
        if bound is not None:
            _check_finite(name, bound)
    if min is not None and max is not None and min > max:
        raise ValueError(f"clamp_latents: min={min} is above max={max}")
    return _edit_latents(latent_ids, lambda acts: acts.clamp(min=min, max=max))


def scale_latents(latent_ids: int | Sequence[int], factor: float) -> LatentEdit:
    """An edit that multiplies latents by `factor` (amplify > 1, damp < 1)."""
    _check_finite("factor", factor)
    return _edit_latents(latent_ids, lambda acts: acts * factor)


def add_to_latents(latent_ids: int | Sequence[int], value: float) -> LatentEdit:
    """An edit that adds `value` to latents at every position (steering)."""
    _check_finite("value", value)
    return _edit_latents(latent_ids, lambda acts: acts + value)


def _check_finite(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
