"""hf_deepsae: deep sparse autoencoders as first-class Hugging Face models.

Importing the package registers `DeepSAEConfig`/`DeepSAEModel` with `AutoConfig`/`AutoModel`, so
`AutoModel.from_pretrained(path)` loads any SAE saved by this library.
"""

from transformers import AutoConfig, AutoModel

from .activations import default_corpus_files, load_language_model
from .configuration_deepsae import DeepSAEConfig
from .evaluation import (
    ActivationMetrics,
    LanguageModelMetrics,
    SAEEvaluationResult,
    SAEEvaluator,
    evaluate_saes,
)
from .hub import load_sae, load_saes, push_sae_to_hub, push_saes_to_hub, save_sae, save_saes
from .interop import (
    from_circuit_tracer,
    from_saelens,
    from_sparsify,
    to_circuit_tracer,
    to_saelens,
    to_sparsify,
)
from .modeling_deepsae import DeepSAEModel, DeepSAEOutput, DeepSAEPreTrainedModel, SparseLatents
from .releases import Release, list_releases
from .sites import Site, capture_activations, find_mlp_sites
from .splice import (
    SpliceHandle,
    add_to_latents,
    base_model_mismatch,
    clamp_latents,
    scale_latents,
    splice,
    zero_latents,
)
from .training import SAEArguments, TrainingConfig, train

AutoConfig.register(DeepSAEConfig.model_type, DeepSAEConfig, exist_ok=True)
AutoModel.register(DeepSAEConfig, DeepSAEModel, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "SAEArguments",
    "TrainingConfig",
    "default_corpus_files",
    "load_language_model",
    "train",
    "ActivationMetrics",
    "LanguageModelMetrics",
    "SAEEvaluationResult",
    "SAEEvaluator",
    "base_model_mismatch",
    "evaluate_saes",
    "DeepSAEConfig",
    "DeepSAEModel",
    "DeepSAEOutput",
    "DeepSAEPreTrainedModel",
    "Site",
    "SparseLatents",
    "SpliceHandle",
    "add_to_latents",
    "capture_activations",
    "clamp_latents",
    "find_mlp_sites",
    "scale_latents",
    "splice",
    "zero_latents",
    "Release",
    "from_circuit_tracer",
    "from_saelens",
    "from_sparsify",
    "list_releases",
    "load_sae",
    "load_saes",
    "push_sae_to_hub",
    "push_saes_to_hub",
    "save_sae",
    "save_saes",
    "to_circuit_tracer",
    "to_saelens",
    "to_sparsify",
]
