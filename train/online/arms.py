"""An arm of the online stage: a drafter that serves the stream and (unless frozen) learns from it, with its
replay buffer, trainer, publication window and counters."""
from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from eval.metrics import DecodeStats
from losses.kl import forward_kl
from losses.mix import LossMix
from train.core.optim import OptimSettings, build_optimizer
from train.core.rows import Row
from train.online.buffer import BufferSettings, ReplayBuffer, Served, rows_from
from train.online.replay import replay_steps
from train.online.settings import OnlineSettings, PublishSettings, ScheduleSettings


@dataclass(frozen=True)
class Arm:
    """One way of serving the stream: learning or not, and how."""
    name: str
    learn: bool
    buffer: BufferSettings
    schedule: ScheduleSettings
    publish: PublishSettings
    optim: OptimSettings
    loss: object  # LossMix (token drafters), FeatureLoss (feature drafters); None: never trains


OSD_LOSS = LossMix({"fkl": {"fn": forward_kl, "weight": 1.0}})


def arms_for(settings: OnlineSettings, loss, osd_loss=OSD_LOSS) -> list[Arm]:
    """The reference arms first (frozen, osd), then ours; `osd_loss` is OSD's forward KL in the drafter kind's form
    (a feature drafter's: `FeatureLearner.osd_loss`)."""
    arms = []
    if "frozen" in settings.baselines:
        arms.append(Arm("frozen", False, settings.buffer, settings.schedule, settings.publish, settings.optim, None))
    if "osd" in settings.baselines:  # LiuXiaoxuanPKU/OSD distill_trainer.py online path, as read (ANCHORS.md §10)
        arms.append(Arm("osd", True, BufferSettings(capacity=10 ** 6, positions="corrected", source="teacher",
                                                    replay_share=0.0, clear_after_update=True),
                        ScheduleSettings(every_requests=8, steps=1, batch_size=8), PublishSettings(check=False),
                        OptimSettings(lr=1e-4, weight_decay=0.0, warmup_steps=0, min_lr_ratio=1.0, grad_clip=1e9),
                        osd_loss))
    arms.append(Arm("ours", True, settings.buffer, settings.schedule, settings.publish, settings.optim, loss))
    return arms


