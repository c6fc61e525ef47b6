"""Any `DeepSAEModel` inside SAELens' `HookedSAETransformer`, deep and stacked ones included.

SAELens' file format holds one linear layer, so `to_saelens` refuses deep, MLP-encoder and stacked
SAEs. `to_hooked_sae(sae, hook_name)` instead wraps the model itself in a `sae_lens.SAE` subclass:
`HookedSAETransformer.add_sae` attaches it like any SAELens SAE, its `encode` returns the dense
latents through `hook_sae_acts_post` (so SAELens' caching, ablation and steering hooks see them)
and its `decode` runs the real (nonlinear) decoder. What it can't offer: `W_enc`/`W_dec` (a deep
decoder has none: use `sae.deep_sae.latent_directions()` for effective directions), SAELens'
`save_model`/`load_from_disk` (save the `DeepSAEModel` with `save_pretrained`), training, and the
skip term of skip transcoders (SAELens' wrapper calls `decode(latents)` without the input).

This module imports `sae_lens`; `hf_deepsae.interop.to_hooked_sae` loads it on first use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens import SAE, SAEConfig
from sae_lens.saes.sae import SAEMetadata

from ..modeling_deepsae import DeepSAEModel


@dataclass
class DeepSAELensConfig(SAEConfig):
    """The SAELens config of a wrapped `DeepSAEModel` (architecture `"hf_deepsae"`)."""

    d_out: int | None = None

    @classmethod
    def architecture(cls) -> str:
        return "hf_deepsae"


class DeepSAELensSAE(SAE[DeepSAELensConfig]):
    """A `DeepSAEModel` behind SAELens' `SAE` interface; build it with `to_hooked_sae`."""

    def __init__(self, sae: DeepSAEModel, cfg: DeepSAELensConfig) -> None:
        super().__init__(cfg)
        self.deep_sae = sae

    def initialize_weights(self) -> None:
        """No SAELens weights: the wrapped model holds them (set after `SAE.__init__`)."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents `[..., n_total_latents]`, through `hook_sae_acts_post`."""
        sae_in = self.hook_sae_input(x.to(self.deep_sae.dtype))
        return self.hook_sae_acts_post(self.deep_sae.encode_dense(sae_in))

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """The wrapped decoder's reconstruction of (possibly edited) dense latents."""
        return self.hook_sae_recons(self.deep_sae.decode(feature_acts))


def to_hooked_sae(sae: DeepSAEModel, hook_name: str, *, hook_name_out: str | None = None
                  ) -> DeepSAELensSAE:
    """Wrap `sae` for `HookedSAETransformer.add_sae`, reading TransformerLens hook `hook_name`.

    Args:
        hook_name: e.g. `"blocks.3.hook_mlp_out"`, the activations the SAE was trained on.
        hook_name_out: for transcoders, the hook they write (e.g. `"blocks.3.hook_mlp_out"`,
            with `hook_name="blocks.3.ln2.hook_normalized"`).
    """
    config = sae.config
    if config.skip_connection:
        raise ValueError("SAELens' HookedSAETransformer decodes latents without the input, so the "
                         "W_skip x term of a skip transcoder would be lost; splice it into a "
                         "transformers model with hf_deepsae.splice instead")
    if config.transcoder and hook_name_out is None:
        raise ValueError("a transcoder writes another hook than it reads: pass hook_name_out, "
                         "e.g. 'blocks.3.hook_mlp_out'")
    cfg = DeepSAELensConfig(
        d_in=config.d_in, d_sae=config.n_total_latents, d_out=config.d_out,
        dtype=str(sae.dtype).removeprefix("torch."), device=str(sae.device),
        apply_b_dec_to_input=False,
        metadata=SAEMetadata(hook_name=hook_name, hook_name_out=hook_name_out,
                             model_name=config.base_model_name_or_path))
    return DeepSAELensSAE(sae.eval(), cfg)
