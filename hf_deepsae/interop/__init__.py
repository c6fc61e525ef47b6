"""Bridges to the tools interpretability researchers already use, one module per foreign format.

- `sparsify`: EleutherAI sparsify checkpoints (SAEs, transcoders, skip transcoders), both ways.
- `saelens`: SAELens checkpoints (standard/topk/jumprelu SAEs and transcoders), both ways.

Linear SAEs convert exactly (every scale and bias convention folded into the weights); what a
format can't hold (a deep decoder is not a `W_dec`) raises with the alternative.
"""

from .saelens import from_saelens, to_saelens
from .sparsify import from_sparsify, to_sparsify

__all__ = ["from_saelens", "from_sparsify", "to_saelens", "to_sparsify"]
