"""`DeepSAEModel`: shallow, MLP-encoder, deep, stacked and transcoder SAEs as one `PreTrainedModel`.

Every architecture is a stack of `SparseStage`s (one unless `n_stacked > 1`). A stage is
`encoder MLP → Linear → sparsity → decoder (W_dec, then an optional MLP) + b_dec`. Stacked stages
are residual: stage i encodes what stages < i left unexplained and the reconstructions add up.

This file, `configuration_deepsae.py`, `sparsity.py`, `pre_activation_std.py` and `precision.py`
are copied next to every saved checkpoint (`auto_map`), so they import nothing from hf_deepsae
beyond each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .configuration_deepsae import DeepSAEConfig
from .pre_activation_std import gram_pre_act_std, mean_row_std
from .sparsity import (
    SPARSITY_CLASSES,
    JumpReLU,
    Workspace,
    gather_linear,
    selection_pre_acts,
    sparse_decode,
    topk_select,
)


class SparseLatents(NamedTuple):
    """A batch's latents: k (value, global id) pairs per row, or dense rows if `indices` is None."""

    latent_acts: torch.Tensor
    latent_indices: torch.Tensor | None


@dataclass
class DeepSAEOutput(ModelOutput):
    """What `DeepSAEModel.forward` returns.

    Args:
        reconstruction: `[..., d_out]`, the SAE's estimate of the target.
        latent_acts: `[..., n_stacked * k]` values for `topk`; dense `[..., n_total_latents]` else.
        latent_indices: `[..., n_stacked * k]` global latent ids for `topk`; `None` else.
        fvu: fraction of variance unexplained, `Σ‖x̂ - y‖² / Σ‖y - ȳ‖²` over the batch.
        aux_loss: AuxK loss of dead latents on the residual error (0 without a `dead_mask`).
        pre_act_std: mean over rows of the std of the encoder pre-activations across latents.
        loss: `fvu + auxk_coefficient·aux_loss + std_coefficient·pre_act_std` + the L1/L0 penalty.
    """

    reconstruction: torch.Tensor | None = None
    latent_acts: torch.Tensor | None = None
    latent_indices: torch.Tensor | None = None
    fvu: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    pre_act_std: torch.Tensor | None = None
    loss: torch.Tensor | None = None


class _StageResult(NamedTuple):
    hidden: torch.Tensor
    pre_acts: torch.Tensor
    latent_acts: torch.Tensor
    latent_indices: torch.Tensor | None
    reconstruction: torch.Tensor


