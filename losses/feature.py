"""Losses for feature-level drafters: EAGLE's feature regression + token loss, and FSPAD's partial alignment.

EAGLE-1 (METHODS.md §8): L = w_f · SmoothL1(f̂_{t+1}, f_{t+1}) + w_t · CE_soft(p_{t+2}, p̂_{t+2}), with p and p̂
the frozen target head applied to the true and predicted features; the token term is written here as forward KL,
which differs from the soft cross-entropy by the teacher's entropy only (same gradient).

FSPAD's partial alignment distillation weakens the coupling between feature regression and the logits (§7); its
exact formula is not verified (§9). Our reading, `aligned_fraction` < 1: only that leading share of the feature
dimensions is regressed onto the target's features, the rest is shaped by the token loss alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from infra.settings import at_least, between, check_fields
from losses.kl import forward_kl, kept_rows, row_mean
from losses.mix import LossMix


def feature_regression(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                       aligned_fraction: float = 1.0) -> torch.Tensor:
    """SmoothL1 between predicted and target features [B, T, d] on the first ⌈fraction·d⌉ dimensions, averaged
    over those dimensions and the kept positions."""
    if not 0.0 < aligned_fraction <= 1.0:
        raise ValueError(f"aligned_fraction={aligned_fraction} must lie in (0, 1]")
    width = math.ceil(aligned_fraction * predicted.shape[-1])
    kept_predicted, kept_target = kept_rows(mask, predicted[..., :width], target[..., :width])
    return row_mean(F.smooth_l1_loss(kept_predicted.float(), kept_target.float(), reduction="none").mean(-1))


@dataclass(frozen=True)
class FeatureLoss:
    """`conf/loss/eagle.yaml`, `fspad.yaml`, `eagle3.yaml`: weights of the two terms, the aligned share, and the
    training-time test: `unroll` passes of the drafter on its own outputs (1: none), step j weighted
    `unroll_decay`^j. `token` is the token term, any loss of the family (a `LossMix`; default forward KL, which
    differs from the soft cross-entropy by the teacher's entropy only)."""
    SECTION: ClassVar[str] = "loss"
    feature_weight: float = 1.0
    token_weight: float = 0.1
    aligned_fraction: float = 1.0
    feature_noise: float = 0.0  # EAGLE adds U(-a, a) noise to the input features during training
    unroll: int = 1
    unroll_decay: float = 0.8
    token: LossMix | None = None
    # lookup-aware distillation: a position whose token prompt lookup guesses from the row's own context is scored
    # by the token term with this probability (1: every position, the plain loss); the drafter's capacity then goes
    # where nothing can be copied, which is where a lookup beside it (eval.merged, eval.hybrid) leaves it the work
    lookup_hit_weight: float = 1.0

    LIMITS: ClassVar[dict] = {"feature_weight": at_least(0), "token_weight": at_least(0),
                              "aligned_fraction": between(0, 1), "feature_noise": at_least(0),
                              "lookup_hit_weight": between(0, 1)}

    def __post_init__(self) -> None:
        check_fields(self)
        if self.unroll < 1:
            raise ValueError(f"loss.unroll={self.unroll} must be ≥ 1 (1: no training-time test)")
        if not 0.0 < self.unroll_decay <= 1.0:
            raise ValueError(f"loss.unroll_decay={self.unroll_decay} must lie in (0, 1]")

    @property
    def terms(self) -> list[str]:
        return ["feature", "token"] if self.feature_weight else ["token"]

    def __call__(self, predicted_features: torch.Tensor, target_features: torch.Tensor,
                 student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                 keep: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Features [B, T, d] with mask [B, T]; logits [1, N, V] already taken at the N positions of the mask, of
        which `keep` [1, N] are scored by the token term (default all); `labels` [1, N] for label-based terms."""
        every = torch.ones(student_logits.shape[:2], dtype=torch.bool, device=student_logits.device)
        keep = every if keep is None else keep
        if self.token is None:
            token, parts = forward_kl(student_logits, teacher_logits, keep), {}
        else:
            token, parts = self.token(student_logits, teacher_logits, keep, labels)
        if not keep.any():
            token = student_logits.sum() * 0.0  # no scored position: no signal, but a graph for backward
        total, parts = self.token_weight * token, {"token": token.detach()} | {f"token_{k}": v for k, v in parts.items()}
        if self.feature_weight:
            regression = feature_regression(predicted_features, target_features, mask, self.aligned_fraction)
            total = total + self.feature_weight * regression
            parts["feature"] = regression.detach()
        return total, parts

    def unrolled(self, steps: list[tuple]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted mean over unrolled steps of each step's loss; terms reported per step from the second on
        (`step1_token`, ...), step 0's under their plain names."""
        weights = [self.unroll_decay ** j for j in range(len(steps))]
        total, parts = None, {}
        for j, (weight, (predicted, features, student, teacher, labels, mask, keep)) in enumerate(zip(weights, steps)):
            loss, terms = self(predicted, features, student, teacher, mask, keep, labels)
            total = weight * loss if total is None else total + weight * loss
            parts |= {(name if j == 0 else f"step{j}_{name}"): value for name, value in terms.items()}
        return total / sum(weights), parts
