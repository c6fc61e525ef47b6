"""Bridges to the tools interpretability researchers already use, one module per foreign format.

- `sparsify`: EleutherAI sparsify checkpoints (SAEs, transcoders, skip transcoders), both ways.
- `saelens`: SAELens checkpoints (standard/topk/jumprelu SAEs and transcoders), both ways.
- `circuit_tracer`: per-layer (skip) transcoder sets for circuit-tracer's attribution graphs.
- `hooked_sae`: any SAE (deep and stacked too) inside SAELens' `HookedSAETransformer`
  (`to_hooked_sae`; imports `sae_lens` on first use).

Linear SAEs convert exactly (every scale and bias convention folded into the weights); what a
format can't hold (a deep decoder is not a `W_dec`) raises with the alternative.
"""

from .circuit_tracer import from_circuit_tracer, load_circuit_tracer_set, to_circuit_tracer
from .saelens import from_saelens, to_saelens
from .sparsify import from_sparsify, to_sparsify

__all__ = [
    "DeepSAELensSAE", "from_circuit_tracer", "from_saelens", "from_sparsify",
    "load_circuit_tracer_set", "to_circuit_tracer", "to_hooked_sae", "to_saelens", "to_sparsify",
]
_NEEDS_SAE_LENS = ("DeepSAELensSAE", "to_hooked_sae")


def __getattr__(name: str):
    """`to_hooked_sae` and `DeepSAELensSAE` subclass SAELens' classes: import it only for them."""
    if name in _NEEDS_SAE_LENS:
        from . import hooked_sae

        return getattr(hooked_sae, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