def dense_stack(d_in: int, widths: list[int], config: DeepSAEConfig) -> nn.Sequential:
    """`Linear → act [→ LayerNorm]` per width: the dense nonlinear layers of deep SAEs."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(d_in, width), ACT2FN[config.hidden_act]]
        if config.layer_norm:
            layers.append(nn.LayerNorm(width))
        d_in = width
    return nn.Sequential(*layers)


class DecoderMLP(nn.Module):
    """The nonlinear tail of a deep decoder, after the sparse first layer `z @ W_dec`."""

    def __init__(self, config: DeepSAEConfig) -> None:
        super().__init__()
        first, *rest = config.decoder_hidden
        self.bias = nn.Parameter(torch.zeros(first))
        self.act = ACT2FN[config.hidden_act]
        self.norm = nn.LayerNorm(first) if config.layer_norm else nn.Identity()
        self.layers = dense_stack(first, rest, config)
        self.out = nn.Linear(([first] + rest)[-1], config.d_out, bias=False)

    def forward(self, first_layer: torch.Tensor) -> torch.Tensor:
        return self.out(self.layers(self.norm(self.act(first_layer + self.bias))))


class SparseStage(nn.Module):
    """One sparse layer with its dense encoder/decoder MLPs."""

    def __init__(self, config: DeepSAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder_mlp = dense_stack(config.d_in, config.encoder_hidden, config)
        encoder_width = config.encoder_hidden[-1] if config.encoder_hidden else config.d_in
        self.encoder = nn.Linear(encoder_width, config.n_latents)
        self.sparsity = SPARSITY_CLASSES[config.sparsity](config)
        self.pre_act_workspace = Workspace()
        decoder_width = config.decoder_hidden[0] if config.decoder_hidden else config.d_out
        self.W_dec = nn.Parameter(torch.empty(config.n_latents, decoder_width))
        self.b_dec = nn.Parameter(torch.zeros(config.d_out))
        self.decoder_mlp = DecoderMLP(config) if config.decoder_hidden else None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor | None]:
        """Hidden input of the sparse layer, its pre-activations, and the sparse latents.

        A top-k stage's pre-activations carry no gradient and, on CPU, live in the stage's
        reused workspace: the next call overwrites them.
        """
        if not self.config.transcoder:
            x = x - self.b_dec
        hidden = self.encoder_mlp(x)
        if self.config.is_topk:  # the gradient flows through the k selected latents only
            pre_acts = selection_pre_acts(hidden, self.encoder, self.config.topk_selection_dtype,
                                          self.pre_act_workspace)
        else:
            pre_acts = self.encoder(hidden)
        latent_acts, latent_indices = self.sparsity(hidden, self.encoder, pre_acts)
        return hidden, pre_acts, latent_acts, latent_indices

    def _first_decoder_layer(self, latent_acts: torch.Tensor,
                             latent_indices: torch.Tensor | None) -> torch.Tensor:
        """`z @ W_dec`: an embedding bag over the k active latents, or a matmul for dense z."""
        if latent_indices is None:
            return latent_acts.to(self.W_dec.dtype) @ self.W_dec
        return sparse_decode(latent_acts, latent_indices, self.W_dec)

    def decode_delta(self, latent_acts: torch.Tensor,
                     latent_indices: torch.Tensor | None) -> torch.Tensor:
        """The decoder's output minus its output for all-zero latents (no bias terms)."""
        first_layer = self._first_decoder_layer(latent_acts, latent_indices)
        if self.decoder_mlp is None:
            return first_layer
        return self.decoder_mlp(first_layer) - self.decoder_mlp(torch.zeros_like(first_layer))

    def decode(self, latent_acts: torch.Tensor,
               latent_indices: torch.Tensor | None) -> torch.Tensor:
        first_layer = self._first_decoder_layer(latent_acts, latent_indices)
        decoded = first_layer if self.decoder_mlp is None else self.decoder_mlp(first_layer)
        return decoded + self.b_dec

    def select(self, hidden: torch.Tensor, pre_acts: torch.Tensor,
               indices: torch.Tensor) -> torch.Tensor:
        """Pre-activations at `indices`, differentiable whichever way `pre_acts` was computed."""
        if pre_acts.requires_grad:
            return pre_acts.gather(-1, indices)
        return gather_linear(hidden, self.encoder, indices, pre_acts)

    def pre_act_std(self, hidden: torch.Tensor, pre_acts: torch.Tensor,
                    differentiable: bool) -> torch.Tensor:
        """Mean over rows of the std of the pre-activations across latents.

        Top-k pre-activations carry no gradient, so the differentiable value comes from the
        encoder's second moments (`gram_pre_act_std`); a value only logged takes the cheap path.
        """
        if not differentiable:
            return mean_row_std(pre_acts)
        if pre_acts.requires_grad:
            return pre_acts.float().std(dim=-1).mean()
        return gram_pre_act_std(hidden, self.encoder)


