"""Where the decoder's wall time goes: the target's forwards, the drafter's, and everything around them.

    python bench/decoder_breakdown.py runs/quickstart/default                 # after +experiment=quickstart
    python bench/decoder_breakdown.py runs/quickstart/default --tree 2,1,1 --batch-size 4 --prompts 8

Reads a finished run as `bench/merged_tree.py` does (its trained drafter, its data_gen records for the n-gram table,
the prompts its eval decoded and their plain answers) and decodes those prompts greedily once per row, each row
alone on the machine, with every output compared with the plain answer token for token. Rows: plain decoding, the
trained drafter as a γ chain and as a tree (`--tree`), the lookup (`--lookup`) as a γ chain, the drafter behind the
lookup (`eval.hybrid`) and the merged tree (`eval.merged`: drafter `--merged-tree` + the lookup's `--depth`).

Each row's wall time is split, by timing the decoder's own functions and the drafters' methods (a call's time
less the time of the timed calls inside it), into:
- target forwards: the target's forwards on its cache (prefill included) and its LM head;
- drafter forwards: the trained drafter's catch-up and drafting forwards (its head included);
- lookup: the training-free drafter's table lookups;
- drafting: building the chain or tree from the drafters' outputs (top-k, merging, pruning, the merged mask);
- acceptance: deciding the accepted path and the target's own token;
- bookkeeping: the caches' and drafters' state after a step (accepted path moved into place, features kept,
  finished rows dropped, drafter state committed);
- the rest: the step loop itself (the emitted tokens, stop checks, statistics, small tensors) and the timers.
Outside forwards = wall − target forwards − drafter forwards (issue 34's item 5 asks ≤ 10% of wall for each row).
The timers cost a few microseconds a call, counted under the rest.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import eval.decoder as decoder
from bench.merged_tree import read_run, run_arguments
from eval.decoder import DecodeSettings, plain_generate, speculative_generate
from eval.speculative import aggregate
from models.cache import RaggedKVCache
from models.kinds import draft_for
from models.lookup import LookupFirstDraft, MergedDraft

PARTS = ("target forwards", "drafter forwards", "lookup", "drafting", "acceptance", "bookkeeping")
# the decoder's module-level functions and class methods, by part
DECODER_FUNCTIONS = {
    "target forwards": ["head_logits"],
    "drafting": ["_draft_chain", "_draft_tree", "draft_pruned", "merge_proposals", "_merged_block"],
    "acceptance": ["_accept_chain", "_accept_tree", "_accept_general"],
}
CLASS_METHODS = {
    "target forwards": [(decoder._Target, "forward")],
    "bookkeeping": [(decoder._Target, "store_features"), (decoder._Target, "keep_rows"), (RaggedKVCache, "move"),
                    (decoder._Rows, "keep_rows")],
}
DRAFT_METHODS = {"catch_up": "forwards", "extend": "forwards", "observe": "forwards", "start": "bookkeeping",
                 "commit": "bookkeeping", "keep_rows": "bookkeeping"}


class Clock:
    """Exclusive seconds per part: a timed call's time less the time of the timed calls it made."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.inner: list[float] = []

    def wrap(self, part: str, function):
        def timed(*arguments, **keywords):
            started = time.perf_counter()
            self.inner.append(0.0)
            try:
                return function(*arguments, **keywords)
            finally:
                elapsed = time.perf_counter() - started
                self.seconds[part] += elapsed - self.inner.pop()
                if self.inner:
                    self.inner[-1] += elapsed
        return timed


def time_methods(clock: Clock, stack: ExitStack, owner, names_to_parts: dict[str, str]) -> None:
    """Time `owner`'s methods (an instance's, shadowing its class's, a class's, or a module's functions), undone
    when `stack` closes."""
    for name, part in names_to_parts.items():
        if not hasattr(owner, name):
            continue
        if name in vars(owner):  # its own attribute (a class's method, an instance's bound one): put back
            stack.callback(setattr, owner, name, vars(owner)[name])
        else:  # an instance's method from its class: the instance attribute that shadows it goes again
            stack.callback(delattr, owner, name)
        setattr(owner, name, clock.wrap(part, getattr(owner, name)))


def time_draft(clock: Clock, stack: ExitStack, draft) -> None:
    """Time a draft's methods: a trained drafter's forwards as drafter forwards, a lookup's as lookup, and what a
    lookup-and-drafter pair adds around its two parts as drafting."""
    if isinstance(draft, (LookupFirstDraft, MergedDraft)):
        time_draft(clock, stack, draft.lookup)
        time_draft(clock, stack, draft.trained)
        pair = {name: "drafting" for name in ("catch_up", "extend")}
        pair.update({name: "lookup" for name in ("lookup_chains", "drafter_needed", "observe")})
        pair.update({name: "bookkeeping" for name in ("start", "commit", "keep_rows")})
        time_methods(clock, stack, draft, pair)
        return
    lookup = not draft.networks  # a training-free drafter: no network of its own
    time_methods(clock, stack, draft, {name: "lookup" if lookup else ("drafter " + part if part == "forwards"
                                                                       else part)
                                       for name, part in DRAFT_METHODS.items()})


