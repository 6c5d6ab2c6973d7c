"""How fast a feature drafter's training could be on this machine: FLOPs per scored token against the rate the
machine's matrix products reach, so a throughput goal can be read against the hardware.

    python bench/train_bound.py runs/quickstart/default/distill/model [--peers runs/peers/peers/peers.json]

1. One training step of the drafter as distill runs it (the training-time test unrolled `--steps` times over a
   batch of `--batch` rows of `--length` tokens, its head over the draft vocabulary at every position, the
   teacher's head restricted to the draft vocabulary once per batch, the backward pass), counted by
   `torch.utils.flop_counter.FlopCounterMode`: FLOPs per scored token (the inputs are random: FLOPs depend on
   shapes only).
2. This machine's fp32 matrix-product rate with the same threads, on the step's largest products (each timed,
   best of 5): the highest rate a step built of such products can reach.
3. The ceiling in scored tokens/s (2 / 1), and, with a `bench/peers.py` result, each trainer's measured tokens/s
   as a share of it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.kinds import load_any
from models.loading import configured_target, load_target


def step_flops(drafter, target, batch: int, length: int, steps: int) -> int:
    """FLOPs of one training step (forward and backward) over batch × length scored positions."""
    hidden = target.model.config.hidden_size
    width = len(drafter.feature_layers or ()) * hidden or hidden
    features = torch.randn(batch, length, width)
    embeddings = torch.randn(batch, length, hidden)
    last = torch.randn(batch, length, hidden)
    attention = torch.ones(batch, length, dtype=torch.long)
    restricted = target.model.get_output_embeddings().weight[drafter.head.d2t].detach()
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            teacher = torch.log_softmax(torch.nn.functional.linear(last, restricted), -1)
        loss = 0.0
        for output in drafter.unrolled(features, embeddings, attention, steps):
            student = torch.log_softmax(drafter.head.compact(drafter.norm(output)), -1)
            loss = loss + (teacher.exp() * (teacher - student)).sum()
        loss.backward()
    return counter.get_total_flops()


def matmul_rate(m: int, k: int, n: int, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of [m, k] @ [k, n] here."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    best = float("inf")
    for _ in range(repeats + 1):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * m * k * n / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("drafter", type=Path, help="a trained feature drafter's folder (distill/model)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=192,
                        help="tokens per row (the quickstart scores 206,198 in 3 epochs of 357 rows: ~193)")
    parser.add_argument("--steps", type=int, default=3, help="training-time test steps")
    parser.add_argument("--peers", type=Path, default=None, help="a bench/peers.py peers.json to set against it")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "draftsmith")
    options = parser.parse_args()
    target = load_target(configured_target("smollm2_135m"), options.cache_dir)
    drafter = load_any(options.drafter, target)
    if getattr(drafter, "head", None) is None:
        raise SystemExit(f"{options.drafter}: not a feature drafter with a draft-vocabulary head")
    drafter.train()
    tokens = options.batch * options.length
    flops = step_flops(drafter, target, options.batch, options.length, options.steps) / tokens
    hidden = target.model.config.hidden_size
    shapes = {"draft head": (tokens, hidden, len(drafter.head.d2t)),
              "MLP": (tokens, hidden, drafter.layer_config.intermediate_size),
              "attention in": (tokens, 2 * hidden, hidden)}
    rates = {name: matmul_rate(*shape) for name, shape in shapes.items()}
    best = max(rates.values())
    print(f"{torch.get_num_threads()} threads; {flops / 1e6:.1f} MFLOP per scored token (batch {options.batch} × "
          f"{options.length}, {options.steps} TTT steps, forward and backward)")
    for name, rate in rates.items():
        print(f"  fp32 matmul {name} {shapes[name]}: {rate:.0f} GFLOP/s")
    print(f"ceiling at the best product's rate: {best * 1e9 / flops:.0f} scored tokens/s")
    if options.peers:
        for name, trainer in json.loads(options.peers.read_text())["trainers"].items():
            rate = trainer["scored_tokens"] / trainer["train_seconds"]
            print(f"  {name}: {rate:.0f} scored tokens/s = {rate * flops / 1e9:.0f} GFLOP/s, "
                  f"{rate * flops / 1e9 / best:.0%} of the best product's rate")

if __name__ == "__main__":
    main()
