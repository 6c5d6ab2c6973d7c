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

import torch
import torch.nn.functional as F

from losses.kl import forward_kl, kept_rows, row_mean


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
    """`conf/loss/eagle.yaml`, `conf/loss/fspad.yaml`: weights of the two terms and the aligned share."""
    feature_weight: float = 1.0
    token_weight: float = 0.1
    aligned_fraction: float = 1.0
    feature_noise: float = 0.0  # EAGLE adds U(-a, a) noise to the input features during training

    def __call__(self, predicted_features: torch.Tensor, target_features: torch.Tensor,
                 student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Features [B, T, d] with mask [B, T]; logits [1, N, V] already taken at the N kept positions."""
        regression = feature_regression(predicted_features, target_features, mask, self.aligned_fraction)
        every = torch.ones(student_logits.shape[:2], dtype=torch.bool, device=student_logits.device)
        token = forward_kl(student_logits, teacher_logits, every)
        total = self.feature_weight * regression + self.token_weight * token
        return total, {"feature": regression.detach(), "token": token.detach()}
