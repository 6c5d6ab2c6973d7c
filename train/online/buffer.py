"""What the `online` stage learns from: served requests turned into training rows, and the bounded replay buffer.

A served request (`Served`) holds the prompt, the generated tokens and, per chain step, what verification computed
(`eval.decoder.VerificationRecorder`): the drafts and the target's top-k log-probabilities at every block position.
Nothing is recomputed: position j of a step scores the token after the committed prefix and the step's first j
drafts, so positions 0..accepted lie on the served (target's) path and the ones after a rejection on the drafter's
own proposal.

Rows (`train.core.rows.Row`, the distill stage's format, top-k as data_gen stores them) by `source`:
- `teacher`: the served sequence, scored at the `positions` of every step: `corrected` (the token the target
  emitted itself, a correction or the bonus: OSD's `wrong_token_ids`), `drafted` (every position the drafter
  proposed at, up to and including the first rejection) or `all` (every generated position);
- `student`: per step, the committed prefix plus the drafter's proposals, scored at every block position (the
  drafter's own samples, scored by the target at verification: DistillSpec's on-policy data, for free);
- `mixed_token`: per step, a coin with P(student) = `mix` picks one of the two; `mixed_request`: per request.
Coins are seeded by (seed, request key, step), so a rerun builds the same rows.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import ClassVar

from infra.settings import at_least, between, check_fields, one_of
from train.core.rows import Row

POSITIONS = ("corrected", "drafted", "all")
SOURCES = ("teacher", "student", "mixed_token", "mixed_request")


@dataclass(frozen=True)
class BufferSettings:
    SECTION: ClassVar[str] = "online.buffer"
    capacity: int = 256              # rows kept; beyond it, random older rows are evicted
    positions: str = "drafted"       # teacher rows: corrected | drafted | all (see above)
    source: str = "teacher"          # teacher | student | mixed_token | mixed_request
    mix: float = 0.5                 # mixed sources: probability of the drafter's proposals (student)
    replay_share: float = 0.25       # share of each training batch drawn from rows older than the last update
    clear_after_update: bool = False  # OSD: the buffer is emptied after every update (nothing is replayed)
    rehearsal_share: float = 0.0     # share of each training batch drawn from the rows the drafter was distilled on
    LIMITS: ClassVar[dict] = {"capacity": at_least(1), "positions": one_of(*POSITIONS), "source": one_of(*SOURCES),
                              "mix": between(0, 1), "replay_share": between(0, 1), "rehearsal_share": between(0, 1)}

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class Served:
    """One served request: tokens, the verification record per step, and whether it went to the held-out window."""
    key: str
    index: int
    phase: str
    prompt_ids: list[int]
    tokens: list[int]
    steps: list[dict]                  # VerificationRecorder steps (start, drafts, topk_ids, topk_logprobs, ...)
    stats: dict = field(default_factory=dict)

    def accepted(self, step: dict) -> int:
        """Drafts of `step` accepted: the longest prefix equal to the generated tokens at their positions."""
        count = 0
        for offset, token in enumerate(step["drafts"]):
            at = step["start"] + offset
            if at >= len(self.tokens) or self.tokens[at] != token:
                break
            count += 1
        return count

    def path_positions(self) -> list[tuple[int, int, int, int]]:
        """(generated position, step, block position, kind) for every generated token: kind 0 accepted draft,
        1 correction (a rejected draft's place), 2 bonus (nothing was drafted there)."""
        out = []
        for number, step in enumerate(self.steps):
            accepted = self.accepted(step)
            for j in range(accepted + 1):
                at = step["start"] + j
                if at >= len(self.tokens):
                    break
                kind = 0 if j < accepted else (1 if j < len(step["drafts"]) else 2)
                out.append((at, number, j, kind))
        return out


def _topk_rows(step: dict, blocks: list[int]) -> tuple[list, list]:
    return [step["topk_ids"][j] for j in blocks], [step["topk_logprobs"][j] for j in blocks]


def rows_from(served: Served, settings: BufferSettings, seed: int) -> list[Row]:
    """The training rows of one served request (module docstring)."""
    coin = random.Random(f"{seed}:{served.key}:source")
    student_request = settings.source == "student" or (
        settings.source == "mixed_request" and coin.random() < settings.mix)
    prompt, length = served.prompt_ids, len(served.prompt_ids)
    chosen: dict[int, tuple[list, list]] = {}  # generated position -> (top-k ids, log-probs) on the served path
    rows = []
    positions = served.path_positions()
    by_step: dict[int, list] = {}
    for at, number, j, kind in positions:
        by_step.setdefault(number, []).append((at, j, kind))
    for number, step in enumerate(served.steps):
        student = student_request or (settings.source == "mixed_token" and
                                      random.Random(f"{seed}:{served.key}:{number}").random() < settings.mix)
        if student and step["drafts"]:
            drafts = step["drafts"]
            prefix = prompt + served.tokens[: step["start"]]
            filler = step["topk_ids"][len(drafts)][0]  # the target's choice after the last draft
            ids, values = _topk_rows(step, list(range(len(drafts) + 1)))
            rows.append(Row(id=f"{served.key}/step-{number}", input_ids=prefix + drafts + [filler],
                            loss_mask=[0] * len(prefix) + [1] * (len(drafts) + 1), prompt_ids=prompt,
                            topk_ids=ids, topk_logprobs=values))
            continue
        for at, j, kind in by_step.get(number, []):
            keep = (settings.positions == "all" or (settings.positions == "drafted" and kind in (0, 1))
                    or (settings.positions == "corrected" and kind in (1, 2)))
            if keep:
                chosen[at] = (step["topk_ids"][j], step["topk_logprobs"][j])
    if chosen:
        mask = [0] * (length + len(served.tokens))
        for at in chosen:
            mask[length + at] = 1
        order = sorted(chosen)
        rows.insert(0, Row(id=served.key, input_ids=prompt + served.tokens, loss_mask=mask, prompt_ids=prompt,
                           topk_ids=[chosen[at][0] for at in order], topk_logprobs=[chosen[at][1] for at in order]))
    return rows


class ReplayBuffer:
    """Bounded rows; `recent` are those added since the last update. Eviction and batches are seeded."""

    def __init__(self, settings: BufferSettings, seed: int) -> None:
        self.settings, self.seed = settings, seed
        self.old: list[Row] = []
        self.recent: list[Row] = []

    def __len__(self) -> int:
        return len(self.old) + len(self.recent)

    def add(self, rows: list[Row], tag: str) -> None:
        self.recent += rows
        over = len(self) - self.settings.capacity
        if over > 0:
            shuffler = random.Random(f"{self.seed}:evict:{tag}")
            evict_old = min(over, len(self.old))
            drop = set(shuffler.sample(range(len(self.old)), evict_old))
            self.old = [row for i, row in enumerate(self.old) if i not in drop]
            self.recent = self.recent[over - evict_old:]  # the oldest of the recent ones go when nothing older is left

    def batch(self, size: int, tag: str) -> list[Row]:
        """`size` rows: a `replay_share` of them from older rows (when there are any), the rest from recent ones;
        a side with too few rows is topped up from the other."""
        shuffler = random.Random(f"{self.seed}:batch:{tag}")
        from_old = min(len(self.old), round(size * self.settings.replay_share))
        from_recent = min(len(self.recent), size - from_old)
        from_old = min(len(self.old), size - from_recent)
        return shuffler.sample(self.recent, from_recent) + shuffler.sample(self.old, from_old)

    def updated(self) -> None:
        """After an update: what was recent becomes old (or, OSD, everything is dropped)."""
        self.old = [] if self.settings.clear_after_update else self.old + self.recent
        self.recent = []

    def state(self) -> dict:
        return {"old": [vars(r) for r in self.old], "recent": [vars(r) for r in self.recent]}

    def load(self, state: dict) -> None:
        self.old = [Row(**r) for r in state["old"]]
        self.recent = [Row(**r) for r in state["recent"]]
