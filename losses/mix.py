"""A weighted sum of contract losses (`losses.kl`), reporting every term: what `conf/loss/*.yaml` builds.

    _target_: losses.mix.LossMix
    terms:
      fkl: {weight: 0.9, fn: {_target_: losses.kl.forward_kl, _partial_: true}}
      rkl: {weight: 0.1, fn: {_target_: losses.kl.reverse_kl, _partial_: true}}
"""
from __future__ import annotations

from typing import Callable

import torch


def needs_teacher(fn: Callable) -> bool:
    """Whether a loss reads the teacher's logits (every divergence does; cross-entropy reads labels only)."""
    return getattr(getattr(fn, "func", fn), "needs_teacher", True)  # functools.partial hides the attribute


class LossMix:
    def __init__(self, terms: dict[str, dict]) -> None:
        if not terms:
            raise ValueError("loss.terms is empty: name at least one loss, e.g. fkl: {weight: 1.0, fn: ...}")
        self.terms: dict[str, tuple[Callable, float]] = {}
        for name, term in terms.items():
            unknown = set(term) - {"fn", "weight"}
            if unknown or "fn" not in term or not callable(term["fn"]):
                raise ValueError(f"loss.terms.{name}: expected {{fn: <loss>, weight: <float>}}, got keys "
                                 f"{sorted(term)}")
            weight = term.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
                raise ValueError(f"loss.terms.{name}.weight={weight!r}: must be a number ≥ 0")
            self.terms[name] = (term["fn"], float(weight))
        self.needs_teacher = any(needs_teacher(fn) for fn, _ in self.terms.values())

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, mask: torch.Tensor,
                 labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted total, {term name: its unweighted value, detached})."""
        total, parts = None, {}
        for name, (fn, weight) in self.terms.items():
            value = fn(student_logits, teacher_logits, mask, labels=labels)
            parts[name] = value.detach()
            total = weight * value if total is None else total + weight * value
        return total, parts
