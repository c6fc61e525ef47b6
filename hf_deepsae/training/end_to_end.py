"""End-to-end SAE training on the model's KL (`--loss kl` / `fvu+kl`; Braun et al. 2024).

An SAE with a low FVU can still hurt the model: what matters is what the model does with the
reconstruction. End-to-end training splices every SAE of the run into the frozen language model
at once (its output replaces the site's activations, as `splice(mode="replace")` does) and
minimises the KL divergence of the spliced model's next-token distribution from the clean
model's, `KL(p_clean ‖ p_spliced)` averaged over the non-padding tokens, the clean pass run
without gradient. Gradients flow back through the model's (frozen) later layers into the SAEs.
Each SAE reads the activations of the *spliced* model, so a later SAE learns the inputs it will
see when spliced together with the earlier ones (sparsify's `loss_fn kl` does the same); its own
terms (FVU, AuxK) are measured there too, and their gradient also reaches the earlier SAEs.

The objective (`objective`): `kl_coefficient · KL`, plus each SAE's own loss (`DeepSAEOutput.loss`:
FVU, AuxK, std and sparsity penalties) with `fvu+kl`, or the same without its FVU with `kl` (the
penalties keep ReLU/JumpReLU SAEs sparse and AuxK keeps latents alive), plus, with
`downstream_coefficient`, Braun et al.'s downstream term (e2e+ds): the residual stream after each
layer from the first SAE's on, spliced against clean, as a fraction of its variance.

Every step runs the model twice on whole sequences (clean, then spliced with gradient), so the
activation cache can't serve these losses and a step is `lm_batch_size · context_length` tokens a
process. Every process holds every SAE whole (DDP): a latent shard or an SAE living on another
process can't be spliced into this process's forward pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from datasets import Dataset, IterableDataset
from torch import Tensor, nn

from ..activations import TokenChunks
from ..evaluation.evaluator import JOINT, SAEEvaluator, is_causal_lm
from ..modeling_deepsae import DeepSAEModel, DeepSAEOutput
from ..sites import Site, attach_hook, sae_sites
from .config import TrainingConfig
from .optim import build_optimizers, build_scheduler, update_sae

KL_FINE_TUNE_RECIPE = {"loss": "kl", "optimizer": "adam", "lr": 2e-4}
"""Where a short KL fine-tune of an already trained SAE (`fine_tune_on_kl`) differs from training
from scratch: a small learning rate on Adam (the SAE is already good; Muon's orthogonalised steps
would move every direction at once). On SmolLM2-135M layer 6 these lowered the default deep SAE's
held-out spliced KL by 16% (the README has the numbers)."""


class SplicedSAE(NamedTuple):
    """One SAE of an end-to-end forward pass: where it reads and writes, and how to run it.

    `forward(inputs, target)` takes the activations at `read` (and, for transcoders, the site's
    own output at `write` as `target`; None otherwise) on any device and returns the SAE's
    `DeepSAEOutput`, whose reconstruction replaces the activations at `write`.
    """

    forward: Callable[[Tensor, Tensor | None], DeepSAEOutput]
    read: Site
    write: Site


@dataclasses.dataclass
class EndToEndOutput:
    """What `end_to_end_forward` measured on one batch.

    Args:
        kl: `KL(p_clean ‖ p_spliced)` of the next-token distributions, in nats, averaged over the
            non-padding tokens (every position, the last included: each has a distribution).
        downstream_fvu: the spliced residual stream's error against the clean one as a fraction of
            its variance, averaged over the layers from the first SAE's on (None when not asked).
        sae_outputs: `{name: DeepSAEOutput}` of each SAE's forward in the spliced pass.
    """

    kl: Tensor
    downstream_fvu: Tensor | None
    sae_outputs: dict[str, DeepSAEOutput]


def spliced_saes(model: nn.Module, saes: Mapping[str, DeepSAEModel]) -> dict[str, SplicedSAE]:
    """`SplicedSAE`s of plain SAEs, each at the site its config names (as `splice` finds it)."""
    def forward_of(sae: DeepSAEModel) -> Callable[[Tensor, Tensor | None], DeepSAEOutput]:
        def forward(inputs: Tensor, target: Tensor | None) -> DeepSAEOutput:
            return sae(inputs.to(sae.device), None if target is None else target.to(sae.device))
        return forward
    return {name: SplicedSAE(forward_of(sae), *sae_sites(model, sae.config))
            for name, sae in saes.items()}


@contextlib.contextmanager
def spliced_in(model: nn.Module, saes: Mapping[str, SplicedSAE],
               outputs: dict[str, DeepSAEOutput]) -> Iterator[None]:
    """Within the block, each SAE's reconstruction replaces the activations at its write site
    (`splice`'s `replace` mode) and its `DeepSAEOutput` lands in `outputs`, on the autograd graph.

    Unlike `splice`, the SAE runs through `forward`, not `encode`/`decode`: a DDP-wrapped SAE
    synchronises its gradients only when its own forward runs, and the training losses (FVU, AuxK)
    come out of the same call.
    """
    pending: dict[str, Tensor] = {}

    def replace(name: str, spliced: SplicedSAE, activations: Tensor) -> Tensor:
        inputs = pending.pop(name) if spliced.read != spliced.write else activations
        target = activations if spliced.read != spliced.write else None
        outputs[name] = spliced.forward(inputs, target)
        return outputs[name].reconstruction.to(activations.device, activations.dtype).reshape(
            activations.shape)

    hooks = []
    try:
        for name, spliced in saes.items():
            if spliced.read != spliced.write:
                hooks.append(attach_hook(model.get_submodule(spliced.read.path), spliced.read.side,
                                         functools.partial(pending.__setitem__, name)))
            hooks.append(attach_hook(model.get_submodule(spliced.write.path), spliced.write.side,
                                     functools.partial(replace, name, spliced)))
        yield
    finally:
        for hook in hooks:
            hook.remove()


def kl_divergence(clean_log_probs: Tensor, spliced_logits: Tensor,
                  attention_mask: Tensor | None = None) -> Tensor:
    """`KL(p_clean ‖ p_spliced)` per token `[batch, seq]` → its mean over the tokens the mask
    keeps (all when None), in nats, computed in fp32."""
    per_token = F.kl_div(spliced_logits.float().log_softmax(-1), clean_log_probs,
                         log_target=True, reduction="none").sum(-1)
    if attention_mask is None:
        return per_token.mean()
    weights = attention_mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1)


def downstream_fraction_unexplained(spliced: tuple[Tensor, ...], clean: tuple[Tensor, ...],
                                    attention_mask: Tensor | None = None) -> Tensor:
    """Mean over layers of `Σ‖h_spliced − h_clean‖² / Σ‖h_clean − mean‖²` over the kept tokens."""
    keep = None if attention_mask is None else attention_mask.bool()
    fractions = []
    for spliced_layer, clean_layer in zip(spliced, clean, strict=True):
        if keep is not None:
            spliced_layer, clean_layer = spliced_layer[keep], clean_layer[keep]
        spliced_rows = spliced_layer.float().reshape(-1, spliced_layer.shape[-1])
        clean_rows = clean_layer.float().reshape(-1, clean_layer.shape[-1])
        variance = (clean_rows - clean_rows.mean(0)).pow(2).sum()
        fractions.append((spliced_rows - clean_rows).pow(2).sum() / variance)
    return torch.stack(fractions).mean()


def end_to_end_forward(model: nn.Module, saes: Mapping[str, SplicedSAE], input_ids: Tensor,
                       attention_mask: Tensor | None = None,
                       downstream_from_layer: int | None = None) -> EndToEndOutput:
    """Run `model` clean (no gradient), then with every SAE spliced in; compare them.

    `downstream_from_layer`: also compare the residual streams (`output_hidden_states`) after
    that layer and every later one. The model must be frozen (`requires_grad_(False)`, as
    `load_language_model` leaves it): gradients of the result reach the SAEs only.
    """
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    if trainable:
        raise ValueError(f"the language model has trainable parameters ({trainable[:3]}...); "
                         "freeze it with model.requires_grad_(False): only the SAEs train")
    hidden = downstream_from_layer is not None
    with torch.no_grad():
        clean = model(input_ids=input_ids, attention_mask=attention_mask,
                      output_hidden_states=hidden)
        clean_log_probs = clean.logits.float().log_softmax(-1)
    outputs: dict[str, DeepSAEOutput] = {}
    with spliced_in(model, saes, outputs):
        spliced = model(input_ids=input_ids, attention_mask=attention_mask,
                        output_hidden_states=hidden)
    missing = sorted(set(saes) - set(outputs))
    if missing:
        raise ValueError(f"the forward pass never ran the sites of SAEs {missing}")
    downstream = None
    if hidden:
        first = downstream_from_layer + 1  # hidden_states[0] is the embeddings
        downstream = downstream_fraction_unexplained(
            spliced.hidden_states[first:], clean.hidden_states[first:], attention_mask)
    return EndToEndOutput(kl_divergence(clean_log_probs, spliced.logits, attention_mask),
                          downstream, outputs)


def objective(output: EndToEndOutput, config: TrainingConfig) -> Tensor:
    """The loss to minimise for `config.loss` ("kl" or "fvu+kl"); see the module docstring."""
    own = [out.loss if config.loss == "fvu+kl" else out.loss - out.fvu
           for out in output.sae_outputs.values()]
    loss = torch.stack(own).sum() + config.kl_coefficient * output.kl
    if output.downstream_fvu is not None:
        loss = loss + config.downstream_coefficient * output.downstream_fvu
    return loss


def downstream_from_layer(config: TrainingConfig, layers: list[int | None]) -> int | None:
    """The first layer whose residual stream the downstream term compares (None: no term)."""
    if not config.downstream_coefficient:
        return None
    if None in layers:
        raise ValueError("--downstream_coefficient needs each SAE's layer index, which these "
                         "--hookpoints don't have (the model's MLP sites aren't known); give "
                         "--layers instead")
    return min(layers)


def check_end_to_end_model(model: nn.Module) -> None:
    """The end-to-end losses compare next-token distributions: the model must be a causal LM."""
    if not is_causal_lm(model):
        raise ValueError(f"--loss kl/fvu+kl compares next-token distributions, but "
                         f"{type(model).__name__} is not a causal language model; use --loss fvu")


def without_activation_cache(config: TrainingConfig, say: Callable[[str], Any]
                             ) -> TrainingConfig:
    """`config` for an end-to-end loss, which runs the model every step: no activation cache."""
    if config.loss == "fvu" or config.activation_cache_dir is None:
        return config
    say(f"--loss {config.loss} runs the language model every step, so the activation cache "
        f"({config.activation_cache_dir}) is not used")
    return dataclasses.replace(config, activation_cache_dir=None)


class TokenBatches:
    """This process's token-id batches `[lm_batch_size, context_length]` on `device`, epoch after
    epoch, resumable; the end-to-end losses' data, in place of an `ActivationStream`.

    Whole packed sequences, so no padding; the last batch of an epoch may have fewer rows.
    """

    nonfinite_rows = 0
    """Never any: no activation rows are dropped (an SAE refuses NaN inputs with an error)."""
    masked_rows = 0
    """Never any: the KL is averaged over every non-padding position of whole sequences (as the
    spliced CE/KL of the evaluation are), so the token mask does not apply."""

    def __init__(self, chunks: Dataset | IterableDataset, lm_batch_size: int, seed: int,
                 device: torch.device) -> None:
        self.chunks, self.device = TokenChunks(chunks, lm_batch_size, seed), device

    def __iter__(self) -> TokenBatches:
        return self

    def __next__(self) -> Tensor:
        return self.chunks.next_batch().to(self.device)

    def state_dict(self) -> dict[str, Any]:
        return self.chunks.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.chunks.load_state_dict(state)


@torch.no_grad()
def held_out_spliced_metrics(model: nn.Module, saes: Mapping[str, DeepSAEModel],
                             eval_chunks: Dataset | IterableDataset, config: TrainingConfig
                             ) -> dict[str, float | int]:
    """CE-loss score, KL… (`LanguageModelMetricsResult`) of all `saes` spliced in together, as
    they were trained, on the first `eval_tokens` held-out tokens."""
    evaluator = SAEEvaluator(model, saes, jointly=True)
    chunks = TokenChunks(eval_chunks, config.lm_batch_size, 0)
    tokens = 0
    while tokens < config.eval_tokens and chunks.epoch == 0:
        input_ids = chunks.next_batch()
        evaluator.update(input_ids)
        tokens += input_ids.numel()
    return evaluator.metrics.language_model[JOINT].compute().scalars()


def fine_tune_on_kl(model: nn.Module, sae: DeepSAEModel, batches: TokenChunks,
                    config: TrainingConfig, say: Callable[[str], Any] = print) -> int:
    """Fine-tune a trained `sae` in place on `config.loss` (`objective`) with `model` frozen, as
    Braun et al. (2024) fine-tune theirs: `config.total_tokens // config.tokens_per_batch` steps,
    each on `batches.next_batch()`, with `config`'s optimizer, learning rate and schedule; says
    the KL, FVU and speed every `logging_steps` and at the end. Returns the number of steps; the
    SAE is left in eval mode."""
    num_steps = config.total_tokens // config.tokens_per_batch
    optimizers = build_optimizers(sae.train(), config, config.resolved_lr(sae.config.n_latents))
    schedulers = [build_scheduler(optimizer, config, num_steps) for optimizer in optimizers]
    spliced = spliced_saes(model, {"sae": sae})
    start = time.perf_counter()
    for step in range(1, num_steps + 1):
        output = end_to_end_forward(model, spliced, batches.next_batch().to(sae.device))
        objective(output, config).backward()
        update_sae(sae, optimizers, schedulers, config.max_grad_norm)
        if step % config.logging_steps == 0 or step == num_steps:
            speed = step * config.tokens_per_batch / (time.perf_counter() - start)
            say(f"step {step}/{num_steps}: KL {output.kl.item():.4f}, "
                f"FVU {output.sae_outputs['sae'].fvu.item():.4f} ({speed:,.0f} tokens/s)")
    sae.eval()
    return num_steps
