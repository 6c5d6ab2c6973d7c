"""What the speculative decoder drafts with: the `Draft` protocol, every member of which the decoder may use, and
`DraftDefaults`, the defaults most drafts keep.

A drafter kind's `draft(drafter, target_model)` (`models/kinds.py`) returns a `Draft`: token-level
(`models.drafter.TokenDraft`), feature-level (`models.feature_drafter.FeatureDraft`), training-free
(`models.lookup.LookupDraft`) and the pairs of a lookup and a trained drafter (`models.lookup.LookupFirstDraft`,
`MergedDraft`). The decoder (`eval/decoder.py`) calls them as listed here and probes nothing else.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Draft(Protocol):
    needs_features: bool  # catch_up reads the target's hidden states (`feature_layers` of them, or the last)
    feature_layers: list[int] | None  # which target layers' outputs it reads; None: the last hidden state
    abstains: bool        # it may have no guess for a row (all logits -inf): that row drafts nothing this step
    merged: bool          # it proposes one merged token tree per step (`models.lookup.MergedDraft`)
    observes: bool        # it is shown the target's logits of every verified block (`observe`)
    networks: tuple       # modules whose linear layers the decoder's few-row kernels run (`models.kernels`)
    device: torch.device  # where its logits are

    def start(self, rows: int, capacity: int) -> None:
        """A new batch of `rows` sequences of up to `capacity` tokens."""

    def catch_up(self, sequences: list[list[int]], features: torch.Tensor | None) -> torch.Tensor:
        """Read what each row committed since the last step; logits [rows, V] for the next token."""

    def extend(self, tokens: torch.Tensor, parents: list[int], local: torch.Tensor, relative: torch.Tensor,
               offset: int) -> torch.Tensor:
        """Draft tokens [rows, w] (block columns offset..offset+w-1, each below `parents`); logits [rows, w, V]."""

    def commit(self, accepted: list[int], fed_drafts: int) -> None:
        """Each row accepted that many drafts; the first `fed_drafts` drafted columns were fed through `extend`."""

    def keep_rows(self, rows: list[int]) -> None:
        """Only these rows decode on (the others finished)."""

    def observe(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """The target's logits [rows, w, V] after the tokens [rows, w] it just verified (when `observes`)."""

    def reset(self) -> None:
        """Forget what decoding taught it (a learning baseline, after the eval's warm-up)."""


class DraftDefaults:
    """The members of `Draft` most drafts keep at these values."""
    needs_features = False
    feature_layers = None
    abstains = False
    merged = False
    observes = False
    networks: tuple = ()

    def observe(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        pass

    def reset(self) -> None:
        pass
