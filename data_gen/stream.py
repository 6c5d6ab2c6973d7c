"""A request stream whose domain changes: the traffic the `online` stage serves.

    python -m data_gen.stream        # prints the default shift stream's phases, sizes and first prompts

A stream is a list of phases; each takes `count` conversations of a prompt source that match its `domain` filter
(the first user turn, as served): `english` chat, `other_language` (most letters outside ASCII: Chinese, Korean,
Spanish with accents, ...), `code` (code blocks or code-like lines), `any`, and for MT-Bench its `categories`.
Conversations are taken in the source's own (seeded) order, so a stream is reproducible; a phase that finds fewer
than `count` is an error naming the phase and how many it found. A conversation is never used twice in one stream.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from data_gen.sources import Conversation, PromptSourceSpec, load_conversations
from infra.settings import SettingsError, at_least, check_fields, one_of

DOMAINS = ("any", "english", "other_language", "code")
CODE_MARKERS = re.compile(r"```|^\s*(def |class |import |from \S+ import|#include|public |private |function |const |"
                          r"let |var |SELECT |CREATE TABLE|<\w+[ >]|\w+\(.*\)\s*[{;]\s*$)", re.MULTILINE)


def domain_of(text: str) -> str:
    """`code` when the text holds a code block or at least two code-like lines; `other_language` when more than
    30% of its letters are outside ASCII; else `english`."""
    if "```" in text or len(CODE_MARKERS.findall(text)) >= 2:
        return "code"
    letters = [c for c in text if c.isalpha()]
    if letters and sum(not c.isascii() for c in letters) > 0.3 * len(letters):
        return "other_language"
    return "english"


@dataclass(frozen=True)
class StreamPhase:
    """`count` conversations of `source` whose first user turn is of `domain` (and, for MT-Bench, of one of
    `categories`); the phase's name is its key in `online.stream`."""
    SECTION: ClassVar[str] = "online.stream"
    source: PromptSourceSpec
    count: int
    domain: str = "any"
    categories: tuple[str, ...] = ()
    LIMITS: ClassVar[dict] = {"count": at_least(1), "domain": one_of(*DOMAINS)}

    def __post_init__(self) -> None:
        if isinstance(self.source, dict):
            object.__setattr__(self, "source", PromptSourceSpec(**{k: v for k, v in self.source.items()
                                                                   if k != "_target_"}))
        object.__setattr__(self, "categories", tuple(self.categories))
        check_fields(self)


@dataclass
class StreamRequest:
    index: int          # position in the stream (0-based)
    phase: str
    conversation: Conversation

    @property
    def key(self) -> str:
        return f"{self.index}:{self.conversation.source}:{self.conversation.id}"


@dataclass
class StreamReport:
    phases: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        return "\n".join(f"  {p['name']}: {p['taken']} requests ({p['domain']}; passed over: {p['passed_over']})"
                         + (f"; its source skipped {p['source_skipped']} (first: {', '.join(p['source_bad_lines'])})"
                            if p.get("source_skipped") else "")
                         for p in self.phases)


def build_stream(phases: dict[str, StreamPhase], cache_dir: Path,
                 too_long: Callable[[Conversation], bool] | None = None,
                 trained_on: set[tuple[str, str | None, str]] = frozenset()
                 ) -> tuple[list[StreamRequest], StreamReport]:
    """The requests of every phase ({name: phase}, in order), and what each phase passed over and why; `too_long`
    says which prompts exceed the server's prompt limit, `trained_on` the (location, file, id) of conversations the
    drafter learned from (a domain's scan can reach a corpus slice): both passed over, counted."""
    requests, report, used, loaded = [], StreamReport(), set(), {}
    for name, phase in phases.items():
        first_reader = phase.source not in loaded  # a source two phases share is read (its skips counted) once
        if first_reader:
            loaded[phase.source] = load_conversations(phase.source, cache_dir, f"online.stream.{name}.source")
        conversations, source = loaded[phase.source]
        taken, passed = [], {"other domain": 0, "other category": 0, "too long": 0, "used by an earlier phase": 0,
                             "in the drafter's training data": 0}
        for conversation in conversations:
            if len(taken) == phase.count:
                break
            first = next(m["content"] for m in conversation.messages if m["role"] == "user")
            if (conversation.source, conversation.id) in used:
                passed["used by an earlier phase"] += 1
            elif phase.categories and conversation.category not in phase.categories:
                passed["other category"] += 1
            elif too_long is not None and too_long(conversation):
                passed["too long"] += 1
            elif phase.domain != "any" and domain_of(first) != phase.domain:
                passed["other domain"] += 1
            elif (phase.source.location, phase.source.file, conversation.id) in trained_on:
                passed["in the drafter's training data"] += 1
            else:
                taken.append(conversation)
                used.add((conversation.source, conversation.id))
        if len(taken) < phase.count:
            raise SettingsError(f"online.stream.{name}: found {len(taken)} of count={phase.count} "
                             f"{phase.domain} conversations in {phase.source.name} (offset {phase.source.offset}, "
                             f"limit {phase.source.limit}; passed over {passed}); lower count or widen the source")
        requests += [StreamRequest(len(requests) + i, name, c) for i, c in enumerate(taken)]
        report.phases.append({"name": name, "domain": phase.domain, "taken": len(taken),
                              "passed_over": {k: v for k, v in passed.items() if v},
                              "source_skipped": dict(source.skipped) if first_reader else {},
                              "source_bad_lines": source.bad_locations[:5] if first_reader else []})
    return requests, report


if __name__ == "__main__":
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        config = compose("config", overrides=sys.argv[1:] or ["+experiment=online_shift"])
    stream_phases = instantiate(config.online.stream, _convert_="all")
    stream, stream_report = build_stream(stream_phases, Path(config.cache_dir),
                                         lambda c: len(next(m["content"] for m in c.messages if m["role"] == "user"))
                                         > 4 * config.online.max_prompt_tokens)  # a rough limit, for a listing
    print(stream_report.summary())
    for request in stream[:: max(1, len(stream) // 10)]:
        text = next(m["content"] for m in request.conversation.messages if m["role"] == "user")
        print(f"{request.index:>4} {request.phase:<16} {text[:90]!r}")
