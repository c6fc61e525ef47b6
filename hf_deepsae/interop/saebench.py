"""Any `DeepSAEModel` as a SAEBench custom SAE, so SAEBench's evals run on it unchanged.

SAEBench evaluates objects implementing `sae_bench.custom_saes.base_sae.BaseSAE`: `encode`,
`decode`, `forward`, and the tensors `W_enc` `[d, n]`, `W_dec` `[n, d]` (unit-norm rows, checked
by `check_decoder_norms`), `b_enc`, `b_dec`, plus a `cfg` naming the TransformerLens hook.
`SAEBenchAdapter` runs the real model for `encode`/`decode`/`forward` and rescales each latent by
the norm of its effective decoder direction, so `W_dec` rows are unit vectors:

- linear decoder: `W_dec[i]` is the decoder row and `encode(x) @ W_dec + b_dec == decode(encode(x))`
  exactly, as SAEBench assumes;
- deep (nonlinear) decoder: `W_dec[i]` is the normalised effective direction
  `decode(a·e_i) − decode(0)` at activation `a` (`latent_directions`), marked by
  `linear_decoder=False`: evals that only use directions (absorption, SCR/TPP ablations go through
  `decode`) mean what they say near `a`; a product `latents @ W_dec` is not the reconstruction;
- nonlinear encoder: there is no `W_enc`; it is NaN, so SAEBench's encoder statistics read NaN
  instead of meaning something false. `b_dec` is the reconstruction of all-zero latents.

Transcoders don't fit SAEBench (it reconstructs the hook it reads) and are refused. This module
imports `sae_bench`; `hf_deepsae.interop.SAEBenchAdapter` loads it on first use.
"""

from __future__ import annotations

import torch
from sae_bench.custom_saes.base_sae import BaseSAE

from ..modeling_deepsae import DeepSAEModel
from .linear import folded_linear_state

# DeepSAEConfig.hook_site -> the TransformerLens hook of the same activations in block L
_TL_HOOKS = {"mlp_out": "hook_mlp_out", "resid": "hook_resid_post",
             "mlp_in": "ln2.hook_normalized"}


class SAEBenchAdapter(BaseSAE):
    """A `DeepSAEModel` behind SAEBench's `BaseSAE` interface.

    Args:
        sae: any non-transcoder SAE (deep, stacked, MLP-encoder, shallow).
        model_name: the TransformerLens name of the base model SAEBench loads (e.g.
            `"gpt2"`, `"google/gemma-2-2b"`); defaults to `config.base_model_name_or_path`.
        hook_layer, hook_name: where the SAE reads; default from `config.layer`/`hook_site`.
        direction_activation: the activation at which a nonlinear decoder's effective directions
            are taken (a latent's typical value is a good choice); ignored for linear decoders.
    """

    def __init__(self, sae: DeepSAEModel, model_name: str | None = None, *,
                 hook_layer: int | None = None, hook_name: str | None = None,
                 direction_activation: float = 1.0) -> None:
        config = sae.config
        if config.transcoder:
            raise ValueError("SAEBench evaluates SAEs that reconstruct the activations they read; "
                             "this is a transcoder (evaluate it with hf_deepsae.evaluate_saes)")
        model_name = model_name or config.base_model_name_or_path
        hook_layer = config.layer if hook_layer is None else hook_layer
        if model_name is None or hook_layer is None:
            raise ValueError("SAEBench needs the base model's name and the hook's layer; pass "
                             "model_name= and hook_layer= (the SAE's config records neither)")
        hook_name = hook_name or f"blocks.{hook_layer}.{_TL_HOOKS[config.hook_site]}"
        super().__init__(config.d_in, config.n_total_latents, model_name, hook_layer,
                         sae.device, sae.dtype, hook_name=hook_name)
        self.sae = sae.eval()
        self.linear_decoder = config.is_linear_decoder and config.n_stacked == 1
        self.linear_encoder = not config.encoder_hidden and config.n_stacked == 1
        self.cfg.architecture = f"hf_deepsae-{config.architecture}"
        self._set_tensors(direction_activation)

    @torch.no_grad()
    def _set_tensors(self, direction_activation: float) -> None:
        sae = self.sae
        activation = 1.0 if self.linear_decoder else direction_activation
        directions = sae.latent_directions(activation=activation).float()
        norms = directions.norm(dim=-1).clamp_min(1e-12)
        self.register_buffer("latent_scales", norms.to(sae.dtype))
        self.W_dec.copy_(directions / norms[:, None])
        zero_latents = torch.zeros(1, sae.config.n_total_latents, dtype=sae.dtype,
                                   device=sae.device)
        self.b_dec.copy_(sae.decode(zero_latents)[0])
        if self.linear_encoder:
            state = folded_linear_state(sae)
            self.W_enc.copy_(state["W_enc"] * norms)
            self.b_enc.copy_((state["b_enc"] - state["b_dec"] @ state["W_enc"]) * norms)
        else:
            self.W_enc.fill_(torch.nan)
            self.b_enc.fill_(torch.nan)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents `[..., n_total_latents]`, each scaled by its direction's norm."""
        return self.sae.encode_dense(x.to(self.sae.dtype)) * self.latent_scales

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """The real decoder's reconstruction of (possibly edited) latents from `encode`."""
        return self.sae.decode(feature_acts.to(self.sae.dtype) / self.latent_scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
