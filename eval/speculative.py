"""Stage `eval`: a lossless greedy speculative decoder and the acceptance benchmark built on it.

    python train/run.py +experiment=quickstart stages=[eval]

Each step the drafter proposes up to γ tokens greedily; the target scores the last committed token plus all
proposals in one forward; the longest prefix where proposal == target argmax is accepted, and the target's own
next token (the correction, or the bonus when everything was accepted) is appended. Both KV caches are then
cropped to the committed prefix. The output is, by construction, the target's greedy output; the benchmark
checks that token for token against plain greedy decoding with the same model, cache and forward.

Metrics (see shared METHODS.md §2): acceptance rate = accepted / drafted; block efficiency τ = tokens emitted per
target forward, the correction/bonus token included (vLLM's mean acceptance length); per-position acceptance,
unconditional (accepted at i / steps that drafted position i, as vLLM logs it) and conditional (accepted at i /
steps that reached position i, EAGLE's α_i); wall speedup = median over prompts of plain time / speculative time.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel

from train.tracking import Tracker


@dataclass(frozen=True)
class EvalSettings:
    gamma: int = 4
    max_new_tokens: int = 128
    warmup_prompts: int = 1
    require_lossless: bool = True
    include_untrained: bool = True
    drafters: dict = field(default_factory=dict)  # extra drafters to compare: {name: checkpoint directory}


@dataclass
class DecodeStats:
    """Counters for one or more speculative generations; add them up with `merge`."""

    gamma: int
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    drafted_at: list[int] = field(default_factory=list)
    reached_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("drafted_at", "reached_at", "accepted_at"):
            if not getattr(self, name):
                setattr(self, name, [0] * self.gamma)

    def record_step(self, proposed: int, accepted: int, emitted: int) -> None:
        self.steps += 1
        self.drafted += proposed
        self.accepted += accepted
        self.emitted += emitted
        for position in range(proposed):
            self.drafted_at[position] += 1
            if position <= accepted:
                self.reached_at[position] += 1
            if position < accepted:
                self.accepted_at[position] += 1

    def merge(self, other: "DecodeStats") -> None:
        self.steps += other.steps
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.emitted += other.emitted
        for name in ("drafted_at", "reached_at", "accepted_at"):
            setattr(self, name, [a + b for a, b in zip(getattr(self, name), getattr(other, name))])

    def metrics(self) -> dict:
        return {
            "acceptance_rate": self.accepted / max(1, self.drafted),
            "block_efficiency": self.emitted / max(1, self.steps),
            "accepted_per_position": [a / max(1, d) for a, d in zip(self.accepted_at, self.drafted_at)],
            "conditional_acceptance_per_position": [a / max(1, r) for a, r in zip(self.accepted_at, self.reached_at)],
            "target_forwards": self.steps, "drafted": self.drafted, "accepted": self.accepted,
            "emitted": self.emitted,
        }


def _forward(model: PreTrainedModel, tokens: list[int], cache: DynamicCache) -> torch.Tensor:
    """Logits [len(tokens), V] for `tokens` appended after what `cache` already holds."""
    start = cache.get_seq_length()
    input_ids = torch.tensor([tokens], device=model.device)
    positions = torch.arange(start, start + len(tokens), device=model.device).unsqueeze(0)
    return model(input_ids=input_ids, position_ids=positions, past_key_values=cache, use_cache=True).logits[0]


def _rollback(cache: DynamicCache, keep: int) -> None:
    """Forget every cached position from `keep` on (transformers' crop takes minus the number to remove)."""
    surplus = cache.get_seq_length() - keep
    if surplus > 0:
        cache.crop(-surplus)


@torch.inference_mode()
def greedy_decode(model: PreTrainedModel, prompt_ids: list[int], max_new_tokens: int,
                  stop_ids: list[int]) -> list[int]:
    """Plain greedy decoding, one token per forward, on the same cache and forward as the speculative path."""
    cache = DynamicCache()
    logits = _forward(model, prompt_ids, cache)
    new_tokens: list[int] = []
    while True:
        token = int(logits[-1].argmax())
        new_tokens.append(token)
        if token in stop_ids or len(new_tokens) >= max_new_tokens:
            return new_tokens
        logits = _forward(model, [token], cache)


@torch.inference_mode()
def speculative_greedy_decode(target: PreTrainedModel, drafter: PreTrainedModel, prompt_ids: list[int], gamma: int,
                              max_new_tokens: int, stop_ids: list[int]) -> tuple[list[int], DecodeStats]:
    """Greedy speculative decoding; returns exactly `greedy_decode(target, ...)`'s tokens, plus counters."""
    stats = DecodeStats(gamma=gamma)
    sequence = list(prompt_ids)
    target_cache, drafter_cache = DynamicCache(), DynamicCache()
    if len(sequence) > 1:  # both caches hold everything but the last committed token
        _forward(target, sequence[:-1], target_cache)
        _forward(drafter, sequence[:-1], drafter_cache)
    new_count = 0
    while new_count < max_new_tokens:
        proposals: list[int] = []
        budget = min(gamma, max_new_tokens - new_count - 1)  # the target always adds one token of its own
        feed = sequence[drafter_cache.get_seq_length():]
        for _ in range(budget):
            token = int(_forward(drafter, feed, drafter_cache)[-1].argmax())
            proposals.append(token)
            feed = [token]
        verify_logits = _forward(target, sequence[-1:] + proposals, target_cache)
        target_choice = verify_logits.argmax(-1).tolist()  # the step's one host sync
        accepted = 0
        while accepted < len(proposals) and proposals[accepted] == target_choice[accepted]:
            accepted += 1
        emitted = proposals[:accepted] + [target_choice[accepted]]
        finished = False
        for index, token in enumerate(emitted):
            if token in stop_ids:
                emitted, finished = emitted[: index + 1], True
                break
        sequence.extend(emitted)
        new_count += len(emitted)
        stats.record_step(len(proposals), min(accepted, len(emitted)), len(emitted))
        _rollback(target_cache, len(sequence) - 1)
        _rollback(drafter_cache, len(sequence) - 1)
        if finished:
            break
    return sequence[len(prompt_ids):], stats


class LosslessnessError(AssertionError):
    pass


def _timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def evaluate(target: PreTrainedModel, drafters: dict[str, PreTrainedModel], prompts: list[dict], stop_ids: list[int],
             settings: EvalSettings, out_dir: Path, tracker: Tracker) -> dict:
    """Benchmark every drafter on `prompts` ([{id, category, prompt_ids}]) against plain target greedy decoding.

    Writes `out_dir/report.json` and `out_dir/report.md`; returns the report.
    """
    for warm in prompts[: settings.warmup_prompts]:  # first calls pay one-off allocation costs
        greedy_decode(target, warm["prompt_ids"], 8, stop_ids)
        for drafter in drafters.values():
            speculative_greedy_decode(target, drafter, warm["prompt_ids"], settings.gamma, 8, stop_ids)
    plain_outputs, plain_seconds = [], []
    for prompt in tqdm(prompts, desc="eval: plain target", unit="prompt"):
        tokens, seconds = _timed(greedy_decode, target, prompt["prompt_ids"], settings.max_new_tokens, stop_ids)
        plain_outputs.append(tokens)
        plain_seconds.append(seconds)
    report = {"settings": {k: v for k, v in vars(settings).items() if k != "drafters"}, "num_prompts": len(prompts),
              "plain": {"tokens": sum(map(len, plain_outputs)), "seconds": round(sum(plain_seconds), 3)},
              "drafters": {}}
    for name, drafter in drafters.items():
        total, ratios, mismatches, per_prompt = DecodeStats(gamma=settings.gamma), [], [], []
        for prompt, reference, reference_seconds in tqdm(list(zip(prompts, plain_outputs, plain_seconds)),
                                                         desc=f"eval: {name}", unit="prompt"):
            (tokens, stats), seconds = _timed(speculative_greedy_decode, target, drafter, prompt["prompt_ids"],
                                              settings.gamma, settings.max_new_tokens, stop_ids)
            if tokens != reference:
                first = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b),
                             min(len(tokens), len(reference)))
                mismatches.append({"id": prompt["id"], "first_difference_at": first})
            total.merge(stats)
            ratios.append(reference_seconds / seconds)
            per_prompt.append({"id": prompt["id"], "category": prompt.get("category", ""),
                               **{k: v for k, v in stats.metrics().items() if not k.endswith("position")},
                               "speedup": reference_seconds / seconds})
        metrics = total.metrics()
        metrics |= {"speedup_median": statistics.median(ratios), "speedup_min": min(ratios),
                    "speedup_max": max(ratios), "lossless": not mismatches, "mismatches": mismatches,
                    "per_prompt": per_prompt}
        report["drafters"][name] = metrics
        tracker.log({f"eval/{name}/block_efficiency": metrics["block_efficiency"],
                     f"eval/{name}/acceptance_rate": metrics["acceptance_rate"],
                     f"eval/{name}/speedup_median": metrics["speedup_median"]})
    trained = {n: m for n, m in report["drafters"].items() if n != "untrained"}
    report["best"] = max(trained or report["drafters"], key=lambda n: report["drafters"][n]["block_efficiency"])
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(markdown_table(report))
    tracker.table("eval/summary", ["drafter", "block_efficiency", "acceptance_rate", "speedup_median", "lossless"],
                  [[n, m["block_efficiency"], m["acceptance_rate"], m["speedup_median"], m["lossless"]]
                   for n, m in report["drafters"].items()])
    failing = [n for n, m in report["drafters"].items() if not m["lossless"]]
    if failing and settings.require_lossless:
        raise LosslessnessError(f"speculative output differs from plain greedy output for {failing}: "
                                f"{[report['drafters'][n]['mismatches'][:3] for n in failing]} (see {out_dir})")
    return report


def markdown_table(report: dict) -> str:
    gamma = report["settings"]["gamma"]
    lines = [f"| drafter | block efficiency τ | acceptance rate | accepted per position (1..{gamma}) "
             f"| wall speedup (median) | lossless |", "|---|---|---|---|---|---|"]
    for name, m in report["drafters"].items():
        positions = " / ".join(f"{value:.2f}" for value in m["accepted_per_position"])
        lines.append(f"| {name} | {m['block_efficiency']:.3f} | {m['acceptance_rate']:.3f} | {positions} "
                     f"| {m['speedup_median']:.2f}× | {'yes' if m['lossless'] else 'NO'} |")
    return "\n".join(lines) + "\n"
