"""Feature absorption (Chanin et al. 2024; SAEBench's `absorption`) for every SAE architecture.

On the first-letter task (`first_letter.py`), per letter:

1. **Main latents.** A class-balanced L1 probe over all latents that fire on the task ranks them
   (ties by mean activation difference); k-sparse probes on the top k latents (k = 1…`max_k`) give
   the first-letter F1 on held-out words. The main latents are the top k for the largest k whose
   F1 kept rising by more than `f1_jump_threshold` at every step (more than one: feature
   splitting).
2. **Absorption**, on held-out words of the letter the ground-truth probe gets right. Each active
   latent carries a share of the reconstruction's probe projection `p·(decode(z) − decode(0))`
   (p the unit probe direction): `a_i·W_dec[i]·p` for a linear decoder (SAEBench's `a_i·cos` with
   unit rows), its integrated-gradients share for a deep one (`probe_attributions`: the shares
   add up to the whole, as a linear decoder's do). Its alignment with the probe is the cosine of
   its effective direction `decode(a_i·e_i) − decode(0)`. These are compared with the
   activation's own projection `(x − decode(0))·p` — the part the latents must explain (SAEBench
   projects `x` itself, whose mean would dominate at an MLP output; a skip transcoder's
   `W_skip x` is subtracted too, as no latent carries it). The *absorption fraction* is
   the share carried by up to `max_absorbing_latents` other latents aligned with the probe
   (cosine ≥ `absorption_fraction_cos_threshold`) instead of the main latents; *full absorption*
   is a word where no main latent fires and the top latent (cosine ≥
   `full_absorption_cos_threshold`) carries at least `projection_proportion_threshold` of it.

Means are over the letters whose probe reaches `min_probe_f1`; the others are listed with the
reason. `contribution_additivity_error` (median over held-out words) says how far the latents'
isolated effects are from adding up to the reconstruction: 0 for linear decoders, large for a
deep decoder with LayerNorm (one latent alone yields a full-size output) — why shares use
integrated gradients, not isolated effects. Encoder-probe cosines exist only for linear encoders
and are marked not applicable otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ..modeling_deepsae import DeepSAEModel
from ..sites import sae_sites
from .first_letter import AbsorptionConfig, FirstLetterData, first_letter_data
from .latent_effects import (
    additivity_error,
    compact_latents,
    decoder_offset,
    encoder_directions,
    latent_contributions,
    linear_encoder_problem,
    probe_attributions,
    sparse_latents,
)
from .probes import (
    binary_scores,
    fit_logistic_regression,
    prefix_probes,
    top_mean_difference,
)


@dataclass
class LetterAbsorption:
    """Absorption results of one letter (see the module docstring).

    `evaluated` is False (with `reason`) when the letter is left out of the means; then only the
    counts and `probe_f1` are filled in. `sparse_probe_f1[k - 1]` is the test F1 of the k-sparse
    probe; `main_latents` are global latent ids, with their decoder (effective direction) and
    encoder cosines with the probe in the same order.
    """

    letter: str
    n_train_words: int
    n_test_words: int
    probe_f1: float
    evaluated: bool
    reason: str | None = None
    main_latents: list[int] = field(default_factory=list)
    sparse_probe_f1: list[float] = field(default_factory=list)
    main_latents_f1: float | None = None
    decoder_probe_cosine: list[float] = field(default_factory=list)
    encoder_probe_cosine: list[float] | None = None
    n_probe_true_positives: int = 0
    n_full_absorption: int = 0
    full_absorption_rate: float | None = None
    mean_absorption_fraction: float | None = None


@dataclass
class AbsorptionResult:
    """Absorption of one SAE on the first-letter task; means over the evaluated letters.

    `first_letter_f1` is the mean F1 of the best single latent (k = 1), `main_latents_f1` that of
    the main latents, `n_main_latents` their mean count (1 = no splitting). `not_applicable`
    maps metrics this architecture cannot have to the reason.
    """

    mean_absorption_fraction: float | None
    full_absorption_rate: float | None
    first_letter_f1: float | None
    main_latents_f1: float | None
    n_main_latents: float | None
    probe_f1: float
    n_letters_evaluated: int
    n_words: int
    decoder: str
    contribution_additivity_error: float
    not_applicable: dict[str, str]
    letters: list[LetterAbsorption]

    def scalars(self) -> dict[str, float]:
        """The headline numbers under model-card names (`hf_deepsae.model_card.METRICS`)."""
        values = {
            "absorption_fraction": self.mean_absorption_fraction,
            "full_absorption_rate": self.full_absorption_rate,
            "first_letter_f1": self.first_letter_f1,
            "first_letter_main_latents_f1": self.main_latents_f1,
            "first_letter_main_latents": self.n_main_latents,
            "first_letter_probe_f1": self.probe_f1,
        }
        return {name: value for name, value in values.items() if value is not None}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ranked_latents(dense: Tensor, one_hot: Tensor, config: AbsorptionConfig) -> Tensor:
    """`[n_letters, n_columns]` columns per letter, best first: L1 probe weight per standard
    deviation of the latent (its weight on standardised latents), then the mean activation
    difference (so latents the L1 penalty zeroed still get a sensible order)."""
    probe = fit_logistic_regression(dense, one_hot, l1=config.sparse_probe_l1)
    weights = probe.weight * dense.std(0)
    rankings = []
    for letter in range(one_hot.shape[1]):
        by_difference = top_mean_difference(dense, one_hot[:, letter], dense.shape[1])
        rankings.append(by_difference[weights[letter, by_difference].argsort(descending=True,
                                                                            stable=True)])
    return torch.stack(rankings)


def _sparse_probe_f1s(dense: Tensor, labels: Tensor, is_test: Tensor, ranking: Tensor
                      ) -> list[float]:
    """Test F1 of the k-sparse probes on the top k of `ranking`, k = 1…len(ranking)."""
    features = dense[:, ranking]
    probe = prefix_probes(features[~is_test], labels[~is_test], list(range(1, len(ranking) + 1)))
    predicted = probe.predict(features[is_test])
    return [binary_scores(predicted[:, j], labels[is_test]).f1 for j in range(len(ranking))]


def _main_latent_count(f1s: list[float], threshold: float) -> int:
    """SAEBench's feature-splitting rule: grow k while F1 jumps by more than `threshold`."""
    count, best = 0, -float("inf")
    for f1 in f1s:
        if f1 <= best + threshold:
            break
        count, best = count + 1, f1
    return count


