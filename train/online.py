"""Stage `online`: online distillation (OSD, Liu et al. 2023, and better): the drafter learns from the traffic it serves.

    python train/run.py +experiment=online_shift
    python train/run.py +experiment=standalone stages=[online] online.mode=serve loss=tvd

A stream of requests (`data_gen/stream.py`, phases whose domain changes) is served by the embedded lossless
decoder. What verification computed, the target's top-k log-probabilities at every drafted position, the accepted
prefix and the correction, goes into a bounded replay buffer (`train/online_buffer.py`): the target never runs a
second time for training. Every `schedule.every_requests` requests the trainer takes `schedule.steps` optimizer
steps on batches from the buffer (recent rows, and a `replay_share` of older ones against forgetting), with any
loss of the family (the `loss` group: fkl, rkl, jsd, tvd, tvdpp, ...) on the rows of the configured source.
Rehearsal (`buffer.rehearsal_share`): a share of each batch from the rows the drafter was distilled on (this run's
distill stage: its data_gen training split and corpus rows), so that learning the traffic does not unlearn what the
drafter knew; their teacher side is prepared once at the start (`train/online_learners.py`).

Safe publication: each update makes a candidate; every `publish.heldout_every`-th request is served as usual but
kept out of the buffer, in a window of the `publish.window` most recent ones; the candidate replaces the serving
drafter (version + 1) only if its acceptance on that window is not worse than the serving drafter's (`tau`: τ of
greedy chain decoding, exact under greedy serving; `alpha`: expected acceptance Σ min(p, q) from the stored top-k).
Otherwise it is rolled back: the trainer returns to the serving weights and optimizer state (unless
`publish.reset_trainer=false`: it keeps learning); counted and logged. `publish.check_on=next` holds nothing out:
the candidate is judged on the requests served after it was made, before it trains on them (one update later), so
the window is always the most recent traffic and every request trains.

Arms: the configured learner (`ours`) and `baselines` served on the same stream: `frozen` (never updates) and `osd`
(OSD's public code: forward KL on the corrected positions, an update every 8 requests, one step, the buffer
emptied, lr 1e-4 constant, no clipping, no check).

Modes: `serve` runs the real decoder for every request (greedy output compared with plain decoding every
`check_lossless_every` requests; token drafters). `replay` (greedy, teacher rows; token and feature drafters)
decodes the stream once with the plain target (the trace: answers and top-k along them) and replays it: under
greedy verification the accepted prefix is exactly the run of positions where the drafter's argmax, given the
target's own prefix, equals the target's token, so acceptance follows from one drafter forward per request
(ANCHORS.md §10; a feature drafter's deeper drafts read its own features: `train/online_learners.py`). Every
`spot_check_every`-th request is also served for real and must give the trace's tokens (lossless) and the replay's
counts (mismatches are counted and reported).

Resumable: each arm checkpoints after every `checkpoint_every` updates (serving and trainer weights, optimizer
states, buffer, window, counters); kill -9 and rerun continues from the newest good checkpoint, the request logs
are cut back to it and the requests after it are served again (once in the logs).

Outputs: `arms/<arm>/stream.jsonl` (per request: phase, drafter version, drafted, accepted, τ), `updates.jsonl`,
`model/` (ours's final serving drafter), `report.json`, `report.md` (per-phase table, recovery after each shift),
`acceptance_stream.png`, W&B series.
"""
from __future__ import annotations

import copy
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from data_gen.chat import end_of_turn_ids, prompt_token_ids
from data_gen.sources import PromptSourceSpec, load_conversations
from data_gen.stream import StreamPhase, StreamRequest, build_stream
from eval.decoder import (DecodeSettings, VerificationRecorder, plain_generate, plain_generate_topk,
                          speculative_generate)
from eval.metrics import DecodeStats
from eval.speculative import LosslessnessError, check_held_out
from infra.settings import SettingsError, at_least, check_fields, one_of
from infra.stage import StageRun
from losses.kl import forward_kl
from losses.mix import LossMix, needs_teacher
from models.drafter import check_same_vocabulary
from models.kinds import draft_for, kind_of, load_any
from models.sampling import SamplingSettings, as_sampling
from train import checkpoint
from train.distill import conversation_rows, distill_rows
from train.online_buffer import BufferSettings, ReplayBuffer, Served, rows_from
from train.optim import OptimSettings, build_optimizer
from train.online_learners import learner_for
from train.rows import Row