class DeepSAEPreTrainedModel(PreTrainedModel):
    """Weight init, checkpoint checks and `auto_map` registration shared by every SAE class."""

    config_class = DeepSAEConfig
    base_model_prefix = "sae"
    main_input_name = "x"
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, DecoderMLP):
            init.zeros_(module.bias)
            init.zeros_(module.out.weight)  # start at x̂ = b_dec: measured fewer dead latents
        elif isinstance(module, JumpReLU):
            init.constant_(module.threshold, module.init_threshold)
        elif isinstance(module, SparseStage):
            self._init_stage(module)
        elif isinstance(module, DeepSAEModel):
            init.ones_(module.input_scale)
            init.ones_(module.output_scale)

    @staticmethod
    def _init_stage(stage: SparseStage) -> None:
        """Linear decoder = encoderᵀ with unit-norm rows (Gao et al.); random rows otherwise."""
        init.zeros_(stage.b_dec)
        if getattr(stage.W_dec, "_is_hf_initialized", False):
            return
        if stage.W_dec.shape == stage.encoder.weight.shape:
            init.copy_(stage.W_dec, stage.encoder.weight)
        else:
            init.kaiming_uniform_(stage.W_dec, a=math.sqrt(5))
        if stage.decoder_mlp is None:
            stage.W_dec.div_(stage.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path | None, *args: Any,
                        **kwargs: Any):
        """`PreTrainedModel.from_pretrained`, but a checkpoint that doesn't match is an error.

        transformers only warns about missing or unexpected weights and re-initialises them; for an
        SAE that silently yields a random model, so here they fail with the offending names.
        """
        wants_info = kwargs.pop("output_loading_info", False)
        allow_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True,
                ignore_mismatched_sizes=True, **kwargs
            )
        except SafetensorError as error:
            raise ValueError(
                f"the safetensors file of {pretrained_model_name_or_path} is corrupt or truncated "
                f"({error}); re-save or re-download the checkpoint"
            ) from error
        problems = {
            "missing": sorted(map(str, info.get("missing_keys") or [])),
            "unexpected": sorted(map(str, info.get("unexpected_keys") or [])),
            "size mismatch": [] if allow_mismatch
            else sorted(map(str, info.get("mismatched_keys") or [])),
        }
        problems = {name: keys for name, keys in problems.items() if keys}
        if problems:
            raise ValueError(
                f"the weights in {pretrained_model_name_or_path} don't match its config "
                f"({problems}); the checkpoint is corrupt or its config.json was edited: re-save it"
            )
        return (model, info) if wants_info else model


