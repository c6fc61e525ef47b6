"""`DeepSAEModel`: shallow, MLP-encoder, deep, stacked and transcoder SAEs as one `PreTrainedModel`.

Every architecture is a stack of `SparseStage`s (one unless `n_stacked > 1`). A stage is
`encoder MLP → Linear → sparsity → decoder (W_dec, then an optional MLP) + b_dec`. Stacked stages
are residual: stage i encodes what stages < i left unexplained and the reconstructions add up.

This file, `configuration_deepsae.py`, `sparsity.py`, `matryoshka.py`, `pre_activation_std.py`
and `precision.py` are copied next to every saved checkpoint (`auto_map`), so they import nothing
from hf_deepsae beyond each other.
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
from .files import FileFormatError, chmod_as_new_file
from .integrity import CheckpointFiles, nonfinite_tensors, record_weights_checksums
from .matryoshka import matryoshka_loss, prefix_reconstructions, truncate_latents
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
        fvu: fraction of variance unexplained, `Σ‖x̂ - y‖² / Σ‖y - ȳ‖²` over the batch; NaN when
            the targets have no variance (one row, or identical rows), where FVU is undefined.
        matryoshka_fvu: `[n_prefixes]` FVU of each of `config.matryoshka_prefixes`' reconstructions
            (the last, the full width, is `fvu`); None for an ordinary SAE.
        aux_loss: AuxK loss of dead latents on the residual error (0 without a `dead_mask`).
        pre_act_std: mean over rows of the std of the encoder pre-activations across latents.
        loss: `fvu + auxk_coefficient·aux_loss + std_coefficient·pre_act_std` + the L1/L0 penalty;
            a Matryoshka SAE has the weighted mean of `matryoshka_fvu` in place of `fvu`.

    A transcoder called without a target only predicts: `fvu`, `matryoshka_fvu`, `aux_loss` and
    `loss` are None, as a `transformers` model's loss without labels.
    """

    reconstruction: torch.Tensor | None = None
    latent_acts: torch.Tensor | None = None
    latent_indices: torch.Tensor | None = None
    fvu: torch.Tensor | None = None
    matryoshka_fvu: torch.Tensor | None = None
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

    def decode_prefixes(self, latent_acts: torch.Tensor, latent_indices: torch.Tensor | None,
                        ends: list[int]) -> list[torch.Tensor]:
        """`decode` of only the latents of local id < each of `ends` (increasing): Matryoshka
        prefixes. The first decoder layer is summed block by block, so dense latents cost one full
        matmul in all; each prefix then goes through the whole decoder MLP."""
        outputs, first_layer, start = [], 0.0, 0
        for end in ends:
            first_layer = first_layer + self._block_first_layer(latent_acts, latent_indices,
                                                                start, end)
            decoded = first_layer if self.decoder_mlp is None else self.decoder_mlp(first_layer)
            outputs.append(decoded + self.b_dec)
            start = end
        return outputs

    def _block_first_layer(self, latent_acts: torch.Tensor, latent_indices: torch.Tensor | None,
                           start: int, end: int) -> torch.Tensor:
        """`z @ W_dec` over the latents of local id in `[start, end)` only."""
        if latent_indices is None:
            return latent_acts[..., start:end].to(self.W_dec.dtype) @ self.W_dec[start:end]
        in_block = (latent_indices >= start) & (latent_indices < end)
        return self._first_decoder_layer(latent_acts * in_block, latent_indices)

    def top_latents(self, scores: torch.Tensor, k: int,
                    among: torch.Tensor | None = None) -> torch.Tensor:
        """Ids of the k largest `scores` (`[B, n_latents]`) per row, optionally only `among` the
        latents a `[n_latents]` bool mask allows (AuxK's dead latents); no gradient."""
        if among is not None:
            scores = scores.masked_fill(~among, -torch.inf)
        return topk_select(scores, k)

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
        if isinstance(module, nn.Linear) and self.config.initializer_range is not None:
            init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
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
            if module.W_skip is not None:
                init.zeros_(module.W_skip)  # start as a plain transcoder

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
        SAE that silently yields a random model, so here they fail with the offending names. The
        weights files must match the checksums `save_pretrained` recorded, and hold no NaN or inf
        (see `integrity.py`).
        """
        wants_info = kwargs.pop("output_loading_info", False)
        allow_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
        files = None
        if pretrained_model_name_or_path is not None:
            files = CheckpointFiles(pretrained_model_name_or_path, kwargs)
            files.check_before_loading()
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True,
                ignore_mismatched_sizes=True, **kwargs
            )
        except SafetensorError as error:
            raise FileFormatError(
                files.weights_location if files else str(pretrained_model_name_or_path),
                f"not a readable safetensors file ({error}); it is corrupt or truncated",
                "re-save or re-download the checkpoint"
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
        if files is not None:
            files.check_loaded(model)
        return (model, info) if wants_info else model

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """`PreTrainedModel.save_pretrained`, refusing NaN/inf weights (they would never load
        again), then recording the weights files' SHA-256 in config.json for `from_pretrained`."""
        nonfinite = self.nonfinite_weights()
        if nonfinite:
            raise ValueError(f"tensors {nonfinite} of this SAE hold NaN or inf values, so no "
                             f"checkpoint of it would load; it diverged: save an earlier state")
        super().save_pretrained(save_directory, *args, **kwargs)
        for weights in Path(save_directory).glob("*.safetensors"):
            chmod_as_new_file(weights)  # safetensors >= 0.8 writes 0600 files (safetensors#782)
        is_main_process = args[0] if args else kwargs.get("is_main_process", True)
        if is_main_process and (Path(save_directory) / "config.json").is_file():
            record_weights_checksums(save_directory, kwargs.get("variant"))

    def nonfinite_weights(self) -> list[str]:
        """Names of the parameters and buffers holding NaN or inf (empty for a healthy SAE)."""
        return nonfinite_tensors(self)


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
        self.W_skip = (nn.Parameter(torch.empty(config.d_out, config.d_in))
                       if config.skip_connection else None)
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

    def _check_tensor(self, x: Any, name: str, shape: str, floating: bool = True) -> None:
        """`x` is a tensor on this SAE's device, floating point (or integer, if not `floating`)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(x)}")
        if floating and not x.is_floating_point():
            raise TypeError(f"{name} must be floating point (fp32/bf16/fp16), got {x.dtype}")
        if not floating and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
            raise TypeError(f"{name} must hold integer latent ids (int64), got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device} but the SAE is on {self.device}; move one "
                             f"of them (e.g. {name}.to(sae.device))")
        if x.dim() == 0:
            raise ValueError(f"{name} must have shape {shape}, got a 0-d tensor")

    def _check_activations(self, x: torch.Tensor, name: str, width: int) -> None:
        self._check_tensor(x, name, f"[..., {width}]")
        if x.shape[-1] != width:
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
            target: `[..., d_out]` what to reconstruct; defaults to `x` for autoencoders. Without
                it a transcoder only predicts (the scores are None, see `DeepSAEOutput`).
            dead_mask: `[n_total_latents]` bool, latents considered dead; enables the AuxK loss.
            std_coefficient: overrides `config.std_coefficient` (for decay schedules).
        """
        config = self.config
        inputs = self._prepare(x, "x", config.d_in, self.input_scale)
        leading_shape = x.shape[:-1]
        targets = self._targets(inputs, target, leading_shape)
        std_weight = config.std_coefficient if std_coefficient is None else std_coefficient
        if isinstance(std_weight, bool) or not isinstance(std_weight, int | float) \
                or not math.isfinite(std_weight) or std_weight < 0:
            raise ValueError(f"std_coefficient={std_weight!r} must be a finite number >= 0")
        results = self._run_stages(inputs)
        skip = self._skip(inputs)
        reconstruction = sum(result.reconstruction for result in results) + skip
        pre_act_std = torch.stack([
            stage.pre_act_std(result.hidden, result.pre_acts, differentiable=std_weight > 0)
            for stage, result in zip(self.stages, results, strict=True)
        ]).mean()
        scores = {} if targets is None else self._scores(
            results, reconstruction, skip, targets, dead_mask,
            std_weight * pre_act_std + self._sparsity_penalty(results))
        latents = self._gather_latents(results)
        return DeepSAEOutput(
            reconstruction=_unflatten(reconstruction / self.output_scale, leading_shape),
            latent_acts=_unflatten(latents.latent_acts, leading_shape),
            latent_indices=None if latents.latent_indices is None
            else _unflatten(latents.latent_indices, leading_shape),
            pre_act_std=pre_act_std, **scores,
        )

    def _targets(self, inputs: torch.Tensor, target: torch.Tensor | None,
                 leading_shape: torch.Size) -> torch.Tensor | None:
        """Scaled `[B, d_out]` targets: `target`'s, the inputs of an autoencoder without one, or
        None for a transcoder without one (it only predicts)."""
        if target is None:
            return None if self.config.transcoder else inputs
        targets = self._prepare(target, "target", self.config.d_out, self.output_scale)
        if target.shape[:-1] != leading_shape:
            raise ValueError(f"target {tuple(target.shape)} must have the leading shape of x "
                             f"{(*leading_shape, self.config.d_in)}: one target row per input row")
        return targets

    def _scores(self, results: list[_StageResult], reconstruction: torch.Tensor,
                skip: torch.Tensor | float, targets: torch.Tensor,
                dead_mask: torch.Tensor | None, penalties: torch.Tensor) -> dict[str, Any]:
        """`fvu`, `matryoshka_fvu`, `aux_loss` and `loss` (with the target-free `penalties`
        added) of a batch whose targets are known."""
        error = reconstruction - targets
        fvu = _fraction_unexplained(error.float().pow(2).sum(), targets, undefined=math.nan)
        matryoshka_fvu = self._matryoshka_fvu(results, skip, targets, fvu)
        aux_loss = self._auxk_loss(results, error.detach(), dead_mask)
        reconstruction_loss = fvu if matryoshka_fvu is None else matryoshka_loss(matryoshka_fvu,
                                                                                 self.config)
        loss = reconstruction_loss + self.config.auxk_coefficient * aux_loss + penalties
        return {"fvu": fvu, "matryoshka_fvu": matryoshka_fvu, "aux_loss": aux_loss, "loss": loss}

    def _matryoshka_fvu(self, results: list[_StageResult], skip: torch.Tensor | float,
                        targets: torch.Tensor, fvu: torch.Tensor) -> torch.Tensor | None:
        """`[n_prefixes]` FVU of each Matryoshka prefix (the last, the full width, is `fvu`);
        None for an ordinary SAE."""
        prefixes = self.config.matryoshka_prefixes
        if prefixes is None:
            return None
        smaller = [prefix for prefix in prefixes if prefix < self.config.n_total_latents]
        nested = prefix_reconstructions(self.stages, results, smaller, self.config.n_latents)
        return torch.stack([
            _fraction_unexplained((prefix + skip - targets).float().pow(2).sum(), targets,
                                  undefined=math.nan) for prefix in nested] + [fvu])

    def _skip(self, inputs: torch.Tensor) -> torch.Tensor | float:
        """`W_skip x` of a skip transcoder on scaled `[B, d_in]` inputs; 0 without one."""
        return 0.0 if self.W_skip is None else inputs.to(self.W_skip.dtype) @ self.W_skip.T

    def _auxk_loss(self, results: list[_StageResult], error: torch.Tensor,
                   dead_mask: torch.Tensor | None) -> torch.Tensor:
        """AuxK (Gao et al.): the top `k_aux` dead latents try to explain the residual error."""
        zero = error.new_zeros((), dtype=torch.float32)
        if dead_mask is None or self.config.sparsity not in ("topk", "batchtopk"):
            return zero
        if not isinstance(dead_mask, torch.Tensor) or dead_mask.dtype != torch.bool:
            raise TypeError(f"dead_mask must be a bool tensor of shape "
                            f"[{self.config.n_total_latents}], got {dead_mask!r:.80}")
        dead_mask = dead_mask.to(error.device)
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
            indices = stage.top_latents(result.pre_acts.detach(), k_aux, among=stage_dead)
            values = F.relu(stage.select(result.hidden, result.pre_acts, indices))
            aux_reconstruction = aux_reconstruction + stage.decode_delta(values, indices)
        scale = min(num_dead / self.config.k_aux, 1.0)
        return scale * _fraction_unexplained((aux_reconstruction - error).float().pow(2).sum(),
                                             error, undefined=0.0)

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

    def encode(self, x: torch.Tensor, prefix: int | None = None) -> SparseLatents:
        """Sparse latents of `x` (`[..., d_in]`); global ids across stacked stages.

        Args:
            prefix: keep only the latents of global id < `prefix` (a Matryoshka prefix, see
                `config.matryoshka_prefixes`). The SAE chooses its latents as always (top-k over
                all latents) and those outside the prefix get the value 0, shapes unchanged, so
                `decode` of the result is the prefix's reconstruction the Matryoshka loss trains.
        """
        inputs = self._prepare(x, "x", self.config.d_in, self.input_scale)
        if prefix is not None:
            self._check_prefix(prefix)
        latents = self._gather_latents(self._run_stages(inputs))
        acts = latents.latent_acts if prefix is None else truncate_latents(
            latents.latent_acts, latents.latent_indices, prefix)
        return SparseLatents(
            _unflatten(acts, x.shape[:-1]),
            None if latents.latent_indices is None
            else _unflatten(latents.latent_indices, x.shape[:-1]),
        )

    def encode_dense(self, x: torch.Tensor, prefix: int | None = None) -> torch.Tensor:
        """Latents of `x` as a dense `[..., n_total_latents]` tensor (zero from `prefix` on, if
        given; see `encode`)."""
        return self.densify(*self.encode(x, prefix=prefix))

    def _check_prefix(self, prefix: Any) -> None:
        total = self.config.n_total_latents
        if isinstance(prefix, bool) or not isinstance(prefix, int) or not 1 <= prefix <= total:
            raise ValueError(f"prefix={prefix!r} must be a number of latents in [1, {total}] (this "
                             f"SAE's Matryoshka prefixes: {self.config.matryoshka_prefixes})")

    def densify(self, latent_acts: torch.Tensor,
                latent_indices: torch.Tensor | None) -> torch.Tensor:
        """Scatter sparse (value, global id) pairs into a dense `[..., n_total_latents]` tensor."""
        self._check_latents(latent_acts, latent_indices)
        if latent_indices is None:
            return latent_acts
        dense = latent_acts.new_zeros(*latent_acts.shape[:-1], self.config.n_total_latents)
        return dense.scatter_add(-1, latent_indices, latent_acts)

    @torch.no_grad()
    def latent_directions(self, latent_indices: torch.Tensor | None = None, *,
                          activation: float | torch.Tensor = 1.0,
                          block_size: int = 4096) -> torch.Tensor:
        """`[m, d_out]`: what each latent adds to the reconstruction, per unit of activation.

        The effective direction `(decode(a·e_i) − decode(0)) / a` of global latent `i` (default:
        every latent), in the activation space the SAE reads (input scaling undone). For a linear
        decoder it is exactly the row `W_dec[i]`, whatever `a`; for a deep decoder it depends on
        the activation `a` it is taken at (1 by default; a latent's typical value is a better
        choice), so metrics built on it describe the decoder only near that value. `activation`
        is one finite non-zero value for all latents or one per requested latent (`[m]`). Latents of
        stacked stages use their own stage's decoder.
        """
        n_latents = self.config.n_latents
        if latent_indices is None:
            latent_indices = torch.arange(self.config.n_total_latents, device=self.device)
        elif isinstance(latent_indices, torch.Tensor):
            latent_indices = latent_indices.to(self.device)
        self._check_latent_ids(latent_indices)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r} must be a positive int")
        ids = latent_indices.reshape(-1)
        activations = self._direction_activations(activation, ids.numel())
        directions = torch.empty(ids.numel(), self.config.d_out, dtype=self.dtype,
                                 device=self.device)
        for start in range(0, ids.numel(), block_size):
            block = ids[start:start + block_size]
            block_activations = activations[start:start + block_size]
            for stage_index, stage in enumerate(self.stages):
                in_stage = torch.div(block, n_latents, rounding_mode="floor") == stage_index
                if not in_stage.any():
                    continue
                local = (block[in_stage] - stage_index * n_latents).unsqueeze(-1)
                values = block_activations[in_stage].unsqueeze(-1)
                directions[start:start + block.numel()][in_stage] = (
                    stage.decode_delta(values, local) / values)
        return directions / self.output_scale

    def decode(self, latent_acts: torch.Tensor, latent_indices: torch.Tensor | None = None, *,
               x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction `[..., d_out]` from sparse (values, global ids) or dense latents.

        Args:
            x: `[..., d_in]` the input the latents were encoded from. A skip transcoder's output is
                the latents' decoding plus `W_skip x`: pass `x` to get it; without `x` the result
                is what the latents alone decode to (as `latent_directions` describes them).
        """
        self._check_latents(latent_acts, latent_indices)
        n_latents = self.config.n_latents
        leading_shape = latent_acts.shape[:-1]
        acts = latent_acts.reshape(-1, latent_acts.shape[-1])
        if latent_indices is None:
            chunks = [(chunk, None) for chunk in acts.split(n_latents, dim=-1)]
        else:
            indices = latent_indices.reshape(acts.shape)
            stage_of = torch.div(indices, n_latents, rounding_mode="floor")
            chunks = [(acts * (stage_of == i), (indices - i * n_latents).clamp(0, n_latents - 1))
                      for i in range(self.config.n_stacked)]
        reconstruction = sum(stage.decode(chunk_acts, chunk_indices)
                             for stage, (chunk_acts, chunk_indices) in zip(self.stages, chunks,
                                                                           strict=True))
        if x is not None and self.W_skip is not None:
            skip = self._skip(self._prepare(x, "x", self.config.d_in, self.input_scale))
            reconstruction = reconstruction + skip.reshape(reconstruction.shape)
        return _unflatten(reconstruction / self.output_scale, leading_shape)

    def _check_latents(self, latent_acts: torch.Tensor, latent_indices: torch.Tensor | None
                       ) -> None:
        """Values (and ids) as `encode` returns them, or dense `[..., n_total_latents]` latents."""
        total = self.config.n_total_latents
        if latent_indices is None:
            self._check_tensor(latent_acts, "latent_acts", f"[..., {total}] (dense latents)")
            if latent_acts.shape[-1] != total:
                raise ValueError(f"dense latents must have shape [..., {total}], got "
                                 f"{tuple(latent_acts.shape)}; pass latent_indices with sparse "
                                 f"latents")
            return
        self._check_tensor(latent_acts, "latent_acts", "[..., k]")
        self._check_latent_ids(latent_indices)
        if latent_indices.shape != latent_acts.shape:
            raise ValueError(f"latent_indices {tuple(latent_indices.shape)} must match "
                             f"latent_acts {tuple(latent_acts.shape)}")

    def _direction_activations(self, activation: float | torch.Tensor, n: int) -> torch.Tensor:
        """`[n]` finite non-zero latent values that `latent_directions` takes directions at."""
        if isinstance(activation, bool) or not isinstance(activation, int | float | torch.Tensor):
            raise ValueError(f"activation={activation!r} must be a number or a tensor of one "
                             f"value per latent")
        activations = torch.as_tensor(activation, dtype=self.dtype, device=self.device)
        if activations.numel() not in (1, n) or activations.is_complex() \
                or not torch.isfinite(activations).all() or (activations == 0).any():
            raise ValueError(f"activation must be one finite non-zero number or one per latent "
                             f"({n}), got shape {tuple(activations.shape)} with "
                             f"{int((activations == 0).sum())} zeros and "
                             f"{int((~torch.isfinite(activations)).sum())} non-finite values "
                             f"(the latent values the directions are taken at)")
        return activations.reshape(-1).expand(n)

    def _check_latent_ids(self, latent_indices: torch.Tensor) -> None:
        """Integer global latent ids in `[0, n_total_latents)`: others would decode to nothing."""
        total = self.config.n_total_latents
        self._check_tensor(latent_indices, "latent_indices", "[..., k]", floating=False)
        out_of_range = (latent_indices < 0) | (latent_indices >= total)
        if out_of_range.any():
            raise ValueError(f"latent ids must lie in [0, {total}), got "
                             f"{latent_indices[out_of_range].unique().tolist()[:8]}")

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
        if x.shape[0] == 0 or x.shape[0] != target.shape[0]:
            raise ValueError(f"initialize_from_activations needs rows of activations (and as many "
                             f"target rows), got {x.shape[0]} and {target.shape[0]}")
        if self.config.normalize_input and (x.norm(dim=-1).mean() == 0
                                            or target.float().norm(dim=-1).mean() == 0):
            raise ValueError("the activations are all zero, so no input scale can be fitted "
                             "(normalize_input=True); pass real activations")
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


VARIANCE_RESOLUTION = (64 * torch.finfo(torch.float32).eps) ** 2
"""A total variance below this fraction of `Σ‖y‖²` is rounding error of the mean, not variance."""


def _fraction_unexplained(squared_error: torch.Tensor, values: torch.Tensor,
                          undefined: float) -> torch.Tensor:
    """`squared_error / Σ‖y - ȳ‖²` over the rows of `values`, in fp32.

    Without variance (one row, or identical rows: a variance within fp32 rounding of the mean)
    the ratio is undefined and `undefined` is returned, not a huge number from a floored
    denominator; the gradient is then zero.
    """
    values = values.float()
    variance = (values - values.mean(0)).pow(2).sum() if values.shape[0] else values.new_zeros(())
    has_variance = variance > VARIANCE_RESOLUTION * values.pow(2).sum()
    ratio = squared_error / torch.where(has_variance, variance, torch.ones_like(variance))
    return torch.where(has_variance, ratio, torch.full_like(ratio, undefined))


def _unflatten(rows: torch.Tensor, leading_shape: torch.Size) -> torch.Tensor:
    """`[N, width]` rows back to `[*leading_shape, width]` (also for N = 0)."""
    return rows.reshape(*leading_shape, rows.shape[-1])


DeepSAEConfig.register_for_auto_class()
DeepSAEModel.register_for_auto_class("AutoModel")