MODES = ("serve", "replay")
METRICS = ("auto", "tau", "alpha")
BASELINES = ("frozen", "osd")


@dataclass(frozen=True)
class ScheduleSettings:
    SECTION: ClassVar[str] = "online.schedule"
    every_requests: int = 8   # an update after this many buffered requests...
    every_tokens: int = 0     # ...or, when > 0, after this many buffered generated tokens instead
    steps: int = 4            # optimizer steps per update
    batch_size: int = 8       # rows per optimizer step
    LIMITS: ClassVar[dict] = {"every_requests": at_least(1), "every_tokens": at_least(0), "steps": at_least(1),
                              "batch_size": at_least(1)}

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class PublishSettings:
    SECTION: ClassVar[str] = "online.publish"
    check: bool = True        # false: every update is published unchecked (OSD)
    heldout_every: int = 4    # every k-th request is held out of the buffer for the check
    window: int = 8           # the most recent held-out requests the check uses
    min_window: int = 2       # updates wait until the window holds this many
    tolerance: float = 0.0    # published when candidate >= serving - tolerance
    metric: str = "auto"      # auto: tau under greedy serving, else alpha
    fallback_to_base: bool = False  # serve the starting drafter again when it beats both candidate and serving one
    check_on: str = "heldout"  # heldout: a window of held-out requests | next: the requests served after the candidate
    reset_trainer: bool = True  # a rejected candidate: the trainer returns to the serving weights (false: it keeps
                                # learning from where it is, so steps add up until a candidate passes)
    LIMITS: ClassVar[dict] = {"heldout_every": at_least(2), "window": at_least(1), "min_window": at_least(1),
                              "tolerance": at_least(0), "metric": one_of(*METRICS),
                              "check_on": one_of("heldout", "next")}

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class OnlineSettings:
    SECTION: ClassVar[str] = "online"
    stream: dict = field(default_factory=dict)  # {phase name: StreamPhase}, served in order
    mode: str = "serve"
    init_from: str | None = None  # the drafter to start from; default: this run's distill output, else pretrain's
    gamma: int = 4
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    max_new_tokens: int = 64
    batch_size: int = 1           # requests decoded together (serve mode)
    top_k: int = 20               # target log-probabilities kept per position
    max_prompt_tokens: int = 384  # longer prompts are passed over when the stream is built (counted)
    max_seq_len: int = 512
    buffer: BufferSettings = field(default_factory=BufferSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    publish: PublishSettings = field(default_factory=PublishSettings)
    optim: OptimSettings = field(default_factory=lambda: OptimSettings(lr=1e-4, warmup_steps=0, min_lr_ratio=1.0))
    baselines: tuple[str, ...] = BASELINES
    check_lossless_every: int = 1  # serve mode: plain decoding of every k-th request compared (0: never)
    spot_check_every: int = 16     # replay mode: every k-th request also served for real (0: never)
    checkpoint_every: int = 1      # updates between checkpoints
    moving_window: int = 16        # requests in the reports' moving averages
    seed: int = 0
    plots: bool = True
    LIMITS: ClassVar[dict] = {"mode": one_of(*MODES), "gamma": at_least(1), "max_new_tokens": at_least(2),
                              "batch_size": at_least(1), "top_k": at_least(1), "max_prompt_tokens": at_least(1),
                              "max_seq_len": at_least(2),
                              "check_lossless_every": at_least(0), "spot_check_every": at_least(0),
                              "checkpoint_every": at_least(1), "moving_window": at_least(1)}

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampling", as_sampling(self.sampling))
        object.__setattr__(self, "baselines", tuple(self.baselines))
        object.__setattr__(self, "stream", {name: phase if isinstance(phase, StreamPhase) else StreamPhase(**{
            k: v for k, v in phase.items() if k != "_target_"}) for name, phase in self.stream.items()})
        check_fields(self)
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise SettingsError(f"online.baselines={list(self.baselines)}: unknown {unknown}; choose from "
                                f"{list(BASELINES)}")
        if not self.stream:
            raise SettingsError("online.stream is empty: name at least one phase, e.g. "
                                "online.stream.chat={source: ..., count: 32}")
        if self.max_seq_len < self.max_prompt_tokens + self.max_new_tokens:
            raise SettingsError(f"online.max_seq_len={self.max_seq_len} is shorter than max_prompt_tokens + "
                                f"max_new_tokens = {self.max_prompt_tokens + self.max_new_tokens}: served requests "
                                f"would be cut in training; raise max_seq_len")
        if self.mode == "replay" and not self.sampling.greedy:
            raise SettingsError("online.mode=replay replays greedy verification (acceptance follows from the drafter's "
                                "argmax along the target's greedy answer); with sampling use online.mode=serve")
        if self.mode == "replay" and self.buffer.source != "teacher":
            raise SettingsError(f"online.buffer.source={self.buffer.source}: the drafter's own proposals after a "
                                f"rejection are scored only by a real verification; use online.mode=serve, or "
                                f"buffer.source=teacher with mode=replay")

    @property
    def decode(self) -> DecodeSettings:
        return DecodeSettings(gamma=self.gamma, sampling=self.sampling, max_new_tokens=self.max_new_tokens,
                              batch_size=self.batch_size, seed=self.seed)


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


# ---------------------------------------------------------------- greedy replay (exact under greedy verification)

def replay_steps(answer: list[int], guesses: list[list[int]], gamma: int,
                 max_new_tokens: int) -> tuple[list[dict], DecodeStats]:
    """Greedy chain decoding replayed: `guesses[j][a]` is the drafter's argmax for answer[a] as the (j+1)-th draft
    of a step that started at a - j on the target's own prefix (train/online_learners.py). The steps (start,
    drafts as far as they are determined) and the counters the decoder would record."""
    stats, steps, t = DecodeStats(depth=gamma), [], 0
    while t < len(answer):
        proposed = min(gamma, max_new_tokens - t - 1)
        accepted = 0
        while (accepted < proposed and t + accepted < len(answer)
               and guesses[accepted][t + accepted] == answer[t + accepted]):
            accepted += 1
        emitted = min(accepted + 1, len(answer) - t)
        drafts = answer[t: t + accepted] + ([guesses[accepted][t + accepted]] if accepted < proposed and
                                            t + accepted < len(answer) else [])
        steps.append({"start": t, "drafts": drafts, "accepted": accepted})
        stats.record_step(proposed, min(accepted, emitted), emitted)
        t += emitted
    return steps, stats


# ---------------------------------------------------------------- one arm: serving drafter, trainer, buffer, window

class ArmState:
    """The serving drafter (a published version), the trainer (its copy being updated), optimizer states, buffer,
    held-out window and counters of one arm; `save`/`load` are its checkpoint (train/checkpoint.py's engine role)."""

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
        return ("tau" if self.settings.sampling.greedy else "alpha") if chosen == "auto" else chosen


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
        total = DecodeStats(depth=settings.gamma)
        for (_, _, answer), guesses in zip(self.items, self.learner.guesses(model, self.items)):
            total.merge(replay_steps(answer, guesses, settings.gamma, settings.max_new_tokens)[1])
        return total.metrics()["block_efficiency"]


# ---------------------------------------------------------------- serving an arm over the stream

@dataclass
class Trace:
    """The stream decoded once by the plain target (replay mode): answers and top-k along them."""
    answers: list[list[int]]
    topk_ids: list[list[list[int]]]
    topk_logprobs: list[list[list[float]]]


@torch.no_grad()
def make_trace(target, prompts: list[list[int]], keys: list[str], settings: OnlineSettings, stop_ids: list[int]
               ) -> Trace:
    """The plain target's greedy answers, with its top-k at every answer token as decoding computed it."""
    decode = replace(settings.decode, batch_size=8)
    answers, ids, values = [], [], []
    for first in tqdm(range(0, len(prompts), 8), desc="online: target trace", unit="batch"):
        chunk = slice(first, first + 8)
        found = plain_generate_topk(target, prompts[chunk], decode, stop_ids, keys[chunk], settings.top_k)
        for part, more in zip((answers, ids, values), found):
            part += more
    return Trace(answers, ids, values)


def replayed(request: StreamRequest, prompt: list[int], trace: Trace, state: ArmState) -> Served:
    """The request as greedy serving with the arm's serving drafter would have gone (exact: see the docstring)."""
    index, settings = request.index, state.settings
    answer = trace.answers[index]
    guesses = state.learner.guesses(state.serving, [(request.key, prompt, answer)])[0]
    steps, stats = replay_steps(answer, guesses, settings.gamma, settings.max_new_tokens)
    for step in steps:
        on_path = range(step["start"], min(step["start"] + step.pop("accepted") + 1, len(answer)))
        step["topk_ids"] = [trace.topk_ids[index][at] for at in on_path]
        step["topk_logprobs"] = [trace.topk_logprobs[index][at] for at in on_path]
    return Served(request.key, index, request.phase, prompt, answer, steps, _counts(stats))


def _counts(stats: DecodeStats) -> dict:
    return {"drafted": stats.drafted, "accepted": stats.accepted, "steps": stats.steps, "emitted": stats.emitted}


def serve_arm(state: ArmState, requests: list[StreamRequest], prompts: list[list[int]], trace: Trace | None,
              stop_ids: list[int], run: StageRun, arm_dir: Path, start: int) -> None:
    """Serve requests[start:] with the arm, learning as configured; checkpoints after updates."""
    settings, counters = state.settings, state.counters
    stream_log, update_log = arm_dir / "stream.jsonl", arm_dir / "updates.jsonl"
    step = settings.batch_size if settings.mode == "serve" else 1
    progress = tqdm(total=len(requests), initial=start, desc=f"online: {state.arm.name}", unit="request")
    for first in range(start, len(requests), step):
        chunk = list(range(first, min(first + step, len(requests))))
        started = time.perf_counter()
        if trace is None:
            served = served_for_real(state, [requests[i] for i in chunk], [prompts[i] for i in chunk], stop_ids)
        else:
            served = [replayed(requests[i], prompts[i], trace, state) for i in chunk]
            spot_check(state, served, stop_ids)
        counters["serve_seconds"] += time.perf_counter() - started
        for one in served:
            counts = one.stats
            line = {"index": one.index, "phase": one.phase, "version": counters["version"],
                    "heldout": state.heldout(one), **counts,
                    "acceptance": counts["accepted"] / max(1, counts["drafted"]),
                    "tau": counts["emitted"] / max(1, counts["steps"])}
            _append(stream_log, line)
            counters["stream_lines"] += 1
            counters["served"] = one.index + 1
            counters["tokens"] += counts["emitted"]
            run.tracker.log({f"online/{state.arm.name}/request": one.index,
                             f"online/{state.arm.name}/acceptance": line["acceptance"],
                             f"online/{state.arm.name}/tau": line["tau"],
                             f"online/{state.arm.name}/version": counters["version"]}, step=None)
            update = state.observe(one)
            if update is not None:
                _append(update_log, update)
                counters["update_lines"] += 1
                verdict = ("trained (its candidate is judged at the next update)" if "published" not in update
                           else "published" if update["published"] else "ROLLED BACK" + (
                               f", the starting drafter serves again ({update['base']:.3f})"
                               if update.get("reverted_to_base") else ""))
                detail = (f" ({update['metric']} {update['candidate']:.3f} vs serving {update['serving']:.3f})"
                          if "candidate" in update else "")
                progress.write(f"[online] {state.arm.name}: update {update['update']} after request {one.index}: "
                               f"{verdict}{detail}")
                if counters["updates"] % settings.checkpoint_every == 0:
                    save_checkpoint(state, arm_dir, run)
        progress.update(len(chunk))
    progress.close()


def served_for_real(state: ArmState, requests: list[StreamRequest], prompts: list[list[int]],
                    stop_ids: list[int]) -> list[Served]:
    settings = state.settings
    recorder = VerificationRecorder(len(requests), settings.top_k)
    keys = [r.key for r in requests]
    generations = speculative_generate(state.target, draft_for(state.serving, state.target), prompts, settings.decode,
                                       stop_ids, keys, recorder=recorder)
    every = settings.check_lossless_every
    checked = [i for i, r in enumerate(requests) if every and r.index % every == 0]
    if checked and settings.sampling.greedy:
        plain = plain_generate(state.target, [prompts[i] for i in checked], settings.decode, stop_ids,
                               [keys[i] for i in checked])
        for i, reference in zip(checked, plain):
            if generations[i].tokens != reference:
                raise LosslessnessError(f"online: request {requests[i].key} served by {state.arm.name} version "
                                        f"{state.counters['version']} differs from plain greedy decoding")
        state.counters["lossless_checks"] += len(checked)
    return [Served(r.key, r.index, r.phase, p, g.tokens, steps, _counts(g.stats))
            for r, p, g, steps in zip(requests, prompts, generations, recorder.steps)]


def spot_check(state: ArmState, served: list[Served], stop_ids: list[int]) -> None:
    """Replay mode: serve every `spot_check_every`-th request for real; tokens must equal the trace (lossless) and
    the counters should equal the replay's (a difference is counted: fp32 near-ties of the drafter's top-2)."""
    every = state.settings.spot_check_every
    for one in served:
        if not every or one.index % every:
            continue
        generation = speculative_generate(state.target, draft_for(state.serving, state.target), [one.prompt_ids],
                                          replace(state.settings.decode, batch_size=1), stop_ids, [one.key])[0]
        if generation.tokens != one.tokens:
            raise LosslessnessError(f"online: request {one.key} served for real by {state.arm.name} differs from the "
                                    f"plain target's answer in the trace")
        state.counters["spot_checks"] += 1
        if _counts(generation.stats) != one.stats:
            state.counters["replay_mismatches"] += 1
            print(f"[online] replay differs from serving on {one.key}: {one.stats} vs {_counts(generation.stats)}",
                  flush=True)


def _append(path: Path, line: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(line) + "\n")


def _cut(path: Path, lines: int) -> None:
    """Keep the first `lines` lines: what the checkpoint had logged (the rest is served again)."""
    kept = path.read_text().splitlines()[:lines] if path.exists() else []
    path.write_text("".join(line + "\n" for line in kept))


def save_checkpoint(state: ArmState, arm_dir: Path, run: StageRun) -> None:
    checkpoint.save(state, arm_dir / "checkpoints", state.counters["served"], {"counters": state.counters}, keep=2,
                    provenance=run.provenance)


def resume_arm(state: ArmState, arm_dir: Path, resume: str) -> int:
    """Load the arm's newest good checkpoint (resume=auto) and cut its logs back to it; the request to start at."""
    found = checkpoint.newest_good(arm_dir / "checkpoints", "online") if resume == "auto" else None
    if found is None:
        shutil.rmtree(arm_dir, ignore_errors=True)
        arm_dir.mkdir(parents=True)
        return 0
    folder, saved = found
    checkpoint.load(state, folder, saved)
    state.counters = saved["counters"]
    _cut(arm_dir / "stream.jsonl", state.counters["stream_lines"])
    _cut(arm_dir / "updates.jsonl", state.counters["update_lines"])
    print(f"[online] {state.arm.name}: resuming from {folder} (request {state.counters['served']}, drafter version "
          f"{state.counters['version']})", flush=True)
    return state.counters["served"]


# ---------------------------------------------------------------- reports

def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def moving_average(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - width] if i >= width else 0.0)
        out.append(total / min(i + 1, width))
    return out