class ArmState:
    """The serving drafter (a published version), the trainer (its copy being updated), optimizer states, buffer,
    held-out window and counters of one arm; `save`/`load` are its checkpoint (train/core/checkpoint.py's engine role)."""

    def __init__(self, arm: Arm, drafter: torch.nn.Module, settings: OnlineSettings, learner, pad_id: int,
                 rehearsal: list[Row] | None = None) -> None:
        self.arm, self.settings, self.learner, self.pad_id = arm, settings, learner, pad_id
        self.rehearsal = rehearsal or []  # the rows the drafter was distilled on (`buffer.rehearsal_share`)
        self.target = learner.target
        self.serving = drafter.eval()
        self.trainer = copy.deepcopy(drafter).train().requires_grad_(True) if arm.learn else None
        if arm.learn:
            self.optimizer, _ = build_optimizer(self.trainer, arm.optim, 1)
            self.published_optimizer = copy.deepcopy(self.optimizer.state_dict())
            self.base = copy.deepcopy(drafter).eval() if arm.publish.fallback_to_base and arm.publish.check else None
            self.base_optimizer = copy.deepcopy(self.published_optimizer)
        self.buffer = ReplayBuffer(arm.buffer, settings.seed)
        self.window: list[Served] = []
        self.counters = {"served": 0, "version": 0, "updates": 0, "rollbacks": 0, "published": 0,
                         "pending_requests": 0, "pending_tokens": 0, "train_seconds": 0.0, "serve_seconds": 0.0, "tokens": 0,
                         "skipped_steps": 0, "stream_lines": 0, "update_lines": 0, "replay_mismatches": 0,
                         "spot_checks": 0, "lossless_checks": 0, "reverted_to_base": 0}

    # ---- checkpoint role
    def save(self, folder: Path) -> None:
        from safetensors.torch import save_model

        save_model(self.serving, str(folder / "serving.safetensors"))
        if self.arm.learn:
            save_model(self.trainer, str(folder / "trainer.safetensors"))
            torch.save({"optimizer": self.optimizer.state_dict(), "published": self.published_optimizer},
                       folder / "optimizer.pt")
        torch.save({"buffer": self.buffer.state(), "window": [vars(s) for s in self.window]}, folder / "buffer.pt")

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_model

        load_model(self.serving, str(folder / "serving.safetensors"))
        if self.arm.learn:
            load_model(self.trainer, str(folder / "trainer.safetensors"))
            state = torch.load(folder / "optimizer.pt", weights_only=True)
            self.optimizer.load_state_dict(state["optimizer"])
            self.published_optimizer = state["published"]
        state = torch.load(folder / "buffer.pt", weights_only=True)
        self.buffer.load(state["buffer"])
        self.window = [Served(**s) for s in state["window"]]

    # ---- learning
    def heldout(self, served: Served) -> bool:
        publish = self.arm.publish
        return (self.arm.learn and publish.check and publish.check_on == "heldout"
                and served.index % publish.heldout_every == publish.heldout_every - 1)

    def observe(self, served: Served) -> dict | None:
        """Take one served request in; returns the update's log line when it triggered one."""
        if not self.arm.learn:
            return None
        if self.heldout(served):
            self.window = (self.window + [served])[-self.arm.publish.window:]
        else:
            if self.arm.publish.check_on == "next":  # judges the pending candidate, which has not trained on it
                self.window.append(served)
            self.buffer.add(rows_from(served, self.arm.buffer, self.settings.seed), tag=served.key)
            self.counters["pending_requests"] += 1
            self.counters["pending_tokens"] += len(served.tokens)
        schedule = self.arm.schedule
        ready = len(self.buffer) and (self.counters["pending_tokens"] >= schedule.every_tokens if schedule.every_tokens
                                      else self.counters["pending_requests"] >= schedule.every_requests)
        if ready and (not self.arm.publish.check or len(self.window) >= self.arm.publish.min_window):
            return self.update(served.index)
        return None

    def train_step(self, rows: list[Row]) -> float | None:
        total = self.learner.loss(self.trainer, rows, self.arm.loss)
        if not torch.isfinite(total):
            self.optimizer.zero_grad(set_to_none=True)
            self.counters["skipped_steps"] += 1
            return None
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.trainer.parameters(), self.arm.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total.detach())

    def update(self, request_index: int) -> dict:
        """Train on the buffer and publish or roll back: the candidate is judged on the held-out window right after
        training (`publish.check_on=heldout`), or (`next`) on the requests served after it was made, before it
        trains on them: the candidate of update k is judged at update k + 1."""
        started = time.perf_counter()
        number = self.counters["updates"]
        line = {"update": number, "after_request": request_index}
        judge_next = self.arm.publish.check and self.arm.publish.check_on == "next"
        if judge_next:
            if self.counters["updates"]:  # every update after the first left a candidate to judge
                line |= self.judge()
            self.window = []
        line["losses"] = [self.train_step(self.batch(f"{number}:{step}")) for step in range(self.arm.schedule.steps)]
        self.buffer.updated()
        self.counters["pending_requests"] = self.counters["pending_tokens"] = 0
        self.counters["updates"] += 1
        line |= {"buffer_rows": len(self.buffer), "window": len(self.window)}
        if not judge_next:
            line |= self.judge()
        seconds = time.perf_counter() - started
        self.counters["train_seconds"] += seconds
        return line | {"version": self.counters["version"], "seconds": seconds}

    def batch(self, tag: str) -> list[Row]:
        """A training batch: served rows from the buffer, and a `rehearsal_share` of rows the drafter was distilled
        on (seeded by the update and step: a resumed run draws the same)."""
        size = self.arm.schedule.batch_size
        old = min(len(self.rehearsal), round(size * self.arm.buffer.rehearsal_share))
        drawn = random.Random(f"{self.settings.seed}:rehearsal:{tag}").sample(self.rehearsal, old)
        return self.buffer.batch(size - old, tag=tag) + drawn

    def judge(self) -> dict:
        """Publish the trainer's weights as the next serving version, or keep the serving ones (the trainer returns
        to them unless `reset_trainer` is off; with fallback_to_base the starting drafter serves again when it beats
        both, and the trainer restarts from it); the log fields."""
        line, publish, revert = {}, True, False
        if self.arm.publish.check:
            metric, tolerance = self.check_metric(), self.arm.publish.tolerance
            check = WindowCheck(self.window, metric, self.settings, self.learner)
            candidate, serving = check.score(self.trainer), check.score(self.serving)
            publish = candidate >= serving - tolerance
            line |= {"metric": metric, "candidate": candidate, "serving": serving}
            if self.base is not None:  # the domain may have come back to what the starting drafter knew
                line["base"] = check.score(self.base)
                revert = line["base"] > max(candidate, serving) + tolerance
                publish &= not revert
        if publish:
            self.serving.load_state_dict(self.trainer.state_dict())
            self.published_optimizer = copy.deepcopy(self.optimizer.state_dict())
            self.counters["version"] += 1
            self.counters["published"] += 1
        else:
            self.counters["rollbacks"] += 1
            if revert:
                self.serving.load_state_dict(self.base.state_dict())
                self.published_optimizer = copy.deepcopy(self.base_optimizer)
                self.counters["version"] += 1
                self.counters["reverted_to_base"] += 1
                line["reverted_to_base"] = True
            if self.arm.publish.reset_trainer or revert:
                self.trainer.load_state_dict(self.serving.state_dict())
                self.optimizer.load_state_dict(copy.deepcopy(self.published_optimizer))
        return line | {"published": publish}

    def check_metric(self) -> str:
        chosen = self.arm.publish.metric
        return ("tau" if self.settings.decode.sampling.greedy else "alpha") if chosen == "auto" else chosen


class WindowCheck:
    """A drafter's acceptance on the held-out window: `tau` (greedy chain decoding replayed on the served tokens,
    exact when serving is greedy) or `alpha` (mean Σ min(p, q) over every generated position: the learner's). The
    target's side is built once per update, for every drafter compared."""

    def __init__(self, window: list[Served], metric: str, settings: OnlineSettings, learner) -> None:
        self.metric, self.settings, self.learner = metric, settings, learner
        self.items = [(s.key, s.prompt_ids, s.tokens) for s in window]
        self.rows = [rows_from(served, BufferSettings(positions="all"), settings.seed)[0] for served in window
                     ] if metric == "alpha" else []  # the stored top-k of every generated position

    def score(self, model: torch.nn.Module) -> float:
        settings = self.settings
        if self.metric == "alpha":
            return self.learner.alpha(model, self.items, self.rows)
        total = DecodeStats(depth=settings.decode.gamma)
        for (_, _, answer), guesses in zip(self.items, self.learner.guesses(model, self.items)):
            total.merge(replay_steps(answer, guesses, settings.decode.gamma, settings.decode.max_new_tokens)[1])
        return total.metrics()["block_efficiency"]
