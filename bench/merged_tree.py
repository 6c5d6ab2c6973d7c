"""Merged token trees against chains, trees and the lookup-first hybrid, side by side on one eval's prompts.

    python bench/merged_tree.py runs/quickstart/default                     # after +experiment=quickstart
    python bench/merged_tree.py runs/quickstart/default --lookup prompt_lookup+ngram --gamma 3

Reads a finished run: its trained drafter (`distill/model`), its data_gen records (the n-gram table) and the
prompts its eval decoded with the target's plain answers (`eval/report.json`, both MT-Bench turns). Every row
decodes those prompts greedily with the same target, in one process, the rows interleaved prompt by prompt with
plain decoding (`eval.speculative.decode_interleaved`, as the eval stage times them), and every output is compared
with the target's plain answer token for token. Rows:
- the trained drafter alone (γ chain);
- the training-free lookup alone (γ chain);
- the trained drafter behind the lookup (`eval.hybrid`: the lookup's guess first at every node);
- merged trees (`eval.merged`, `models.lookup.MergedDraft`): the lookup's continuation (up to `--depth` tokens)
  beside the drafter's own chain or tree (`--shapes`) in one verification; each shape also pruned by cost (the
  drafter's nodes whose path probability is below what one more verified token costs on this machine, in plain
  steps, are not verified: `eval.speculative.node_cost`, `eval.merged_min_probability=auto`), and the first shape
  with the drafter sitting out steps where the lookup's guess is long (`--skip-at`), and pruned with the drafter
  sitting out steps where its measured gain is worth less than its measured cost (`--gate`,
  `eval.merged_skip_at=auto`, `models.lookup.DrafterGate`).
Prints, per row: τ, tokens per verification forward, the share of steps the drafter ran, the wall speedup over
plain decoding (median over prompts, 95% interval) and whether every output equals plain decoding; then τ per
category. A merged row's cost is its verification width (`bench/verify_cost.py` measures v(w) on this machine)
plus the drafter's forwards where it runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from data_gen.chat import end_of_turn_ids
from eval.decoder import DecodeSettings
from eval.metrics import median_interval
from eval.speculative import aggregate, decode_interleaved, node_cost, training_free
from models.kinds import draft_for, load_any
from models.loading import configured_target, load_target
from models.lookup import BASELINES, LookupFirstDraft, MergedDraft, baseline_specs


def rows(target, trained, front, options) -> dict:
    """{name: draft}: every way of drafting compared, fresh objects (each keeps its own state)."""
    def drafter():
        return draft_for(trained, target.model)

    def lookup():
        return draft_for(front, target.model)

    gamma, depth = options.gamma, options.depth
    made = {f"drafter γ={gamma}": drafter(), f"{options.lookup} γ={gamma}": lookup(),
            f"drafter behind {options.lookup} γ={gamma}": LookupFirstDraft(lookup(), drafter())}
    for index, text in enumerate(options.shapes):
        shape = tuple(int(k) for k in text.split(","))
        own = f"γ={len(shape)}" if set(shape) == {1} else f"tree {list(shape)}"
        made[f"merged: drafter {own} + lookup {depth}"] = MergedDraft(lookup(), drafter(), depth, 0, shape)
        if options.bar:
            made[f"merged: drafter {own} + lookup {depth}, nodes ≥ {options.bar:.3f}"] = MergedDraft(
                lookup(), drafter(), depth, 0, shape, options.bar)
        if index == 0 and options.skip_at:
            made[f"merged: drafter {own} + lookup {depth}, skip at {options.skip_at}"] = MergedDraft(
                lookup(), drafter(), depth, options.skip_at, shape)
        if index == 0 and options.gate:
            made[f"merged: drafter {own} + lookup {depth}, nodes ≥ {options.bar:.3f}, gated"] = MergedDraft(
                lookup(), drafter(), depth, "auto", shape, options.bar)
    return made


def run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `read_run` reads: the finished run, the lookup, which prompts and how many new tokens, where the
    results and the target's cache go."""
    parser.add_argument("run", type=Path, help="a finished run's folder (data_gen, distill, eval)")
    parser.add_argument("--lookup", default="prompt_lookup+ngram", choices=sorted(BASELINES))
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: what the run's eval decoded")
    parser.add_argument("--prompts", type=int, default=None, help="the first N of the eval's prompts (default all)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "draftsmith")


def read_run(options: argparse.Namespace):
    """A finished quickstart-style run (`run_arguments`), as the benches decode it: (its eval report's path, the
    first `--prompts` of its eval prompts, the new tokens to decode, the target, the trained drafter, the `--lookup`
    baseline built from its data_gen records, the stop ids, the target's plain answers cut to that length)."""
    run, lookup = options.run, options.lookup
    report_path = run / "eval" / "report.json"
    for needed in (run / "distill" / "model", run / "data_gen", report_path):
        if not needed.exists():
            raise SystemExit(f"{needed} is missing: run the quickstart (data_gen, distill, eval) into {run}")
    report = json.loads(report_path.read_text())
    items = report["prompts"][: options.prompts]
    max_new = options.max_new_tokens or report["settings"]["decode"]["max_new_tokens"]
    torch.manual_seed(0)
    target = load_target(configured_target("smollm2_135m"), options.cache_dir)
    trained = load_any(run / "distill" / "model", target)
    fronts, skipped = training_free(target, baseline_specs([lookup]), run / "data_gen")
    if skipped:
        raise SystemExit(f"{lookup}: {skipped[lookup]}")
    stop_ids = report.get("stop_ids") or end_of_turn_ids(target.tokenizer, target.model.generation_config)
    references = [item["reference_ids"][:max_new] for item in items]
    return report_path, items, max_new, target, trained, fronts[lookup], stop_ids, references


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_arguments(parser)
    parser.add_argument("--gamma", type=int, default=3)
    parser.add_argument("--depth", type=int, default=4, help="the lookup branch's most tokens in a merged tree")
    parser.add_argument("--skip-at", type=int, default=3)
    parser.add_argument("--gate", action=argparse.BooleanOptionalAction, default=True,
                        help="a row with the drafter priced in or out per step (eval.merged_skip_at=auto)")
    parser.add_argument("--shapes", nargs="+", default=["1,1,1", "1", "2,1,1"],
                        help="the drafter's own part of each merged row: top-k per depth (1,1,1: a γ=3 chain)")
    parser.add_argument("--min-probability", type=float, default=None,
                        help="the pruned merged rows' bar on a drafter node's path probability (default: the "
                             "measured cost of one more verified token; 0: no pruned rows)")
    options = parser.parse_args()
    report_path, items, max_new, target, trained, front, stop_ids, references = read_run(options)
    options.bar = options.min_probability
    if options.bar is None:  # chosen by cost: what one more verified token costs here, in plain steps
        options.bar = node_cost(target.model, items[0]["prompt_ids"])
        print(f"[merged_tree] one more verified token costs {options.bar:.3f} plain steps on this machine "
              f"(v(10) - v(2)) / 8: the pruned rows verify drafter nodes at least that likely", flush=True)
    drafts = rows(target, trained, front, options)
    decode = DecodeSettings(gamma=options.gamma, max_new_tokens=max_new)
    decode_interleaved(target.model, drafts, items[:1], DecodeSettings(gamma=options.gamma, max_new_tokens=8),
                       stop_ids)  # warm-up: one-off allocations and the kernels' first calls
    for draft in drafts.values():
        draft.reset()
    outputs, seconds, totals = decode_interleaved(target.model, drafts, items, decode, stop_ids)
    results = {}
    for name, generations in outputs.items():
        metrics = aggregate([g.stats for g in generations])
        median, low, high = median_interval([p / s for p, s in zip(seconds[None], seconds[name])])
        per_category = {category: aggregate([g.stats for g, item in zip(generations, items)
                                             if item["category"] == category])["block_efficiency"]
                        for category in sorted({item["category"] for item in items})}
        results[name] = {
            "tau": metrics["block_efficiency"], "verified_per_step": metrics["mean_verified_per_step"],
            "drafter_run_fraction": metrics["drafter_run_fraction"],
            "accepted_per_position": metrics["accepted_per_position"],
            "speedup_median": median, "speedup_interval_95": [low, high],
            "tokens_per_second": sum(len(g.tokens) for g in generations) / totals[name],
            "lossless": all(g.tokens == r for g, r in zip(generations, references)), "per_category": per_category}
        if drafts[name].merged and drafts[name].gate is not None:
            results[name]["drafter_gate"] = drafts[name].gate.summary()
    plain = sum(map(len, references)) / totals[None]
    print(f"\n{len(items)} prompts of {report_path}, greedy, up to {max_new} new tokens; plain {plain:.1f} tok/s\n")
    print("| row | τ | tokens verified / step | drafter ran | accepted per position | wall speedup (median, 95% CI) "
          "| lossless |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        low, high = r["speedup_interval_95"]
        positions = "/".join(f"{a:.2f}" for a in r["accepted_per_position"])
        print(f"| {name} | {r['tau']:.3f} | {r['verified_per_step']:.1f} | {r['drafter_run_fraction']:.0%} | "
              f"{positions} | {r['speedup_median']:.2f}× [{low:.2f}, {high:.2f}] | "
              f"{'yes' if r['lossless'] else 'NO'} |")
    categories = sorted({c for r in results.values() for c in r["per_category"]})
    print("\nτ per category:\n\n| row | " + " | ".join(categories) + " |\n|---|" + "---|" * len(categories))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r['per_category'][c]:.3f}" for c in categories) + " |")
    for name, r in results.items():
        if "drafter_gate" in r:
            gate = r["drafter_gate"]
            print(f"\n{name}: the drafter's forwards cost {gate['cost']:.3f} verifications; per lookup guess length "
                  "(steps it ran, its mean extra accepted tokens there, steps it was priced out): " + "; ".join(
                      f"{length}: {v['ran']}, {v['gain']}, {v['priced_out']}" for length, v in gate["lengths"].items()))
    if options.out:
        settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(options).items()}
        options.out.write_text(json.dumps({"plain_tokens_per_second": plain, "rows": results, "settings": settings},
                                          indent=2))
    if not all(r["lossless"] for r in results.values()):
        raise SystemExit("a row's output differs from plain greedy decoding: see the lossless column")


if __name__ == "__main__":
    main()
