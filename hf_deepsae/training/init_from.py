"""`--init_from`: fine-tune an existing SAE (any format hf_deepsae reads) instead of a fresh one.

The run adopts the checkpoint's architecture, so its flags need not repeat it; a flag the user
set to another value than the checkpoint's is an error listing each difference (silently
training another shape than asked, or silently ignoring the flag, would both surprise). A flag
at the recipe's default can't be told from an unset one, so it quietly takes the checkpoint's
value. Loss weights and every training setting still come from the run; a resumed fine-tune
reads `--init_from` again for the architecture, so it must still exist. The SAE must read the
run's site with the run's width. Its weights (input scale and `b_dec` included: no data-based
initialisation) start the run; the optimizer, schedules and dead-latent counts start fresh.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..configuration_deepsae import DeepSAEConfig
from ..hub import load_sae
from ..interop import from_saelens, from_sparsify
from ..interop.saelens import SAELENS_FILES
from ..interop.sparsify import SPARSIFY_FILES
from ..modeling_deepsae import DeepSAEModel
from ..sites import sae_sites
from .config import sae_config_kwargs
from .targets import Target

ARCHITECTURE_FIELDS = ("n_latents", "k", "sparsity", "encoder_hidden", "decoder_hidden",
                       "hidden_act", "layer_norm", "n_stacked", "transcoder", "skip_connection",
                       "normalize_input")
"""The `SAEArguments` that shape the weights or the forward pass: `--init_from` takes them from
the checkpoint (`expansion_factor` is checked against its `n_latents`)."""


def load_initial_sae(source: str) -> DeepSAEModel:
    """The SAE at `source`: a sparsify or SAELens checkpoint folder (converted), else an
    hf_deepsae folder, Hub repo or release (`hub.load_sae`)."""
    folder = Path(source)
    if all((folder / name).is_file() for name in SPARSIFY_FILES):
        return from_sparsify(folder)
    if all((folder / name).is_file() for name in SAELENS_FILES):
        return from_saelens(folder)
    return load_sae(source)


def adopt_architecture(sae_kwargs: dict[str, Any], initial: DeepSAEConfig,
                       source: str) -> dict[str, Any]:
    """`sae_kwargs` with the checkpoint's architecture; raises `ValueError` listing every flag
    set (away from its default) to another value than the checkpoint's."""
    defaults = sae_config_kwargs(None)
    conflicts = [f"--{name} {sae_kwargs[name]!r} (the checkpoint's: {getattr(initial, name)!r})"
                 for name in ARCHITECTURE_FIELDS if sae_kwargs[name] != defaults[name]
                 and sae_kwargs[name] != getattr(initial, name)]
    factor = sae_kwargs["expansion_factor"]
    if factor != defaults["expansion_factor"] and factor * initial.d_in != initial.n_latents:
        conflicts.append(f"--expansion_factor {factor} (the checkpoint's n_latents: "
                         f"{initial.n_latents} = {initial.n_latents / initial.d_in:g}·d_in)")
    if conflicts:
        raise ValueError(f"--init_from {source} has another architecture than these flags ask "
                         "for:\n  " + "\n  ".join(conflicts) + "\nThe checkpoint's architecture "
                         "is used: drop these flags, or train a fresh SAE without --init_from")
    return {**sae_kwargs, **{name: getattr(initial, name) for name in ARCHITECTURE_FIELDS}}


def check_initial_site(initial: DeepSAEModel, source: str, targets: list[Target],
                       sae_config: DeepSAEConfig, model: Any) -> None:
    """The run trains one SAE, at the site `initial` was trained on, with its widths."""
    if len(targets) != 1:
        raise ValueError(f"--init_from starts one SAE, but the run trains {len(targets)} "
                         f"({[target.hookpoint for target in targets]}); pass one --layers or "
                         "--hookpoints entry")
    target = targets[0]
    widths = [(name, getattr(initial.config, name), getattr(sae_config, name))
              for name in ("d_in", "d_out") if getattr(initial.config, name) !=
              getattr(sae_config, name)]
    if widths:
        shown = ", ".join(f"{name} {theirs} (this run's site: {ours})"
                          for name, theirs, ours in widths)
        raise ValueError(f"--init_from {source} has {shown}: it was trained on another site or "
                         f"model than {target.hookpoint} of {sae_config.base_model_name_or_path}; "
                         "pass the --hookpoints/--layers and --model_name_or_path it was "
                         "trained on, or another --init_from")
    if initial.config.hookpoint is None and initial.config.layer is None:
        return  # a converted SAE that names no site: the widths are all there is to check
    try:
        read, write = sae_sites(model, initial.config)
    except ValueError as error:
        raise ValueError(f"--init_from {source}: its site ({error}) is not in this model; pass "
                         "the --model_name_or_path it was trained on") from None
    if (read, write) != (target.read, target.write):
        raise ValueError(f"--init_from {source} was trained at {write.path} ({write.side}), not "
                         f"at this run's {target.write.path} ({target.write.side}); pass "
                         f"--hookpoints {write.path}, or another --init_from")


def initial_sae(init_from: str | None, sae_kwargs: dict[str, Any]
                ) -> tuple[DeepSAEModel | None, dict[str, Any]]:
    """`(the SAE to start from or None, the run's SAE arguments with its architecture)`."""
    if init_from is None:
        return None, sae_kwargs
    initial = load_initial_sae(init_from)
    return initial, adopt_architecture(sae_kwargs, initial.config, init_from)
