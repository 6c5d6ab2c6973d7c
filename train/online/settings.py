"""The online stage's settings: the schedule, the publication check, the arms, the modes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from data_gen.stream import StreamPhase
from eval.decoder import DecodeSettings, as_decode
from infra.settings import SettingsError, at_least, check_fields, one_of
from train.core.optim import OptimSettings
from train.online.buffer import BufferSettings


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
    decode: DecodeSettings = field(default_factory=lambda: DecodeSettings(max_new_tokens=64))  # how requests are
                                  # served: γ, sampling, max_new_tokens, batch_size (serve mode), seed (also the
                                  # buffer's and the rehearsal's draws)
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
    plots: bool = True
    LIMITS: ClassVar[dict] = {"mode": one_of(*MODES), "top_k": at_least(1), "max_prompt_tokens": at_least(1),
                              "max_seq_len": at_least(2),
                              "check_lossless_every": at_least(0), "spot_check_every": at_least(0),
                              "checkpoint_every": at_least(1), "moving_window": at_least(1)}

    def __post_init__(self) -> None:
        object.__setattr__(self, "decode", as_decode(self.decode))
        object.__setattr__(self, "baselines", tuple(self.baselines))
        object.__setattr__(self, "stream", {name: phase if isinstance(phase, StreamPhase) else StreamPhase(**{
            k: v for k, v in phase.items() if k != "_target_"}) for name, phase in self.stream.items()})
        check_fields(self)
        decode = self.decode
        if decode.max_new_tokens < 2:
            raise SettingsError(f"online.decode.max_new_tokens={decode.max_new_tokens}: must be ≥ 2 (a served answer "
                                f"trains on its next-token pairs)")
        if decode.tree or decode.confidence_threshold:
            raise SettingsError("online.decode: online serving drafts fixed γ chains (its learners and replay read a "
                                "chain's verification); leave tree=[] and confidence_threshold=0")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise SettingsError(f"online.baselines={list(self.baselines)}: unknown {unknown}; choose from "
                                f"{list(BASELINES)}")
        if not self.stream:
            raise SettingsError("online.stream is empty: name at least one phase, e.g. "
                                "online.stream.chat={source: ..., count: 32}")
        if self.max_seq_len < self.max_prompt_tokens + decode.max_new_tokens:
            raise SettingsError(f"online.max_seq_len={self.max_seq_len} is shorter than max_prompt_tokens + "
                                f"decode.max_new_tokens = {self.max_prompt_tokens + decode.max_new_tokens}: served "
                                f"requests would be cut in training; raise max_seq_len")
        if self.mode == "replay" and not decode.sampling.greedy:
            raise SettingsError("online.mode=replay replays greedy verification (acceptance follows from the drafter's "
                                "argmax along the target's greedy answer); with sampling use online.mode=serve")
        if self.mode == "replay" and self.buffer.source != "teacher":
            raise SettingsError(f"online.buffer.source={self.buffer.source}: the drafter's own proposals after a "
                                f"rejection are scored only by a real verification; use online.mode=serve, or "
                                f"buffer.source=teacher with mode=replay")

    @property
    def seed(self) -> int:
        """The serving seed (`decode.seed`), which also seeds the buffer's and the rehearsal's draws."""
        return self.decode.seed
