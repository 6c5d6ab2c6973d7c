"""Acceptance counters and the speed models built on them (shared METHODS.md §1-§2, ANCHORS.md §0).

- acceptance rate = accepted / drafted;
- block efficiency τ = tokens emitted per target forward, the correction/bonus token included (vLLM's mean
  acceptance length; plain decoding = 1.00);
- per-position acceptance, unconditional (accepted at i / steps that drafted i, as vLLM logs it) and conditional
  (accepted at i / steps that reached i, i.e. drafted i with everything before it accepted: EAGLE's α_i);
- c: draft step cost / target step cost, either by parameters (`mbsu`) or measured on this machine
  (`predicted_speedup`), both with γ = the mean number of drafted positions per step (tree depth for trees);
- v: the cost of the target's verification forward (γ + 1 tokens, or the tree's nodes) over a one-token step;
- MBSU = τ / (1 + γ c_params) (Leviathan's model, v = 1); predicted speedup = τ / (v + γ c_measured), both
  measured on this machine (a CPU pays ~1.8× a one-token step to verify 4 tokens; a GPU at batch 1 about 1×).
"""
from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field


@dataclass
class DecodeStats:
    """Counters for one or more speculative generations; add them up with `merge`."""

    depth: int
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    drafted_at: list[int] = field(default_factory=list)
    reached_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)
    accepted_per_step: list[int] = field(default_factory=list)  # in order, for histograms and step-level tests
    verified: int = 0       # tokens in the verification forwards (the last committed token and every node)
    drafter_runs: int = 0   # steps in which the trained drafter ran its forwards (a merged tree may skip it)

    def __post_init__(self) -> None:
        for name in ("drafted_at", "reached_at", "accepted_at"):
            if not getattr(self, name):
                setattr(self, name, [0] * self.depth)

    def record_step(self, proposed: int, accepted: int, emitted: int, verified: int | None = None,
                    drafter_ran: bool = True) -> None:
        """One verification: `proposed` drafted positions (a tree's depth), `accepted` of them, `emitted` tokens
        (the target's own included); `verified` tokens in its forward (default: a chain's proposed + 1)."""
        self.steps += 1
        self.verified += proposed + 1 if verified is None else verified
        self.drafter_runs += bool(drafter_ran)
        self.drafted += proposed
        self.accepted += accepted
        self.emitted += emitted
        self.accepted_per_step.append(accepted)
        for position in range(proposed):
            self.drafted_at[position] += 1
            if position <= accepted:
                self.reached_at[position] += 1
            if position < accepted:
                self.accepted_at[position] += 1

    def merge(self, other: "DecodeStats") -> "DecodeStats":
        self.steps += other.steps
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.emitted += other.emitted
        self.accepted_per_step += other.accepted_per_step
        self.verified += other.verified
        self.drafter_runs += other.drafter_runs
        self.depth = max(self.depth, other.depth)
        for name in ("drafted_at", "reached_at", "accepted_at"):  # a deeper record (a merged tree) widens the sum
            mine, theirs = getattr(self, name), getattr(other, name)
            width = max(len(mine), len(theirs))
            setattr(self, name, [a + b for a, b in zip(mine + [0] * (width - len(mine)),
                                                       theirs + [0] * (width - len(theirs)))])
        return self

    def metrics(self) -> dict:
        return {
            "acceptance_rate": self.accepted / max(1, self.drafted),
            "block_efficiency": self.emitted / max(1, self.steps),
            "accepted_per_position": [a / max(1, d) for a, d in zip(self.accepted_at, self.drafted_at)],
            "conditional_acceptance_per_position": [a / max(1, r) for a, r in zip(self.accepted_at, self.reached_at)],
            "mean_drafted_per_step": self.drafted / max(1, self.steps),
            "mean_verified_per_step": self.verified / max(1, self.steps),
            "drafter_run_fraction": self.drafter_runs / max(1, self.steps),
            "target_forwards": self.steps, "drafted": self.drafted, "accepted": self.accepted,
            "emitted": self.emitted,
        }


def speed_model(block_efficiency: float, drafted_per_step: float, cost_ratio: float, verify_cost: float = 1.0) -> float:
    """τ / (v + γ c): the speedup a drafter of relative cost c gives at this τ when verifying costs v one-token
    steps (MBSU: c by parameters, v = 1)."""
    return block_efficiency / (verify_cost + drafted_per_step * cost_ratio)


def median_interval(values: list[float], confidence: float = 0.95, resamples: int = 2000,
                    seed: int = 0) -> tuple[float, float, float]:
    """(median, low, high): the median and a percentile-bootstrap interval for it."""
    if not values:
        return float("nan"), float("nan"), float("nan")
    generator = random.Random(seed)
    medians = sorted(statistics.median(generator.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1 - confidence) / 2
    return (statistics.median(values), medians[int(tail * (resamples - 1))],
            medians[int((1 - tail) * (resamples - 1))])