def phase_table(logs: dict[str, list[dict]], phases: list[str], width: int) -> dict:
    """Per arm and phase: acceptance and τ (pooled over the phase's requests), the moving acceptance at the phase's
    end, and recovery (`recovery`)."""
    frozen = {line["index"]: line["accepted"] for line in logs.get("frozen", [])}
    table = {arm: {} for arm in logs}
    for phase in phases:
        for arm, lines in logs.items():
            own = [line for line in lines if line["phase"] == phase]
            drafted, accepted = sum(l["drafted"] for l in own), sum(l["accepted"] for l in own)
            average = moving_average([l["acceptance"] for l in own], width)
            table[arm][phase] = {"requests": len(own), "acceptance": accepted / max(1, drafted),
                                 "tau": sum(l["emitted"] for l in own) / max(1, sum(l["steps"] for l in own)),
                                 "end_moving_acceptance": average[-1] if average else float("nan"),
                                 "recovery_requests": recovery(own, frozen) if arm != "frozen" else None}
    return table


def recovery(lines: list[dict], frozen: dict[int, int]) -> int | None:
    """Requests into a phase after which the arm stays ahead of the frozen drafter: the first t from which its
    accepted tokens summed from the phase's start, less the frozen drafter's on the same requests, stay above 0 to
    the phase's end; None if it never does (or there is no frozen arm). Paired on the same requests, so the
    requests' own difficulty cancels; a level reached by chance once, which a moving average can cross, does not
    count."""
    if not lines or any(line["index"] not in frozen for line in lines):
        return None
    gain, last_behind = 0, -1
    for t, line in enumerate(lines):
        gain += line["accepted"] - frozen[line["index"]]
        if gain <= 0:
            last_behind = t
    return last_behind + 2 if last_behind + 1 < len(lines) else None