def _word_absorption(projections: Tensor, cosines: Tensor, values: Tensor, is_main: Tensor,
                     activation_projection: float, config: AbsorptionConfig
                     ) -> tuple[float, bool]:
    """`(absorption fraction, full absorption)` of one word from its active latents' probe
    projections and cosines (SAEBench's definitions, see the module docstring)."""
    main_projection = float(projections[is_main].sum())
    absorbing = ~is_main & (cosines >= config.absorption_fraction_cos_threshold) & (projections > 0)
    absorbers = projections[absorbing].topk(min(config.max_absorbing_latents,
                                                int(absorbing.sum()))).values
    absorbed = float(absorbers.sum())
    if (activation_projection <= 0 or main_projection >= activation_projection
            or absorbed / activation_projection < config.projection_proportion_threshold):
        fraction = 0.0
    elif main_projection <= 0:
        fraction = 1.0
    else:
        absorbed = min(absorbed, activation_projection - main_projection)
        fraction = min(max(absorbed / (absorbed + main_projection), 0.0), 1.0)
    top = int(projections.argmax()) if projections.numel() else -1
    full = (top >= 0 and not bool((values[is_main] != 0).any()) and activation_projection > 0
            and float(projections[top]) > 0
            and float(cosines[top]) >= config.full_absorption_cos_threshold
            and float(projections[top]) / activation_projection
            >= config.projection_proportion_threshold)
    return fraction, full


def _letter_absorption(sae: DeepSAEModel, data: FirstLetterData, letter: int,
                       values: Tensor, ids: Tensor, main: Tensor, offset: Tensor,
                       config: AbsorptionConfig) -> tuple[list[float], int]:
    """Absorption fractions of the letter's probe true positives, and how many are full."""
    direction = data.probe.directions[letter]
    is_letter = data.letters == letter
    true_positive = data.is_test & is_letter & (data.probe.logits(data.targets)[:, letter] > 0)
    rows = true_positive.nonzero()[:, 0]
    projections = probe_attributions(sae, values[rows], ids[rows], direction.unsqueeze(0))[..., 0]
    alone = latent_contributions(sae, values[rows], ids[rows])
    cosines = (alone @ direction) / alone.norm(dim=-1).clamp_min(1e-12)
    activation_projections = (data.targets[rows] - offset[rows]) @ direction
    fractions, n_full = [], 0
    for r in range(len(rows)):
        active = values[rows[r]] != 0
        fraction, full = _word_absorption(
            projections[r][active], cosines[r][active], values[rows[r]][active],
            torch.isin(ids[rows[r]][active], main), float(activation_projections[r]), config)
        fractions.append(fraction)
        n_full += full
    return fractions, n_full


def _main_latent_cosines(sae: DeepSAEModel, data: FirstLetterData, letter: int, main: Tensor,
                         values: Tensor, ids: Tensor) -> tuple[list[float], list[float] | None]:
    """Cosines of the main latents' decoder (at their mean activation on the letter's training
    words) and, for linear encoders, encoder directions with the letter's probe direction."""
    rows = ~data.is_test & (data.letters == letter)
    mean_activations = []
    for latent in main.tolist():
        fired = values[rows][ids[rows] == latent]
        fired = fired[fired != 0]
        mean_activations.append(float(fired.mean()) if fired.numel() else 1.0)
    direction = data.probe.directions[letter]
    decoder = sae.latent_directions(main.to(sae.device), activation=torch.tensor(
        mean_activations)).float().cpu()
    decoder_cosine = torch.nn.functional.cosine_similarity(decoder, direction.unsqueeze(0))
    if linear_encoder_problem(sae.config) is not None:
        return decoder_cosine.tolist(), None
    encoder_cosine = torch.nn.functional.cosine_similarity(encoder_directions(sae, main),
                                                           direction.unsqueeze(0))
    return decoder_cosine.tolist(), encoder_cosine.tolist()


