"""The KL family: forward KL, reverse KL and the generalised Jensen-Shannon divergence JSD(β) (DistillSpec, GKD).

Contract shared by every loss in `losses/`: `loss(student_logits, teacher_logits, mask, labels=None) -> scalar`,
with logits [B, T, V] (any float dtype; computed in fp32 with log_softmax), mask [B, T] (bool or 0/1), and
labels [B, T] the data's next tokens (only `losses.ce` reads them). Masked positions contribute nothing; the
result is the mean over the kept positions. Teacher logits may hold -inf (tokens the teacher rules out).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kept_rows(mask: torch.Tensor, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The rows [N, ...] of each [B, T, ...] tensor where `mask` [B, T] is set.

    Losses compute on these rows only, so whatever sits at masked positions (padding, NaN, -inf) can reach
    neither the value nor the gradient, and no work is spent on it."""
    keep = mask.bool()
    return [None if tensor is None else tensor[keep] for tensor in tensors]


def row_mean(per_row: torch.Tensor) -> torch.Tensor:
    """Mean over kept rows; 0 (still differentiable) when there are none."""
    return per_row.sum() / max(per_row.shape[0], 1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position from log-probabilities, with 0·log 0 = 0 where p has no mass."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               labels: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p || q), p = softmax(teacher), q = softmax(student): mass-covering; its gradient is q − p."""
    student, teacher = kept_rows(mask, student_logits, teacher_logits)
    return row_mean(_kl(F.log_softmax(teacher.float(), -1), F.log_softmax(student.float(), -1)))


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               labels: torch.Tensor | None = None) -> torch.Tensor:
    """KL(q || p): mode-seeking; the drafter is pushed off tokens the target gives little mass."""
    student, teacher = kept_rows(mask, student_logits, teacher_logits)
    return row_mean(_kl(F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1)))


def jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
        labels: torch.Tensor | None = None, beta: float = 0.5) -> torch.Tensor:
    """JSD(β) = β·KL(p || m) + (1 − β)·KL(q || m) with m = β·p + (1 − β)·q.

    For small β it behaves like β·KL(p || q), near 1 like (1 − β)·KL(q || p); the endpoints themselves are
    defined as those limits, so β = 0 is forward KL and β = 1 is reverse KL (as in GKD).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: beta={beta} must lie in [0, 1]")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, mask)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, mask)
    student, teacher = kept_rows(mask, student_logits, teacher_logits)
    log_p, log_q = F.log_softmax(teacher.float(), -1), F.log_softmax(student.float(), -1)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
    return row_mean(beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m))
