"""Serving a stream with one arm: replayed or for real, spot checks against the trace, request logs, checkpoints
and resume."""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from data_gen.stream import StreamRequest
from eval.decoder import LosslessnessError, VerificationRecorder, plain_generate, speculative_generate
from eval.metrics import DecodeStats
from infra.stage import StageRun
from models.kinds import draft_for
from train.core import checkpoint
from train.online.arms import ArmState
from train.online.buffer import Served
from train.online.replay import Trace, replay_steps


def replayed(request: StreamRequest, prompt: list[int], trace: Trace, state: ArmState) -> Served:
    """The request as greedy serving with the arm's serving drafter would have gone (exact: see the docstring)."""
    index, settings = request.index, state.settings
    answer = trace.answers[index]
    guesses = state.learner.guesses(state.serving, [(request.key, prompt, answer)])[0]
    steps, stats = replay_steps(answer, guesses, settings.decode.gamma, settings.decode.max_new_tokens)
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
    step = settings.decode.batch_size if settings.mode == "serve" else 1
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
    if checked and settings.decode.sampling.greedy:
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
