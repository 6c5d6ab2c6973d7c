"""Forward KL, KL(p_target || q_drafter), per position, averaged over the positions the mask keeps.

Contract shared by every loss in `losses/`: `loss(student_logits, teacher_logits, mask) -> scalar`, computed in
fp32 with log_softmax; masked positions contribute nothing; normalised by the number of valid positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `per_position` [..., T] over `mask` [..., T] (bool or 0/1); 0 when nothing is kept."""
    weights = mask.to(per_position.dtype)
    return (per_position * weights).sum() / weights.sum().clamp_min(1.0)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(p || q) with p = softmax(teacher_logits), q = softmax(student_logits).

    student_logits, teacher_logits: [B, T, V]; mask: [B, T]. Returns a scalar.
    """
    teacher_logprobs = F.log_softmax(teacher_logits.float(), dim=-1)
    student_logprobs = F.log_softmax(student_logits.float(), dim=-1)
    per_position = (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(-1)
    return masked_mean(per_position, mask)