def per_version_table(lines: list[dict]) -> dict:
    """Per drafter version of an arm: requests it served (first and last), acceptance and τ pooled over them."""
    out = {}
    for line in lines:
        entry = out.setdefault(str(line["version"]), {"first": line["index"], "last": line["index"], "requests": 0,
                                                      "drafted": 0, "accepted": 0, "emitted": 0, "steps": 0})
        entry["last"] = line["index"]
        entry["requests"] += 1
        for key in ("drafted", "accepted", "emitted", "steps"):
            entry[key] += line[key]
    for entry in out.values():
        entry["acceptance"] = entry["accepted"] / max(1, entry["drafted"])
        entry["tau"] = entry["emitted"] / max(1, entry["steps"])
    return out


def version_markdown(per_version: dict[str, dict], arm: str = "ours") -> str:
    """The versions of one arm (every arm's are in report.json)."""
    lines = ["| arm | drafter version | requests served (first-last) | acceptance | τ |", "|---|---|---|---|---|"]
    for arm, versions in ((arm, per_version[arm]),) if arm in per_version else ():
        for version, entry in versions.items():
            lines.append(f"| {arm} | {version} | {entry['requests']} ({entry['first']}-{entry['last']}) | "
                         f"{entry['acceptance']:.3f} | {entry['tau']:.3f} |")
    return "\n".join(lines) + "\n"


