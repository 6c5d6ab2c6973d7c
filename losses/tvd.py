"""Total variation distance and TVD++ (Goel et al. 2024), plus the acceptance proxy they both optimise.

Speculative sampling accepts a drafted token with expected probability β = Σ_v min(p(v), q(v)) = 1 − TVD(p, q)
(METHODS.md §1), so TVD is the loss that targets acceptance directly. Its exact gradient with respect to the
drafter is a policy gradient, −E_{v~q}[r(v)·∇log q(v)] with reward r(v) = 1[p(v) > q(v)]; TVD++ normalises that
reward, r̂ = (r − μ)/σ, as policy-gradient methods do to reduce variance. Which μ and σ the paper uses is not
settled (METHODS.md §3, §9), so both readings are here:

- `norm="position"`: μ_t, σ_t of r under q_t at each position; the gradient becomes ∇TVD_t / σ_t, i.e. positions
  where the drafter is almost always or almost never accepted are up-weighted.
- `norm="batch"`: one μ, σ over every kept position; with the exact estimator this is TVD times a constant, so it
  only differs from TVD through the optimiser's step size (tested as such).

and two estimators: `exact` sums over the vocabulary; `sampled` draws one token per position from q (the
REINFORCE form), with μ, σ taken over the drawn rewards. Same contract as `losses.kl`. TVD++'s returned value is
the plain TVD (readable in logs); only its gradient is the normalised one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from losses.kl import kept_rows, row_mean

NORMS = ("position", "batch")
ESTIMATORS = ("exact", "sampled")


def tvd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
        labels: torch.Tensor | None = None) -> torch.Tensor:
    """½ Σ_v |p(v) − q(v)| per position, averaged over the mask."""
    student, teacher = kept_rows(mask, student_logits, teacher_logits)
    return row_mean(0.5 * (F.softmax(teacher.float(), -1) - F.softmax(student.float(), -1)).abs().sum(-1))


def expected_acceptance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                        d2t: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Σ_v min(p, q) = 1 − TVD: the probability a drafted token is accepted, averaged over the mask.

    With a reduced draft vocabulary (student logits over draft ids, `d2t` = their target ids), q is 0 outside it
    and p is not renormalised: target mass the drafter cannot propose is never accepted."""
    with torch.no_grad():
        student, teacher = kept_rows(mask, student_logits, teacher_logits)
        p = F.softmax(teacher.float(), -1)
        if d2t is not None:
            p = p[..., d2t]
        return row_mean(torch.minimum(p, F.softmax(student.float(), -1)).sum(-1))


def tvd_plus_plus(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                  labels: torch.Tensor | None = None, norm: str = "position", estimator: str = "exact",
                  min_std: float = 1e-3) -> torch.Tensor:
    """TVD++: the TVD policy gradient with a normalised reward. Returns TVD's value with TVD++'s gradient.

    σ is clamped at `min_std`: a position the drafter already matches almost surely (b ≈ 0 or 1) would otherwise
    get an unbounded weight."""
    if norm not in NORMS or estimator not in ESTIMATORS:
        raise ValueError(f"tvd_plus_plus: norm={norm!r} must be one of {NORMS} and estimator={estimator!r} one of "
                         f"{ESTIMATORS}")
    student, teacher = kept_rows(mask, student_logits, teacher_logits)
    log_q = F.log_softmax(student.float(), -1)
    p, q = F.softmax(teacher.float(), -1), log_q.exp()
    q_fixed = q.detach()
    reward = (p > q_fixed).float()                      # r(v) = 1[p(v) > q(v)]: tokens the drafter under-weights
    value = row_mean(0.5 * (p - q_fixed).abs().sum(-1))
    accepted_mass = (q_fixed * reward).sum(-1)          # b_t = E_{v~q}[r(v)]; r is Bernoulli(b_t) under q
    if estimator == "exact":
        mean = accepted_mass.mean().expand_as(accepted_mass) if norm == "batch" else accepted_mass
        std = (mean * (1 - mean)).sqrt()
        normalised = (reward - mean.unsqueeze(-1)) / std.clamp_min(min_std).unsqueeze(-1)
        surrogate = row_mean(-(q_fixed * normalised * log_q).sum(-1))
    else:
        drawn = torch.multinomial(q_fixed, 1) if q_fixed.shape[0] else q_fixed.new_zeros((0, 1), dtype=torch.long)
        drawn_reward = reward.gather(-1, drawn).squeeze(-1)
        if norm == "batch":
            mean, std = drawn_reward.mean(), drawn_reward.std(unbiased=False)
        else:  # one draw per position cannot give its own σ: use the exact per-position Bernoulli moments
            mean, std = accepted_mass, (accepted_mass * (1 - accepted_mass)).sqrt()
        normalised = (drawn_reward - mean) / std.clamp_min(min_std)
        surrogate = row_mean(-normalised * log_q.gather(-1, drawn).squeeze(-1))
    return value + (surrogate - surrogate.detach())
