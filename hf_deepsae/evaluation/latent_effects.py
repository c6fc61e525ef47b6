"""Latents as the probing benchmarks need them, for every architecture.

- `sparse_latents`: an SAE's latents of many rows as `(values, ids)` pairs, whatever its sparsity.
- `compact_latents`: those pairs as a dense matrix over only the latents that ever fired on the
  rows (dead ones cannot be selected by a probe, and a full `[n, n_latents]` matrix may not fit).
- `latent_contributions`: what each active latent adds to the reconstruction on its own,
  `decode(a·e_i) − decode(0)`: `a·W_dec[i]` for a linear decoder, the effective direction of
  `DeepSAEModel.latent_directions` taken at the latent's own activation for a deep one, each
  stage's own decoder for stacked SAEs. Use it for a latent's *direction*. A deep decoder's
  isolated effects need not add up to its reconstruction (with a LayerNorm in the decoder one
  latent alone yields a full-size output); `additivity_error` says by how much they don't.
- `probe_attributions`: each active latent's *share* of the reconstruction along given
  directions, `p·(decode(z) − decode(0))` split over the latents by integrated gradients
  (Sundararajan et al. 2017) along the straight path from 0 to z: exactly `a·W_dec[i]·p` for a
  linear decoder, and for a deep one shares that add up to the whole (completeness), so "which
  latents carry this direction" has an answer for every architecture.
- `linear_encoder_problem`: why an encoder has no per-latent direction in the activation space
  (hidden layers, or a transcoder reading another site), or None when it has one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..configuration_deepsae import DeepSAEConfig
from ..modeling_deepsae import DeepSAEModel


@torch.no_grad()
def sparse_latents(sae: DeepSAEModel, inputs: Tensor, batch_size: int = 4096
                   ) -> tuple[Tensor, Tensor]:
    """`(values, ids)` `[n, m]` of the SAE's latents of `inputs` `[n, d_in]`, on the CPU.

    Top-k SAEs give their `k·n_stacked` pairs per row; dense latents (batch-top-k, JumpReLU,
    ReLU) are cut to their non-zero entries, rows padded with value 0 at id 0.
    """
    values, ids = [], []
    for rows in inputs.split(batch_size):
        acts, indices = sae.encode(rows.to(sae.device, sae.dtype))
        if indices is None:
            active = acts != 0
            width = max(int(active.sum(1).max()), 1)
            acts, indices = torch.where(active, acts, 0).topk(width, dim=1)
        values.append(acts.float().cpu())
        ids.append(indices.cpu())
    width = max(v.shape[1] for v in values)
    return (torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in values]),
            torch.cat([torch.nn.functional.pad(i, (0, width - i.shape[1])) for i in ids]))


def compact_latents(values: Tensor, ids: Tensor, groups: Tensor | None = None,
                    n_groups: int | None = None) -> tuple[Tensor, Tensor]:
    """`(dense [n, c], columns [c])`: the latents as columns, only those non-zero in some row.

    With `groups` (`[rows]` group index of each row), rows of a group are summed into one of
    `n_groups` rows instead (e.g. the tokens of a document), never materialising all rows.
    """
    active = values != 0
    columns = ids[active].unique()
    rows = torch.arange(values.shape[0]) if groups is None else groups
    n_rows = values.shape[0] if groups is None else n_groups
    dense = torch.zeros(n_rows, len(columns))
    dense.index_put_((rows.unsqueeze(1).expand_as(ids)[active],
                      torch.searchsorted(columns, ids[active])), values[active], accumulate=True)
    return dense, columns


@torch.no_grad()
def latent_contributions(sae: DeepSAEModel, values: Tensor, ids: Tensor,
                         block_size: int = 8192) -> Tensor:
    """`[*values.shape, d_out]`: `decode(a·e_i) − decode(0)` of each (value, id) pair (0 at a=0),
    in the activation space (float32, CPU)."""
    flat_values, flat_ids = values.reshape(-1), ids.reshape(-1)
    contributions = torch.zeros(flat_values.numel(), sae.config.d_out)
    active = (flat_values != 0).nonzero()[:, 0]
    for block in active.split(block_size):
        block_values = flat_values[block].to(sae.device, sae.dtype)
        directions = sae.latent_directions(flat_ids[block], activation=block_values)
        contributions[block] = (directions * block_values.unsqueeze(1)).float().cpu()
    return contributions.reshape(*values.shape, sae.config.d_out)


def probe_attributions(sae: DeepSAEModel, values: Tensor, ids: Tensor, directions: Tensor,
                       steps: int = 32) -> Tensor:
    """`[*values.shape, m]`: the share of `directions[m]·(decode(z) − decode(0))` of each (value,
    id) pair of a row's latents `z`, by integrated gradients (midpoint rule with `steps` points
    for nonlinear decoders; exact for linear ones). Shares of a row add up to the whole, up to
    the midpoint rule's error. Float32, on the CPU."""
    n_latents = sae.config.n_latents
    directions = directions.float().to(sae.device)
    values, ids = values.to(sae.device, sae.dtype), ids.to(sae.device)
    shares = torch.zeros(*values.shape, directions.shape[0], device=sae.device)
    for index, stage in enumerate(sae.stages):
        in_stage = (torch.div(ids, n_latents, rounding_mode="floor") == index) & (values != 0)
        local = torch.where(in_stage, ids - index * n_latents, 0)
        hidden = stage.W_dec[local].detach() * torch.where(in_stage, values, 0).unsqueeze(-1)
        if stage.decoder_mlp is None:
            shares += hidden.float() @ directions.T
            continue
        with torch.enable_grad():
            mean_gradient = torch.zeros(values.shape[0], directions.shape[0], hidden.shape[-1],
                                        device=sae.device)
            for step in range(steps):
                point = ((step + 0.5) / steps * hidden.sum(1)).requires_grad_()
                along = stage.decoder_mlp(point).float() @ directions.T
                for m in range(directions.shape[0]):
                    gradient, = torch.autograd.grad(along[:, m].sum(), point,
                                                    retain_graph=m + 1 < directions.shape[0])
                    mean_gradient[:, m] += gradient.float() / steps
        shares += torch.einsum("nkh,nmh->nkm", hidden.float(), mean_gradient)
    return (shares / sae.output_scale.float()).cpu()