def _check_fits(sae: DeepSAEModel, data: FirstLetterData) -> None:
    widths = (data.inputs.shape[1], data.targets.shape[1])
    if widths != (sae.config.d_in, sae.config.d_out):
        raise ValueError(f"the first-letter data has activations of width {widths} (read, write) "
                         f"but the SAE has d_in={sae.config.d_in}, d_out={sae.config.d_out}; "
                         f"build the data at this SAE's sites (sae_sites(model, sae.config))")


@torch.no_grad()
def evaluate_absorption(sae: DeepSAEModel, data: FirstLetterData,
                        config: AbsorptionConfig | None = None) -> AbsorptionResult:
    """Absorption of `sae` on first-letter `data` built at its sites (see the module docstring)."""
    config = config or AbsorptionConfig()
    _check_fits(sae, data)
    values, ids = sparse_latents(sae, data.inputs)
    dense, columns = compact_latents(values, ids)
    one_hot, train = data.one_hot, ~data.is_test
    rankings = _ranked_latents(dense[train], one_hot[train], config)
    offset = decoder_offset(sae, data.inputs)
    letters, fractions_by_letter = [], []
    for letter_index, letter in enumerate(data.letters_used):
        is_letter = data.letters == letter_index
        record = LetterAbsorption(
            letter, int((is_letter & train).sum()), int((is_letter & data.is_test).sum()),
            float(data.probe_f1[letter_index]), evaluated=False)
        letters.append(record)
        if record.probe_f1 < config.min_probe_f1:
            record.reason = (f"the probe at this site reaches F1 {record.probe_f1:.2f} < "
                             f"min_probe_f1 {config.min_probe_f1}")
            continue
        ranking = rankings[letter_index][:config.max_k]
        record.sparse_probe_f1 = _sparse_probe_f1s(dense, is_letter, data.is_test, ranking)
        n_main = max(_main_latent_count(record.sparse_probe_f1, config.f1_jump_threshold), 1)
        main = columns[ranking[:n_main]]
        record.evaluated = True
        record.main_latents = main.tolist()
        record.main_latents_f1 = record.sparse_probe_f1[n_main - 1]
        record.decoder_probe_cosine, record.encoder_probe_cosine = _main_latent_cosines(
            sae, data, letter_index, main, values, ids)
        fractions, record.n_full_absorption = _letter_absorption(
            sae, data, letter_index, values, ids, main, offset, config)
        record.n_probe_true_positives = len(fractions)
        if fractions:
            record.mean_absorption_fraction = sum(fractions) / len(fractions)
            record.full_absorption_rate = record.n_full_absorption / len(fractions)
            fractions_by_letter.append(record.mean_absorption_fraction)
    evaluated = [record for record in letters if record.evaluated]
    test = data.is_test.nonzero()[:, 0]
    contributions = latent_contributions(sae, values[test], ids[test])
    gap = additivity_error(sae, values[test], ids[test], contributions)
    problem = linear_encoder_problem(sae.config)
    return AbsorptionResult(
        mean_absorption_fraction=_mean(fractions_by_letter),
        full_absorption_rate=_mean([r.full_absorption_rate for r in evaluated
                                    if r.full_absorption_rate is not None]),
        first_letter_f1=_mean([r.sparse_probe_f1[0] for r in evaluated]),
        main_latents_f1=_mean([r.main_latents_f1 for r in evaluated]),
        n_main_latents=_mean([len(r.main_latents) for r in evaluated]),
        probe_f1=float(data.probe_f1.mean()),
        n_letters_evaluated=len(evaluated),
        n_words=len(data.words),
        decoder="linear" if sae.config.is_linear_decoder else "nonlinear",
        contribution_additivity_error=float(gap.median()),
        not_applicable={} if problem is None else {"encoder_probe_cosine": problem},
        letters=letters,
    )


def absorption(model: nn.Module, tokenizer: PreTrainedTokenizerBase, sae: DeepSAEModel,
               config: AbsorptionConfig | None = None) -> AbsorptionResult:
    """Build the first-letter task at the SAE's sites of `model` and evaluate its absorption.

    To score several SAEs at the same site, build `first_letter_data` once and call
    `evaluate_absorption` for each.
    """
    config = config or AbsorptionConfig()
    data = first_letter_data(model, tokenizer, sae_sites(model, sae.config), config)
    return evaluate_absorption(sae, data, config)
