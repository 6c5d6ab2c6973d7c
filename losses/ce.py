"""Cross-entropy on the target's own tokens: sequence-level knowledge distillation (SeqKD; FastDraft's alignment).

Same contract as `losses.kl`, but it reads `labels` (the next token of the target-generated text) and ignores the
teacher's logits, so a run whose loss is only this one skips the teacher forward pass entirely.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from losses.kl import kept_rows, row_mean


def cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, mask: torch.Tensor,
                  labels: torch.Tensor | None = None) -> torch.Tensor:
    """−log q(label) per position, averaged over the mask. labels: [B, T] token ids (any value where masked)."""
    if labels is None:
        raise ValueError("cross_entropy needs labels (the target's next tokens); the distill loop passes them")
    student, kept_labels = kept_rows(mask, student_logits, labels)
    log_q = F.log_softmax(student.float(), -1)
    return row_mean(-log_q.gather(-1, kept_labels.unsqueeze(-1)).squeeze(-1))


cross_entropy.needs_teacher = False