def markdown(table: dict, phases: list[str], counters: dict[str, dict]) -> str:
    lines = ["| arm | " + " | ".join(f"{p}: acceptance / τ / recovery" for p in phases) +
             " | updates (rolled back) | training s per served token |",
             "|---|" + "---|" * len(phases) + "---|---|"]
    for arm, by_phase in table.items():
        cells = []
        for phase in phases:
            cell = by_phase[phase]
            after = cell["recovery_requests"]
            cells.append(f"{cell['acceptance']:.3f} / {cell['tau']:.3f} / "
                         f"{'—' if arm == 'frozen' else after if after is not None else 'never'}")
        c = counters[arm]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {c['updates']} ({c['rollbacks']}) | "
                     f"{c['train_seconds'] / max(1, c['tokens']):.4f} |")
    return "\n".join(lines) + "\n"


def plot(logs: dict[str, list[dict]], updates: dict[str, list[dict]], phases: list[str], width: int,
         path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for arm, lines in logs.items():
        x = [line["index"] for line in lines]
        for axis, key in zip(axes, ("acceptance", "tau")):
            axis.plot(x, moving_average([line[key] for line in lines], width), label=arm)
        for update in updates.get(arm, []):
            if update.get("published") is False:
                axes[0].axvline(update["after_request"], color="red", alpha=0.3, linewidth=0.8)
    boundaries = [next(l["index"] for l in next(iter(logs.values())) if l["phase"] == p) for p in phases]
    for axis in axes:
        for at, phase in zip(boundaries, phases):
            axis.axvline(at, color="grey", linestyle="--", linewidth=0.7)
            axis.text(at + 0.5, axis.get_ylim()[1], phase, va="top", fontsize=8, rotation=90)
        axis.legend(loc="lower right")
    axes[0].set(ylabel=f"acceptance (moving avg, {width} requests)")
    axes[1].set(ylabel="τ (moving avg)", xlabel="request in the stream (red: a rolled-back update)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ---------------------------------------------------------------- the stage

def starting_drafter(run: StageRun, settings: OnlineSettings, target) -> tuple[Path, torch.nn.Module]:
    candidates = [Path(settings.init_from)] if settings.init_from else [
        folder / "model" for folder in (run.output("distill"), run.output("pretrain")) if folder is not None]
    if not candidates:
        raise SettingsError("online needs a drafter to start from: this run has no distill or pretrain output; add "
                            "them to stages, or set online.init_from=/path/to/drafter")
    drafter = load_any(candidates[0], target)
    kind = kind_of(drafter)
    if not kind.trainable:
        raise SettingsError(f"online.init_from={candidates[0]}: a {kind.name} drafter has no weights to learn")
    if kind.trains_on_features and settings.mode != "replay":
        raise SettingsError(f"online.mode={settings.mode} with the {kind.name} drafter in {candidates[0]}: a feature "
                            f"drafter learns online in online.mode=replay only (the verification recorder keeps the "
                            f"target's top-k, not the hidden states this drafter trains on)")
    check_same_vocabulary(drafter.layer_config if kind.trains_on_features else drafter, target.model)
    return candidates[0], drafter


@dataclass
class DistilledOn:
    """What this run's distill stage trained with, from its meta.json: its config, its summary, and the corpus
    conversations it added (distill.corpus_records: the first N of the `corpus` source, as
    `train.distill.corpus_rows` takes them), read once."""
    config: dict
    summary: dict
    corpus: PromptSourceSpec | None
    conversations: list


def distilled_on(run: StageRun) -> DistilledOn | None:
    """None without a distill output in this run."""
    folder = run.output("distill")
    if folder is None:
        return None
    meta = json.loads((folder / "meta.json").read_text())
    config = meta.get("config", {})
    count = config.get("distill", {}).get("corpus_records", 0)
    corpus = PromptSourceSpec(**{k: v for k, v in config["corpus"].items() if k != "_target_"}) if count else None
    conversations = load_conversations(corpus, run.cache_dir)[0][:count] if count else []
    return DistilledOn(config, meta.get("summary", {}), corpus, conversations)


def corpus_trained_on(distilled: DistilledOn | None) -> set[tuple[str, str | None, str]]:
    """(location, file, id) of the corpus conversations the distill stage added to its data."""
    if distilled is None or distilled.corpus is None:
        return set()
    return {(distilled.corpus.location, distilled.corpus.file, c.id) for c in distilled.conversations}


def rehearsal_rows(run: StageRun, settings: OnlineSettings, tokenizer, distilled: DistilledOn | None) -> list[Row]:
    """The rows this run's distill stage trained on (`train.distill.distill_rows`: its data_gen records less the
    held-out split, and its corpus conversations), cut at its max_seq_len and scored as it scored them
    (`online.buffer.rehearsal_share`)."""
    if distilled is None or settings.init_from:
        raise SettingsError(f"online.buffer.rehearsal_share={settings.buffer.rehearsal_share}: rehearsal draws on the "
                            f"rows the drafter was distilled on, known only for this run's own distill output "
                            f"({'online.init_from is set' if settings.init_from else 'this run has none'}); add "
                            f"distill to stages, or set online.buffer.rehearsal_share=0")
    distill = distilled.config["distill"]
    cut, every = distill["max_seq_len"], distill.get("train_on") == "all"  # all: prompt tokens were scored too
    rows, _ = distill_rows(run.require("data_gen"), "online", distill["heldout_records"],
                           conversation_rows(tokenizer, distilled.conversations, cut))
    rows = [replace(r, input_ids=r.input_ids[:cut], loss_mask=[0] + [1] * (min(len(r.input_ids), cut) - 1)
                    if every else r.loss_mask[:cut]) for r in rows]
    kept = [row for row in rows if row.loss_positions(cut)]
    if len(kept) < len(rows):
        print(f"[online] rehearsal: {len(rows) - len(kept)} of distill's rows have no scored token within its "
              f"max_seq_len={cut} (it did not learn from them either): left out", flush=True)
    return kept


def run_stage(run: StageRun, settings: OnlineSettings, loss) -> dict:
    """Serve the stream with every arm, then write the reports (module docstring)."""
    token = loss if isinstance(loss, LossMix) else getattr(loss, "token", None)
    label_terms = [name for name, (fn, _) in (token.terms if token else {}).items() if not needs_teacher(fn)]
    if label_terms and settings.buffer.source != "teacher":
        raise SettingsError(f"loss terms {label_terms} learn the next token of the row, and with online.buffer.source="
                            f"{settings.buffer.source} rows hold the drafter's own proposals; use a loss against the "
                            f"target's distribution (fkl, rkl, jsd, tvd, tvdpp), or buffer.source=teacher")
    target = run.target()
    path, first = starting_drafter(run, settings, target)
    token_drafter = not kind_of(first).trains_on_features
    if token_drafter != isinstance(loss, LossMix):
        wanted = ("a token loss (loss=fkl, tvd, tvdpp, ...)" if token_drafter
                  else "a feature loss (loss=eagle3, eagle, fspad)")
        raise SettingsError(f"loss: a {kind_of(first).name} drafter learns online with {wanted}, not "
                            f"{type(loss).__name__}")
    tokenizer, model = target.tokenizer, target.model
    distilled = distilled_on(run)
    requests, stream_report = build_stream(
        settings.stream, run.cache_dir,
        lambda c: len(prompt_token_ids(tokenizer, c.first_turn_prompt())) > settings.max_prompt_tokens,
        corpus_trained_on(distilled))
    check_held_out([r.conversation for r in requests], run.output("data_gen"), "online stream requests",
                   "online.stream.<phase>.source.offset")
    print(f"[online] stream of {len(requests)} requests:\n{stream_report.summary()}", flush=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [prompt_token_ids(tokenizer, r.conversation.first_turn_prompt()) for r in requests]
    stop_ids = end_of_turn_ids(tokenizer, model.generation_config)
    trace = None
    if settings.mode == "replay":
        trace_path = run.out_dir / "trace.pt"
        if trace_path.exists():
            trace = Trace(**torch.load(trace_path, weights_only=True))
        else:
            trace = make_trace(model, prompts, [r.key for r in requests], settings, stop_ids)
            torch.save(asdict(trace), trace_path.with_suffix(".tmp"))
            trace_path.with_suffix(".tmp").replace(trace_path)
    items = None if trace is None else [(r.key, p, a) for r, p, a in zip(requests, prompts, trace.answers)]
    learner = learner_for(first, model, settings.gamma, settings.max_seq_len, pad_id, items)
    rehearsal = []
    if settings.buffer.rehearsal_share:
        rehearsal = rehearsal_rows(run, settings, tokenizer, distilled)
        cache = distilled.summary.get("feature_cache_folder") or "features"  # absent: distilled before it was kept
        learner.rehearse(rehearsal, settings.top_k, run.output("distill") / cache)  # an absolute path stays itself
        print(f"[online] rehearsal: {len(rehearsal)} rows the drafter was distilled on, "
              f"{settings.buffer.rehearsal_share:.0%} of each training batch of ours", flush=True)
    arms = arms_for(settings, loss, learner.osd_loss(OSD_LOSS))
    logs, updates, counters = {}, {}, {}
    for arm in arms:
        arm_dir = run.out_dir / "arms" / arm.name
        done = arm_dir / "done.json"
        if done.exists():
            counters[arm.name] = json.loads(done.read_text())
        else:
            state = ArmState(arm, copy.deepcopy(first), settings, learner, pad_id, rehearsal)
            start = resume_arm(state, arm_dir, run.resume)
            serve_arm(state, requests, prompts, trace, stop_ids, run, arm_dir, start)
            if arm.name == "ours":
                kind_of(first).save(state.serving, target, run.out_dir / "model")
            counters[arm.name] = state.counters
            done.write_text(json.dumps(state.counters, indent=2))
        logs[arm.name] = read_lines(arm_dir / "stream.jsonl")
        updates[arm.name] = read_lines(arm_dir / "updates.jsonl")
    phases = list(settings.stream)
    table = phase_table(logs, phases, settings.moving_window)
    per_version = {arm: per_version_table(lines) for arm, lines in logs.items()}
    report = {"drafter": str(path), "mode": settings.mode, "stream": stream_report.phases, "arms": counters,
              "rehearsal_rows": len(rehearsal),
              "phases": table, "per_version": per_version,
              "table_markdown": markdown(table, phases, counters) + "\n" + version_markdown(per_version)}
    (run.out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (run.out_dir / "report.md").write_text(report["table_markdown"])
    if settings.plots:
        plot(logs, updates, phases, settings.moving_window, run.out_dir / "acceptance_stream.png")
    run.tracker.table("online/phases", ["arm", "phase", "acceptance", "tau", "recovery_requests"],
                      [[a, p, c["acceptance"], c["tau"], c["recovery_requests"]]
                       for a, by in table.items() for p, c in by.items()])
    print(report["table_markdown"], flush=True)
    summary = {f"{arm}_acceptance": sum(l["accepted"] for l in lines) / max(1, sum(l["drafted"] for l in lines))
               for arm, lines in logs.items()}
    return summary | {f"{arm}_{key}": c[key] for arm, c in counters.items()
                      for key in ("updates", "rollbacks", "version")} | {"requests": len(requests)}
