"""Which token positions an SAE trains and is evaluated on: `TokenMask` and its keep-mask.

A few positions have activations unlike any other: the first position of a sequence, where
language models park spare attention (the "attention sink", Xiao et al. 2023) and whose
activations are often far larger than the rest (the "massive activations" of Sun et al. 2024),
and padding, which is no text at all. An SAE that trains on them spends latents and loss on a
handful of outliers, and they can dominate its FVU; so by default they are left out of training,
of the activation cache and of the held-out metrics.

What counts as "BOS" (`mask_bos`): the first real position of every sequence, whatever its token,
plus every token equal to the tokenizer's `bos_token_id`. The training data packs documents
joined by EOS into fixed-length chunks (`activations.tokenize_and_chunk`), so a chunk usually
starts mid-document with no BOS token at all, yet the model still treats its position 0 as the
sink; and a tokenizer that adds BOS to every document (or whose BOS is also its EOS, as GPT-2's)
puts sink-like tokens inside a chunk too. A model whose tokenizer has no BOS still gets
position 0 masked. Padding (attention mask 0) is always left out. `mask_special_tokens` also
drops every special token (EOS separators, chat markers, ...); `mask_positions_below` drops the
first N positions, for models with several sink positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TokenMask:
    """Which positions are left out (`TrainingConfig` holds the same three fields as flags).

    Args:
        mask_bos: leave out each sequence's first real position and every BOS token.
        mask_special_tokens: also leave out every token in the tokenizer's `all_special_ids`
            (EOS, padding, chat markers, ...).
        mask_positions_below: also leave out positions `< N` of each sequence (counted from its
            first real token, so left padding doesn't shift them); 0: none.
    """

    mask_bos: bool = True
    mask_special_tokens: bool = False
    mask_positions_below: int = 0

    @classmethod
    def from_fields(cls, values: Mapping[str, Any]) -> TokenMask:
        """The mask of a mapping holding these fields among others (resolved evaluation
        settings, `TrainingConfig.record()`)."""
        return cls(**{field.name: values[field.name] for field in dataclasses.fields(cls)})

    def __post_init__(self) -> None:
        if isinstance(self.mask_positions_below, bool) or not isinstance(
                self.mask_positions_below, int) or self.mask_positions_below < 0:
            raise ValueError(f"mask_positions_below={self.mask_positions_below!r} must be an "
                             "integer >= 0 (0 masks no position)")

    @property
    def first_kept_position(self) -> int:
        """The first position of a sequence that may be kept (1 with `mask_bos`)."""
        return max(self.mask_positions_below, 1 if self.mask_bos else 0)

    def describe(self) -> str:
        """One line saying what is left out, for the start of a run's log."""
        left_out = ["padding"]
        if self.mask_bos:
            left_out.append("each sequence's first position and BOS tokens")
        if self.mask_special_tokens:
            left_out.append("special tokens")
        if self.mask_positions_below > int(self.mask_bos):
            left_out.append(f"positions below {self.mask_positions_below}")
        return f"Token mask: {', '.join(left_out)} are left out of training and evaluation"

    def masked_token_ids(self, tokenizer: Any) -> list[int]:
        """The token ids left out wherever they occur, from a tokenizer (or a model config,
        which knows `bos_token_id` but not the special tokens)."""
        ids: set[int] = set()
        bos = getattr(tokenizer, "bos_token_id", None)
        if self.mask_bos and bos is not None:
            ids.add(int(bos))
        if self.mask_special_tokens:
            special = getattr(tokenizer, "all_special_ids", None)
            if special is None:
                raise ValueError(f"mask_special_tokens needs the tokenizer (its all_special_ids), "
                                 f"got a {type(tokenizer).__name__}; pass the tokenizer")
            ids.update(int(token) for token in special)
        return sorted(ids)

    def keep(self, input_ids: torch.Tensor, masked_token_ids: list[int],
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Bool `[batch, seq]`: True where a position is trained and evaluated on.

        `masked_token_ids` comes from `masked_token_ids(tokenizer)` (computed once, not per batch).
        """
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None \
            else attention_mask.to(input_ids.device).bool()
        position = real.long().cumsum(-1) - 1
        keep = real & (position >= self.first_kept_position)
        if masked_token_ids:
            keep &= ~torch.isin(input_ids, torch.tensor(masked_token_ids, device=input_ids.device))
        return keep

    def row_filter(self, tokenizer: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        """`input_ids [batch, seq]` → bool `[batch * seq]` rows to keep, for packed chunks
        without padding (`activations.ModelActivations`)."""
        masked_token_ids = self.masked_token_ids(tokenizer)
        return lambda input_ids: self.keep(input_ids, masked_token_ids).reshape(-1)


DEFAULT_TOKEN_MASK = TokenMask()
"""What training and evaluation leave out unless told otherwise: padding, BOS, position 0."""
