"""Forward KL against the METHODS.md §10 vectors and the identities every loss must satisfy."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from losses.kl import forward_kl

P = torch.tensor([0.5, 0.3, 0.2])
Q = torch.tensor([0.2, 0.5, 0.3])


def as_logits(probabilities: torch.Tensor) -> torch.Tensor:
    return probabilities.log().view(1, 1, -1)


def test_reference_vector():
    value = forward_kl(as_logits(Q), as_logits(P), torch.ones(1, 1))
    assert math.isclose(value.item(), 0.223805, abs_tol=1e-6)


def test_identical_logits_give_zero_and_matches_kl_div():
    logits = torch.randn(2, 5, 11)
    assert forward_kl(logits, logits, torch.ones(2, 5)).abs().item() < 1e-6
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    reference = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True,
                         reduction="none").sum(-1).mean()
    assert torch.allclose(forward_kl(student, teacher, torch.ones(2, 5)), reference, atol=1e-6)


def test_masked_positions_change_nothing():
    student, teacher = torch.randn(2, 6, 7), torch.randn(2, 6, 7)
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    garbage_student, garbage_teacher = student.clone(), teacher.clone()
    garbage_student[~mask] = 1e4 * torch.randn_like(garbage_student[~mask])
    garbage_teacher[~mask] = -1e4
    assert torch.allclose(forward_kl(student, teacher, mask), forward_kl(garbage_student, garbage_teacher, mask))
    kept = forward_kl(student[mask].unsqueeze(0), teacher[mask].unsqueeze(0), torch.ones(1, int(mask.sum())))
    assert torch.allclose(forward_kl(student, teacher, mask), kept, atol=1e-6)


def test_gradient_is_q_minus_p():
    student = torch.randn(1, 1, 5, requires_grad=True)
    teacher = torch.randn(1, 1, 5)
    forward_kl(student, teacher, torch.ones(1, 1)).backward()
    expected = student.detach().softmax(-1) - teacher.softmax(-1)
    assert torch.allclose(student.grad, expected, atol=1e-6)