@contextmanager
def timed_decoder(clock: Clock, draft=None):
    with ExitStack() as stack:
        for part, names in DECODER_FUNCTIONS.items():
            time_methods(clock, stack, decoder, dict.fromkeys(names, part))
        for part, methods in CLASS_METHODS.items():
            for owner, name in methods:
                time_methods(clock, stack, owner, {name: part})
        if draft is not None:
            time_draft(clock, stack, draft)
        yield


def breakdown(target, draft, items, decode: DecodeSettings, stop_ids) -> dict:
    """One row decoded over `items` with its wall time split into PARTS (seconds), the rest, and its outputs."""
    clock = Clock()
    prompts = [item["prompt_ids"] for item in items]
    with timed_decoder(clock, draft):
        started = time.perf_counter()
        if draft is None:
            outputs, stats = plain_generate(target.model, prompts, decode, stop_ids), None
        else:
            generations = speculative_generate(target.model, draft, prompts, decode, stop_ids)
            outputs, stats = [g.tokens for g in generations], aggregate([g.stats for g in generations])
        wall = time.perf_counter() - started
    parts = {part: clock.seconds.get(part, 0.0) for part in PARTS}
    if clock.seconds.keys() - set(PARTS):
        raise RuntimeError(f"untabled parts {sorted(clock.seconds.keys() - set(PARTS))}")
    return {"wall": wall, "parts": parts, "rest": wall - sum(parts.values()), "outputs": outputs,
            "tokens": sum(map(len, outputs)), "tau": stats["block_efficiency"] if stats else 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_arguments(parser)
    parser.add_argument("--gamma", type=int, default=3)
    parser.add_argument("--tree", default="2,1,1", help="the drafter-alone tree row's top-k per depth")
    parser.add_argument("--merged-tree", default="2", help="the drafter's own part of the merged row")
    parser.add_argument("--depth", type=int, default=4, help="the lookup branch's most tokens in the merged row")
    parser.add_argument("--batch-size", type=int, default=1)
    options = parser.parse_args()
    report_path, items, max_new, target, trained, front, stop_ids, references = read_run(options)
    tree = tuple(int(k) for k in options.tree.split(","))
    own = tuple(int(k) for k in options.merged_tree.split(","))
    gamma = options.gamma

    def drafter():
        return draft_for(trained, target.model)

    def lookup():
        return draft_for(front, target.model)

    chain = DecodeSettings(gamma=gamma, max_new_tokens=max_new, batch_size=options.batch_size)
    rows = {  # name: (draft factory, settings)
        "plain": (lambda: None, chain),
        f"drafter γ={gamma}": (drafter, chain),
        f"drafter tree {list(tree)}": (drafter, DecodeSettings(tree=tree, max_new_tokens=max_new,
                                                                batch_size=options.batch_size)),
        f"{options.lookup} γ={gamma}": (lookup, chain),
        f"drafter behind {options.lookup} γ={gamma}": (lambda: LookupFirstDraft(lookup(), drafter()), chain),
        f"merged: drafter {list(own)} + lookup {options.depth}": (
            lambda: MergedDraft(lookup(), drafter(), options.depth, 0, own), chain),
    }
    warm = DecodeSettings(gamma=gamma, max_new_tokens=8, batch_size=options.batch_size)
    results = {}
    for name, (make, settings) in rows.items():
        draft = make()
        warm_draft = make()
        if warm_draft is None:  # one-off allocations and the kernels' first calls, untimed
            plain_generate(target.model, [items[0]["prompt_ids"]], warm, stop_ids)
        else:
            speculative_generate(target.model, warm_draft, [items[0]["prompt_ids"]], warm, stop_ids)
        print(f"[breakdown] {name} ...", flush=True)
        result = breakdown(target, draft, items, settings, stop_ids)
        result["lossless"] = result.pop("outputs") == references
        results[name] = result
    print(f"\n{len(items)} prompts of {report_path}, greedy, up to {max_new} new tokens, batch "
          f"{options.batch_size}; % of each row's wall time\n")
    print("| row | τ | tok/s | wall s | " + " | ".join(PARTS) + " | the rest | outside forwards | lossless |")
    print("|---|---|---|---|" + "---|" * (len(PARTS) + 3))
    for name, r in results.items():
        share = {part: r["parts"][part] / r["wall"] for part in PARTS}
        outside = 1 - share["target forwards"] - share["drafter forwards"]
        r["outside_forwards"] = outside
        print(f"| {name} | {r['tau']:.3f} | {r['tokens'] / r['wall']:.1f} | {r['wall']:.1f} | "
              + " | ".join(f"{100 * share[part]:.1f}" for part in PARTS)
              + f" | {100 * r['rest'] / r['wall']:.1f} | **{100 * outside:.1f}** | "
              f"{'yes' if r['lossless'] else 'NO'} |")
    if options.out:
        options.out.write_text(json.dumps({"settings": {k: str(v) if isinstance(v, Path) else v
                                                        for k, v in vars(options).items()}, "rows": results},
                                          indent=2))
    if not all(r["lossless"] for r in results.values()):
        raise SystemExit("a row's output differs from plain greedy decoding: see the lossless column")


if __name__ == "__main__":
    main()
