"""Bridges to the tools interpretability researchers already use, one module per foreign format.

- `sparsify`: EleutherAI sparsify checkpoints (SAEs, transcoders, skip transcoders), both ways.
- `saelens`: SAELens checkpoints (standard/topk/jumprelu SAEs and transcoders), both ways.
- `circuit_tracer`: per-layer (skip) transcoder sets for circuit-tracer's attribution graphs.
- `hooked_sae`: any SAE (deep and stacked too) inside SAELens' `HookedSAETransformer`
  (`to_hooked_sae`; imports `sae_lens` on first use).
- `neuronpedia`: latents, examples, statistics and explanations as Neuronpedia upload batches.
- `saebench`: any SAE as a SAEBench custom SAE (`SAEBenchAdapter`; imports `sae_bench` on first
  use).

Linear SAEs convert exactly (every scale and bias convention folded into the weights); what a
format can't hold (a deep decoder is not a `W_dec`) raises with the alternative.
"""

import importlib

from .circuit_tracer import from_circuit_tracer, load_circuit_tracer_set, to_circuit_tracer
from .neuronpedia import to_neuronpedia
from .saelens import from_saelens, to_saelens
from .sparsify import from_sparsify, to_sparsify

__all__ = [
    "DeepSAELensSAE", "SAEBenchAdapter", "from_circuit_tracer", "from_saelens", "from_sparsify",
    "load_circuit_tracer_set", "to_circuit_tracer", "to_hooked_sae", "to_neuronpedia",
    "to_saelens", "to_sparsify",
]
# names whose modules subclass a peer library's classes: imported on first use only
_LAZY = {"DeepSAELensSAE": "hooked_sae", "to_hooked_sae": "hooked_sae",
         "SAEBenchAdapter": "saebench"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
