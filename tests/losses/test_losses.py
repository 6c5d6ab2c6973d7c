"""Every loss against the METHODS.md §10 vectors and the identities the contract promises."""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from losses.ce import cross_entropy
from losses.kl import forward_kl, jsd, reverse_kl
from losses.mix import LossMix
from losses.tvd import expected_acceptance, tvd, tvd_plus_plus

P = torch.tensor([0.5, 0.3, 0.2])
Q = torch.tensor([0.2, 0.5, 0.3])
ONE = torch.ones(1, 1)
LOSSES = {
    "fkl": forward_kl, "rkl": reverse_kl, "jsd": jsd, "jsd_0.1": functools.partial(jsd, beta=0.1), "tvd": tvd,
    "tvdpp_position": tvd_plus_plus, "tvdpp_batch": functools.partial(tvd_plus_plus, norm="batch"),
    "tvdpp_sampled": functools.partial(tvd_plus_plus, estimator="sampled"),
    "tvdpp_sampled_batch": functools.partial(tvd_plus_plus, estimator="sampled", norm="batch"),
}


def as_logits(probabilities: torch.Tensor) -> torch.Tensor:
    return probabilities.log().view(1, 1, -1)


@pytest.mark.parametrize("fn, expected", [(forward_kl, 0.223805), (reverse_kl, 0.193794), (jsd, 0.050875),
                                          (tvd, 0.3), (tvd_plus_plus, 0.3)])
def test_reference_values(fn, expected):
    assert math.isclose(fn(as_logits(Q), as_logits(P), ONE).item(), expected, abs_tol=1e-6)
    assert math.isclose(expected_acceptance(as_logits(Q), as_logits(P), ONE).item(), 0.7, abs_tol=1e-6)


def logit_gradient(fn, student=Q, teacher=P) -> torch.Tensor:
    logits = as_logits(student).clone().requires_grad_(True)
    fn(logits, as_logits(teacher), ONE).backward()
    return logits.grad.view(-1)


def test_tvd_gradient_matches_reference_and_reinforce_form():
    gradient = logit_gradient(tvd)
    assert torch.allclose(gradient, torch.tensor([-0.16, 0.10, 0.06]), atol=1e-6)
    reward = (P > Q).float()  # −Σ_v q(v) r(v) (e_v − q)
    reinforce = -sum(Q[v] * reward[v] * (torch.eye(3)[v] - Q) for v in range(3))
    assert torch.allclose(gradient, reinforce, atol=1e-6)


def test_tvd_plus_plus_position_gradient_is_tvd_gradient_over_sigma():
    gradient = logit_gradient(tvd_plus_plus)
    assert torch.allclose(gradient, torch.tensor([-0.40, 0.25, 0.15]), atol=1e-6)
    assert torch.allclose(gradient, logit_gradient(tvd) / 0.4, atol=1e-6)


def test_tvd_plus_plus_batch_exact_is_tvd_times_one_constant():
    """The no-op guard of METHODS.md §10: with one μ, σ for the batch and the exact sum, TVD++ = c·TVD."""
    student = torch.randn(2, 4, 9, requires_grad=True)
    teacher = torch.randn(2, 4, 9)
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1]], dtype=torch.bool)
    tvd_plus_plus(student, teacher, mask, norm="batch").backward()
    batch_gradient = student.grad.clone()
    student.grad = None
    tvd(student, teacher, mask).backward()
    ratio = batch_gradient[mask] / student.grad[mask]
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-4)
    # ...while the per-position variant reweights positions differently
    student.grad = None
    tvd_plus_plus(student, teacher, mask).backward()
    per_position = student.grad[mask] / batch_gradient[mask]
    assert per_position.std() > 0.05


def test_sampled_tvd_plus_plus_is_unbiased_for_the_position_gradient():
    torch.manual_seed(0)
    total, draws = torch.zeros(3), 20000
    logits = as_logits(Q).expand(1, draws, 3).clone().requires_grad_(True)
    tvd_plus_plus(logits, as_logits(P).expand(1, draws, 3), torch.ones(1, draws), estimator="sampled").backward()
    total = logits.grad.sum(1).view(-1)  # the loss is a mean over `draws` rows: the sum is the mean gradient
    assert torch.allclose(total, torch.tensor([-0.40, 0.25, 0.15]), atol=0.02)


def test_jsd_endpoints_are_the_kls_and_its_limits_scale_like_them():
    student, teacher, mask = torch.randn(2, 3, 7), torch.randn(2, 3, 7), torch.ones(2, 3)
    kl_forward = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True,
                          reduction="none").sum(-1).mean()
    kl_reverse = F.kl_div(F.log_softmax(teacher, -1), F.log_softmax(student, -1), log_target=True,
                          reduction="none").sum(-1).mean()
    assert torch.allclose(jsd(student, teacher, mask, beta=0.0), kl_forward, atol=1e-6)
    assert torch.allclose(jsd(student, teacher, mask, beta=1.0), kl_reverse, atol=1e-6)
    assert torch.allclose(forward_kl(student, teacher, mask), kl_forward, atol=1e-6)
    assert torch.allclose(reverse_kl(student, teacher, mask), kl_reverse, atol=1e-6)
    small = 1e-3
    assert torch.allclose(jsd(student, teacher, mask, beta=small) / small, kl_forward, rtol=1e-2)
    assert torch.allclose(jsd(student, teacher, mask, beta=1 - small) / small, kl_reverse, rtol=1e-2)
    with pytest.raises(ValueError, match="beta"):
        jsd(student, teacher, mask, beta=1.5)