@torch.no_grad()
def decoder_offset(sae: DeepSAEModel, x: Tensor | None = None) -> Tensor:
    """`decode(0)`: the reconstruction with no active latent (float32, CPU), `[d_out]`.

    With inputs `x` (`[n, d_in]`), `[n, d_out]` rows that also hold a skip transcoder's `W_skip x`:
    the part of its output that no latent carries.
    """
    if x is None:
        zero = torch.zeros(1, sae.config.n_total_latents, dtype=sae.dtype, device=sae.device)
        return sae.decode(zero)[0].float().cpu()
    zero = torch.zeros(len(x), sae.config.n_total_latents, dtype=sae.dtype, device=sae.device)
    return sae.decode(zero, x=x.to(sae.device, sae.dtype)).float().cpu()


@torch.no_grad()
def additivity_error(sae: DeepSAEModel, values: Tensor, ids: Tensor,
                     contributions: Tensor) -> Tensor:
    """`[n]` `‖Σ_i contribution_i − (decode(z) − decode(0))‖ / ‖decode(z) − decode(0)‖` per row:
    0 (to rounding) for linear decoders, how far a deep decoder is from adding latents up."""
    reconstruction = sae.decode(values.to(sae.device, sae.dtype), ids.to(sae.device))
    delta = reconstruction.float().cpu() - decoder_offset(sae)
    gap = (contributions.sum(1) - delta).norm(dim=1)
    return gap / delta.norm(dim=1).clamp_min(1e-12)


def linear_encoder_problem(config: DeepSAEConfig) -> str | None:
    """Why latents have no encoder direction in the space the SAE reconstructs, if they don't."""
    if config.encoder_hidden:
        return (f"the encoder has hidden layers {config.encoder_hidden}, so a latent's encoder "
                f"row reads hidden features, not activations")
    if config.transcoder:
        return "a transcoder's encoder reads the MLP input, not the output space it reconstructs"
    return None


def encoder_directions(sae: DeepSAEModel, ids: Tensor) -> Tensor:
    """`[m, d_in]` encoder rows of global latents `ids` (linear encoders only, any stage)."""
    problem = linear_encoder_problem(sae.config)
    if problem is not None:
        raise ValueError(f"no encoder directions: {problem}")
    n_latents = sae.config.n_latents
    return torch.stack([sae.stages[int(i) // n_latents].encoder.weight[int(i) % n_latents]
                        for i in ids.reshape(-1)]).detach().float().cpu()
