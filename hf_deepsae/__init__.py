"""hf_deepsae: deep sparse autoencoders as first-class Hugging Face models.

Importing the package registers `DeepSAEConfig`/`DeepSAEModel` with `AutoConfig`/`AutoModel`, so
`AutoModel.from_pretrained(path)` loads any SAE saved by this library.
"""

from transformers import AutoConfig, AutoModel

from .configuration_deepsae import DeepSAEConfig
from .modeling_deepsae import DeepSAEModel, DeepSAEOutput, DeepSAEPreTrainedModel, SparseLatents

AutoConfig.register(DeepSAEConfig.model_type, DeepSAEConfig, exist_ok=True)
AutoModel.register(DeepSAEConfig, DeepSAEModel, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "DeepSAEConfig",
    "DeepSAEModel",
    "DeepSAEOutput",
    "DeepSAEPreTrainedModel",
    "SparseLatents",
]
