"""Greedy replay: what a drafter's guesses would have had accepted along the target's own answers (the trace), so a
stream is decoded once with the plain target and replayed for every arm and version."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from eval.decoder import plain_generate_topk
from eval.metrics import DecodeStats
from train.online.settings import OnlineSettings


def replay_steps(answer: list[int], guesses: list[list[int]], gamma: int,
                 max_new_tokens: int) -> tuple[list[dict], DecodeStats]:
    """Greedy chain decoding replayed: `guesses[j][a]` is the drafter's argmax for answer[a] as the (j+1)-th draft
    of a step that started at a - j on the target's own prefix (train/online/learners.py). The steps (start,
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
