"""What a verification forward costs: one target forward over w new tokens against w = 1, with F.linear, with MKL's
transposed few-row product and with the compiled few-row product (models/kernels.py), ours and HF's.

    .venv/bin/python bench/verify_cost.py --context 300 --widths 1,2,4,5,8,16

The speed models (MBSU = τ / (1 + γc)) price a target forward over γ + 1 tokens like a one-token step. This
measures that assumption on this machine with the real SmolLM2-135M target (fp32) after a `--context`-token
prefix, in one process, the sides alternating: our pre-allocated ragged cache and block mask
(`eval.decoder.verification_seconds`, what the eval stage measures v with) with `F.linear` ("before") and with
the few-row kernel ("after", what the decoder uses for plain and speculative decoding alike); transformers' own
`DynamicCache` forward (cropped back after each call, as HF assisted generation does), also every way, since a
baseline gets every trick our side gets; and the LM head alone. Three ways: "before" (`F.linear`), "mkl" (MKL's
transposed product with padded rows, the kernel until 2026-12-04) and "after" (the compiled product
`models/few_rows.cpp` where it builds, what the decoder uses now). Median of `--calls` calls, best of `--repeats`.
It prints milliseconds per forward and v = (cost at w) / (cost at w = 1) for each, w = 1 with the same way.
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
from models.kernels import compiled_module, compiled_product, few_row_linears
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
    labels = {"before": (False, False), "mkl": (True, False), "after": (True, True)}  # (few-row, compiled)
    if compiled_module() is None:
        print("the compiled product is unavailable here (see above): 'after' is MKL's transposed product")
    with torch.inference_mode():
        for _ in range(args.repeats):
            for width in widths:
                hidden = torch.randn(1, width, model.config.hidden_size)
                for label, (kernel, compiled) in labels.items():
                    with few_row_linears(model, active=kernel), compiled_product(compiled):
                        sides = {f"ours {label}": lambda: verification_seconds(model, prefix[0].tolist(), [width],
                                                                               args.calls)[width],
                                 f"HF {label}": lambda: huggingface(model, prefix, width, args.calls),
                                 f"LM head {label}": lambda: seconds_per_call(lambda: head(hidden), args.calls)}
                        for name, measure in sides.items():
                            best[(name, width)] = min(best.get((name, width), float("inf")), measure())
    names = [f"{side} {label}" for side in ("ours", "HF", "LM head") for label in labels]
    print(f"SmolLM2-135M fp32, {args.context}-token context, {torch.get_num_threads()} threads, best of "
          f"{args.repeats} × {args.calls} calls; before = F.linear, mkl = MKL's transposed few-row product, "
          "after = the compiled few-row product")
    print("| new tokens w | " + " | ".join(f"{name} ms | v" for name in names) + " |")
    print("|---|" + "---|---|" * len(names))
    for width in widths:
        cells = []
        for name in names:
            cells += [f"{best[(name, width)] * 1e3:.1f}", f"{best[(name, width)] / best[(name, widths[0])]:.2f}"]
        print(f"| {width} | " + " | ".join(cells) + " |")
    for width in widths[1:]:
        before, mkl, after = (best[(f"ours {label}", width)] / best[(f"ours {label}", widths[0])] for label in labels)
        print(f"v at w={width}: {before:.2f} before, {mkl:.2f} mkl, {after:.2f} after (one-token steps, each with "
              "its own kernel)")
    for width in widths:
        print(f"w={width}: after vs before {best[('ours before', width)] / best[('ours after', width)]:.2f}× faster, "
              f"after vs mkl {best[('ours mkl', width)] / best[('ours after', width)]:.2f}×")

if __name__ == "__main__":
    main()
