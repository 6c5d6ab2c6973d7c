"""What one drafter forward costs while decoding (the eval's c, measured): a trained drafter's draft-vocabulary head
through `F.linear` ("before": the decoder's few-row patch leaves the head out) and through the few-row kernel
(`models/kernels.py`, "after": the patch reaches it, as it does by default), side by side.

    .venv/bin/python bench/draft_cost.py runs/quickstart/default/distill/model --repeats 4

The drafter drafts a 32-token chain after one prompt on the real SmolLM2-135M target (fp32), as the eval's
`measure_cost_ratio` times it; the two sides alternate in one process (the order flipping each repeat), and the
drafted tokens of both are compared. It prints milliseconds per drafter forward (median over repeats), the ratio,
and c for each against the target's own one-token step measured in the same process.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_gen.chat import prompt_token_ids
from eval.decoder import DecodeSettings, plain_generate, speculative_generate
from models.drafter import ReducedVocabHead
from models.kinds import draft_for, load_any
from models.loading import configured_target, load_target

PROMPT = "Write a short story about a robot learning to paint."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("drafter", type=Path, help="a trained drafter's folder (distill/model or an export)")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "draftsmith")
    options = parser.parse_args()
    target = load_target(configured_target("smollm2_135m"), options.cache_dir)
    draft = draft_for(load_any(options.drafter, target), target.model)
    ids = prompt_token_ids(target.tokenizer, [{"role": "user", "content": PROMPT}])
    settings = DecodeSettings(gamma=options.tokens, max_new_tokens=options.tokens + 1)
    sides = {"before (F.linear)": None, "after (few-row kernel)": ReducedVocabHead.FEW_ROW_METHOD}
    milliseconds, tokens = {name: [] for name in sides}, {}
    speculative_generate(target.model, draft, [ids], settings, [])  # warm-up
    try:
        for repeat in range(options.repeats):
            for name in (list(sides) if repeat % 2 == 0 else list(sides)[::-1]):
                ReducedVocabHead.FEW_ROW_METHOD = sides[name]
                timings = {}
                tokens[name] = speculative_generate(target.model, draft, [ids], settings, [], timings=timings)[0].tokens
                milliseconds[name].append(timings["draft_seconds"] / timings["draft_forwards"] * 1e3)
    finally:
        ReducedVocabHead.FEW_ROW_METHOD = sides["after (few-row kernel)"]
    started = time.perf_counter()
    plain_generate(target.model, [ids], settings, [])
    middle = time.perf_counter()
    plain_generate(target.model, [ids], DecodeSettings(max_new_tokens=1), [])
    step = ((middle - started) - (time.perf_counter() - middle)) / options.tokens * 1e3  # prefill taken out
    medians = {name: statistics.median(values) for name, values in milliseconds.items()}
    for name, value in medians.items():
        print(f"{name:24s} {value:6.2f} ms per drafter forward (repeats: "
              f"{', '.join(f'{v:.2f}' for v in milliseconds[name])}), c = {value / step:.3f}")
    before, after = medians.values()
    print(f"target one-token step {step:.1f} ms; after / before = {after / before:.2f}; "
          f"drafted tokens identical: {len(set(map(tuple, tokens.values()))) == 1}")


if __name__ == "__main__":
    main()
