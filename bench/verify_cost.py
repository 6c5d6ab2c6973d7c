"""What a verification forward costs: one target forward over w new tokens against w = 1, before and after the
few-row kernel (models/kernels.py), ours and HF's.

    .venv/bin/python bench/verify_cost.py --context 300 --widths 1,2,4,5,8,16

The speed models (MBSU = τ / (1 + γc)) price a target forward over γ + 1 tokens like a one-token step. This
measures that assumption on this machine with the real SmolLM2-135M target (fp32) after a `--context`-token
prefix, in one process, the sides alternating: our pre-allocated ragged cache and block mask
(`eval.decoder.verification_seconds`, what the eval stage measures v with) with `F.linear` ("before") and with
the few-row kernel ("after", what the decoder uses for plain and speculative decoding alike); transformers' own
`DynamicCache` forward (cropped back after each call, as HF assisted generation does), also both ways, since a
baseline gets every trick our side gets; and the LM head alone. Median of `--calls` calls, best of `--repeats`.
It prints milliseconds per forward and v = (cost at w) / (cost at w = 1) for each.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import DynamicCache

from eval.decoder import verification_seconds
from models.compat import cache_argument
from models.kernels import few_row_linears
from models.loading import configured_target, load_target


def seconds_per_call(function, calls: int) -> float:
    """Median of `calls` timed calls after one warm-up call (as `verification_seconds` times ours)."""
    function()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def huggingface(model, prefix: torch.Tensor, width: int, calls: int) -> float:
    cache = DynamicCache(config=model.config)
    model(input_ids=prefix, use_cache=True, **cache_argument(model, cache))
    block = torch.randint(0, model.config.vocab_size, (1, width))

    def step():
        model(input_ids=block, use_cache=True, **cache_argument(model, cache))
        cache.crop(-width)
    return seconds_per_call(step, calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--widths", type=str, default="1,2,4,8,16")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "draftsmith")
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    torch.manual_seed(0)
    model = load_target(configured_target("smollm2_135m"), args.cache).model
    prefix = torch.randint(0, model.config.vocab_size, (1, args.context))
    head = model.get_output_embeddings()
    best: dict[tuple[str, int], float] = {}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for width in widths:
                hidden = torch.randn(1, width, model.config.hidden_size)
                for kernel in (False, True):
                    label = "after" if kernel else "before"
                    with few_row_linears(model, active=kernel):  # verification_seconds' own block nests inside
                        sides = {f"ours {label}": lambda: verification_seconds(model, prefix[0].tolist(), [width],
                                                                               args.calls)[width],
                                 f"HF {label}": lambda: huggingface(model, prefix, width, args.calls),
                                 f"LM head {label}": lambda: seconds_per_call(lambda: head(hidden), args.calls)}
                        for name, measure in sides.items():
                            best[(name, width)] = min(best.get((name, width), float("inf")), measure())
    names = [f"{side} {label}" for side in ("ours", "HF", "LM head") for label in ("before", "after")]
    print(f"SmolLM2-135M fp32, {args.context}-token context, {torch.get_num_threads()} threads, best of "
          f"{args.repeats} × {args.calls} calls; before = F.linear, after = the few-row kernel")
    print("| new tokens w | " + " | ".join(f"{name} ms | v" for name in names) + " |")
    print("|---|" + "---|---|" * len(names))
    for width in widths:
        cells = []
        for name in names:
            cells += [f"{best[(name, width)] * 1e3:.1f}", f"{best[(name, width)] / best[(name, widths[0])]:.2f}"]
        print(f"| {width} | " + " | ".join(cells) + " |")
    for width in widths[1:]:
        before, after = (best[(f"ours {label}", width)] / best[(f"ours {label}", widths[0])]
                         for label in ("before", "after"))
        print(f"v at w={width}: {before:.2f} before, {after:.2f} after (one-token steps, each with its own kernel)")

if __name__ == "__main__":
    main()