@pytest.mark.parametrize("name", LOSSES)
def test_identical_logits_give_zero(name):
    logits = torch.randn(2, 5, 11)
    assert abs(LOSSES[name](logits, logits, torch.ones(2, 5)).item()) < 1e-6


@pytest.mark.parametrize("name", [*LOSSES, "ce"])
def test_masked_positions_change_nothing(name):
    fn = cross_entropy if name == "ce" else LOSSES[name]
    student, teacher = torch.randn(2, 6, 7, requires_grad=True), torch.randn(2, 6, 7)
    labels = torch.randint(0, 7, (2, 6))
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    garbage_student = student.detach().clone()
    garbage_student[~mask] = 1e4 * torch.randn_like(garbage_student[~mask])
    garbage_student.requires_grad_(True)
    garbage_teacher, garbage_labels = teacher.clone(), labels.clone()
    garbage_teacher[~mask] = float("nan")
    garbage_labels[~mask] = -100
    torch.manual_seed(0)
    clean = fn(student, teacher, mask, labels=labels)
    clean.backward()
    torch.manual_seed(0)
    dirty = fn(garbage_student, garbage_teacher, mask, labels=garbage_labels)
    dirty.backward()
    assert torch.allclose(clean, dirty) and torch.isfinite(dirty)
    assert torch.allclose(student.grad[mask], garbage_student.grad[mask], atol=1e-6)
    assert (garbage_student.grad[~mask] == 0).all()
    # normalised by the kept positions: the same as the loss over the kept positions alone
    torch.manual_seed(0)
    kept = fn(student[mask].unsqueeze(0), teacher[mask].unsqueeze(0), torch.ones(1, int(mask.sum())),
              labels=labels[mask].unsqueeze(0))
    assert torch.allclose(clean, kept, atol=1e-6)


@pytest.mark.parametrize("fn, closed_form", [
    (forward_kl, lambda p, q: q - p),
    (reverse_kl, lambda p, q: q * ((q.log() - p.log()) - (q * (q.log() - p.log())).sum())),
])
def test_kl_gradients_equal_closed_forms(fn, closed_form):
    student, teacher = torch.randn(5), torch.randn(5)
    gradient = logit_gradient(fn, student.softmax(-1), teacher.softmax(-1))
    assert torch.allclose(gradient, closed_form(teacher.softmax(-1), student.softmax(-1)), atol=1e-6)


def test_cross_entropy_is_forward_kl_to_a_one_hot_teacher_and_needs_no_teacher():
    student, labels = torch.randn(2, 4, 9), torch.randint(0, 9, (2, 4))
    one_hot_teacher = torch.full((2, 4, 9), float("-inf")).scatter(-1, labels.unsqueeze(-1), 0.0)
    mask = torch.ones(2, 4)
    assert torch.allclose(cross_entropy(student, None, mask, labels=labels),
                          forward_kl(student, one_hot_teacher, mask), atol=1e-6)
    assert torch.allclose(cross_entropy(student, None, mask, labels=labels),
                          F.cross_entropy(student.flatten(0, 1), labels.flatten()), atol=1e-6)
    mix = LossMix({"ce": {"fn": functools.partial(cross_entropy), "weight": 1.0}})
    assert not mix.needs_teacher
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(student, None, mask)


def test_mix_weights_terms_and_reports_each():
    student, teacher, mask = torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.ones(2, 3)
    mix = LossMix({"fkl": {"fn": forward_kl, "weight": 0.9}, "rkl": {"fn": reverse_kl, "weight": 0.1}})
    total, parts = mix(student, teacher, mask)
    assert set(parts) == {"fkl", "rkl"} and mix.needs_teacher
    assert torch.allclose(total, 0.9 * forward_kl(student, teacher, mask) + 0.1 * reverse_kl(student, teacher, mask))
    with pytest.raises(ValueError, match="loss.terms.bad"):
        LossMix({"bad": {"function": forward_kl}})


def test_teacher_minus_infinity_is_handled():
    """Offline teachers rule tokens out with -inf; the losses stay finite where that is mathematically so."""
    teacher = torch.tensor([[[0.0, -1.0, float("-inf")]]])
    student = torch.randn(1, 1, 3)
    for fn in (forward_kl, jsd, tvd, tvd_plus_plus):
        assert torch.isfinite(fn(student, teacher, ONE))