class DeepSAEModel(DeepSAEPreTrainedModel):
    """A sparse autoencoder (or transcoder) of any architecture `DeepSAEConfig` describes.

    Example:
        >>> config = DeepSAEConfig(d_in=64, expansion_factor=8, k=8, encoder_hidden=[128])
        >>> sae = DeepSAEModel(config)
        >>> out = sae(torch.randn(4, 10, 64))
        >>> out.reconstruction.shape, out.latent_indices.shape
        (torch.Size([4, 10, 64]), torch.Size([4, 10, 8]))
    """

    def __init__(self, config: DeepSAEConfig) -> None:
        super().__init__(config)
        self.stages = nn.ModuleList(SparseStage(config) for _ in range(config.n_stacked))
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("output_scale", torch.ones(()))
        self.post_init()

    @property
    def W_dec(self) -> torch.Tensor:
        """`[n_latents, d_out]` decoder directions (single-stage linear decoders only)."""
        return self._linear_stage().W_dec

    @property
    def b_dec(self) -> torch.Tensor:
        return self._linear_stage().b_dec

    def _linear_stage(self) -> SparseStage:
        if self.config.n_stacked != 1 or not self.config.is_linear_decoder:
            raise AttributeError(
                f"W_dec/b_dec exist only for single-stage linear decoders; this SAE is "
                f"{self.config.architecture!r} — use stages[i].W_dec or decode()"
            )
        return self.stages[0]

    def _check_activations(self, x: torch.Tensor, name: str, width: int) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [..., {width}], got {type(x)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point (fp32/bf16/fp16), got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != width:
            raise ValueError(
                f"{name} must have shape [..., {width}] (this SAE's "
                f"{'d_in' if name == 'x' else 'd_out'}), got {tuple(x.shape)}"
            )
        if self.config.check_inputs and not torch.isfinite(x).all():
            raise ValueError(
                f"{name} contains NaN or inf; clean the activations (or set config.check_inputs="
                f"False to skip this check)"
            )

    def _prepare(self, x: torch.Tensor, name: str, width: int, scale: torch.Tensor) -> torch.Tensor:
        self._check_activations(x, name, width)
        return x.reshape(-1, width).to(self.dtype) * scale.to(self.dtype)

    def _run_stages(self, x: torch.Tensor) -> list[_StageResult]:
        results, residual = [], x
        for stage in self.stages:
            hidden, pre_acts, latent_acts, latent_indices = stage.encode(residual)
            reconstruction = stage.decode(latent_acts, latent_indices)
            results.append(_StageResult(hidden, pre_acts, latent_acts, latent_indices,
                                        reconstruction))
            if not self.config.transcoder:
                residual = residual - reconstruction
        return results

    def _gather_latents(self, results: list[_StageResult]) -> SparseLatents:
        acts = torch.cat([result.latent_acts for result in results], dim=-1)
        if not self.config.is_topk:
            return SparseLatents(acts, None)
        offsets = [result.latent_indices + i * self.config.n_latents
                   for i, result in enumerate(results)]
        return SparseLatents(acts, torch.cat(offsets, dim=-1))

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None,
                dead_mask: torch.Tensor | None = None,
                std_coefficient: float | None = None) -> DeepSAEOutput:
        """Encode, decode and score a batch.

        Args:
            x: `[..., d_in]` activations.
            target: `[..., d_out]` what to reconstruct; defaults to `x` (required for transcoders).
            dead_mask: `[n_total_latents]` bool, latents considered dead; enables the AuxK loss.
            std_coefficient: overrides `config.std_coefficient` (for decay schedules).
        """
        config = self.config
        if config.transcoder and target is None:
            raise ValueError("a transcoder needs target= (the MLP output it predicts)")
        leading_shape = x.shape[:-1] if isinstance(x, torch.Tensor) else ()
        inputs = self._prepare(x, "x", config.d_in, self.input_scale)
        targets = inputs if target is None else self._prepare(
            target, "target", config.d_out, self.output_scale)
        results = self._run_stages(inputs)
        reconstruction = sum(result.reconstruction for result in results)
        error = reconstruction - targets
        fvu = error.float().pow(2).sum() / _total_variance(targets)
        aux_loss = self._auxk_loss(results, error.detach(), dead_mask)
        std_weight = config.std_coefficient if std_coefficient is None else std_coefficient
        pre_act_std = torch.stack([
            stage.pre_act_std(result.hidden, result.pre_acts, differentiable=std_weight > 0)
            for stage, result in zip(self.stages, results, strict=True)
        ]).mean()
        loss = fvu + config.auxk_coefficient * aux_loss + std_weight * pre_act_std
        loss = loss + self._sparsity_penalty(results)
        latents = self._gather_latents(results)
        return DeepSAEOutput(
            reconstruction=(reconstruction / self.output_scale).reshape(*leading_shape, -1),
            latent_acts=latents.latent_acts.reshape(*leading_shape, -1),
            latent_indices=None if latents.latent_indices is None
            else latents.latent_indices.reshape(*leading_shape, -1),
            fvu=fvu, aux_loss=aux_loss, pre_act_std=pre_act_std, loss=loss,
        )

    def _auxk_loss(self, results: list[_StageResult], error: torch.Tensor,
                   dead_mask: torch.Tensor | None) -> torch.Tensor:
        """AuxK (Gao et al.): the top `k_aux` dead latents try to explain the residual error."""
        zero = error.new_zeros((), dtype=torch.float32)
        if dead_mask is None or self.config.sparsity not in ("topk", "batchtopk"):
            return zero
        dead_mask = dead_mask.to(error.device, torch.bool)
        if dead_mask.shape != (self.config.n_total_latents,):
            raise ValueError(f"dead_mask must have shape [{self.config.n_total_latents}], "
                             f"got {tuple(dead_mask.shape)}")
        num_dead = int(dead_mask.sum())
        if num_dead == 0:
            return zero
        aux_reconstruction = torch.zeros_like(error)
        for stage, result, stage_dead in zip(
            self.stages, results, dead_mask.split(self.config.n_latents), strict=True
        ):
            k_aux = min(self.config.k_aux, int(stage_dead.sum()))
            if k_aux == 0:
                continue
            masked = result.pre_acts.detach().masked_fill(~stage_dead, -torch.inf)
            indices = topk_select(masked, k_aux)
            values = F.relu(stage.select(result.hidden, result.pre_acts, indices))
            aux_reconstruction = aux_reconstruction + stage.decode_delta(values, indices)
        scale = min(num_dead / self.config.k_aux, 1.0)
        return scale * (aux_reconstruction - error).float().pow(2).sum() / _total_variance(error)

    def _sparsity_penalty(self, results: list[_StageResult]) -> torch.Tensor:
        """L1 (weighted by decoder norms when linear) for `relu`; the L0 estimate for `jumprelu`."""
        penalty = results[0].reconstruction.new_zeros((), dtype=torch.float32)
        for stage, result in zip(self.stages, results, strict=True):
            if self.config.sparsity == "relu":
                acts = result.latent_acts.float()
                if stage.decoder_mlp is None:
                    acts = acts * stage.W_dec.float().norm(dim=1)
                penalty = penalty + self.config.l1_coefficient * acts.sum(-1).mean()
            elif self.config.sparsity == "jumprelu":
                penalty = penalty + self.config.l0_coefficient * stage.sparsity.l0(result.pre_acts)
        return penalty

    def encode(self, x: torch.Tensor) -> SparseLatents:
        """Sparse latents of `x` (`[..., d_in]`); global ids across stacked stages."""
        leading_shape = x.shape[:-1] if isinstance(x, torch.Tensor) else ()
        latents = self._gather_latents(
            self._run_stages(self._prepare(x, "x", self.config.d_in, self.input_scale)))
        return SparseLatents(
            latents.latent_acts.reshape(*leading_shape, -1),
            None if latents.latent_indices is None
            else latents.latent_indices.reshape(*leading_shape, -1),
        )

    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Latents of `x` as a dense `[..., n_total_latents]` tensor."""
        return self.densify(*self.encode(x))

    def densify(self, latent_acts: torch.Tensor,
                latent_indices: torch.Tensor | None) -> torch.Tensor:
        """Scatter sparse (value, global id) pairs into a dense `[..., n_total_latents]` tensor."""
        if latent_indices is None:
            return latent_acts
        dense = latent_acts.new_zeros(*latent_acts.shape[:-1], self.config.n_total_latents)
        return dense.scatter_add(-1, latent_indices, latent_acts)

    @torch.no_grad()
    def latent_directions(self, latent_indices: torch.Tensor | None = None, *,
                          activation: float = 1.0, block_size: int = 4096) -> torch.Tensor:
        """`[m, d_out]`: what each latent adds to the reconstruction, per unit of activation.

        The effective direction `(decode(a·e_i) − decode(0)) / a` of global latent `i` (default:
        every latent), in the activation space the SAE reads (input scaling undone). For a linear
        decoder it is exactly the row `W_dec[i]`, whatever `a`; for a deep decoder it depends on
        the activation `a` it is taken at (1 by default; a latent's typical value is a better
        choice), so metrics built on it describe the decoder only near that value. Latents of
        stacked stages use their own stage's decoder.
        """
        n_latents = self.config.n_latents
        if latent_indices is None:
            latent_indices = torch.arange(self.config.n_total_latents, device=self.device)
        ids = latent_indices.reshape(-1).to(self.device)
        out_of_range = (ids < 0) | (ids >= self.config.n_total_latents)
        if out_of_range.any():
            raise ValueError(f"latent ids must lie in [0, {self.config.n_total_latents}), got "
                             f"{ids[out_of_range].tolist()[:8]}")
        directions = torch.empty(ids.numel(), self.config.d_out, dtype=self.dtype,
                                 device=self.device)
        for start in range(0, ids.numel(), block_size):
            block = ids[start:start + block_size]
            for stage_index, stage in enumerate(self.stages):
                in_stage = torch.div(block, n_latents, rounding_mode="floor") == stage_index
                if not in_stage.any():
                    continue
                local = (block[in_stage] - stage_index * n_latents).unsqueeze(-1)
                values = torch.full(local.shape, activation, dtype=self.dtype, device=self.device)
                directions[start:start + block.numel()][in_stage] = (
                    stage.decode_delta(values, local) / activation)
        return directions / self.output_scale

    def decode(self, latent_acts: torch.Tensor,
               latent_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction `[..., d_out]` from sparse (values, global ids) or dense latents."""
        n_latents = self.config.n_latents
        leading_shape = latent_acts.shape[:-1]
        acts = latent_acts.reshape(-1, latent_acts.shape[-1])
        if latent_indices is None:
            if acts.shape[-1] != self.config.n_total_latents:
                raise ValueError(f"dense latents must have shape [..., "
                                 f"{self.config.n_total_latents}], got {tuple(latent_acts.shape)}")
            chunks = [(chunk, None) for chunk in acts.split(n_latents, dim=-1)]
        else:
            if latent_indices.shape != latent_acts.shape:
                raise ValueError(f"latent_indices {tuple(latent_indices.shape)} must match "
                                 f"latent_acts {tuple(latent_acts.shape)}")
            indices = latent_indices.reshape(acts.shape)
            stage_of = torch.div(indices, n_latents, rounding_mode="floor")
            chunks = [(acts * (stage_of == i), (indices - i * n_latents).clamp(0, n_latents - 1))
                      for i in range(self.config.n_stacked)]
        reconstruction = sum(stage.decode(chunk_acts, chunk_indices)
                             for stage, (chunk_acts, chunk_indices) in zip(self.stages, chunks,
                                                                           strict=True))
        return (reconstruction / self.output_scale).reshape(*leading_shape, -1)

    @torch.no_grad()
    def initialize_from_activations(self, x: torch.Tensor, target: torch.Tensor | None = None
                                    ) -> None:
        """Fit the stored input scale (if `normalize_input`) and set `b_dec` to the data mean.

        The scale maps the mean activation norm to `sqrt(d)` so that one learning rate suits any
        model; it is saved with the weights so a loaded SAE applies it by itself.
        """
        target = x if target is None else target
        self._check_activations(x, "x", self.config.d_in)
        self._check_activations(target, "target", self.config.d_out)
        x, target = x.reshape(-1, self.config.d_in).float(), target.reshape(-1, self.config.d_out)
        if self.config.normalize_input:
            self.input_scale.fill_(self.config.d_in ** 0.5 / x.norm(dim=-1).mean().clamp_min(1e-8))
            self.output_scale.fill_(
                self.config.d_out ** 0.5 / target.float().norm(dim=-1).mean().clamp_min(1e-8))
        self.stages[0].b_dec.copy_(target.float().mean(0) * self.output_scale)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rescale linear decoder rows to unit norm, so `W_dec` rows are comparable directions."""
        for stage in self._linear_decoder_stages():
            stage.W_dec.div_(stage.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Drop the gradient along each unit decoder row, so the norm stays 1 to first order."""
        for stage in self._linear_decoder_stages():
            if stage.W_dec.grad is None:
                continue
            parallel = (stage.W_dec.grad * stage.W_dec).sum(dim=1, keepdim=True)
            stage.W_dec.grad.sub_(parallel * stage.W_dec)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Push weights, modeling code and hf_deepsae's model card in one commit.

        Keyword arguments are those of `hf_deepsae.hub.push_sae_to_hub`. A checkpoint loaded with
        `trust_remote_code` in a process without hf_deepsae gets transformers' generic push instead.
        """
        try:
            from hf_deepsae.hub import push_sae_to_hub
        except ImportError:
            return super().push_to_hub(repo_id, **kwargs)
        return push_sae_to_hub(self, repo_id, **kwargs)

    def _linear_decoder_stages(self) -> list[SparseStage]:
        return [stage for stage in self.stages if stage.decoder_mlp is None]


def _total_variance(values: torch.Tensor) -> torch.Tensor:
    """`Σ‖y - ȳ‖²` over rows, in fp32, floored so a constant batch doesn't divide by zero."""
    values = values.float()
    return (values - values.mean(0)).pow(2).sum().clamp_min(1e-12)


DeepSAEConfig.register_for_auto_class()
DeepSAEModel.register_for_auto_class("AutoModel")
