"""How τ grows with training tokens, from one run's own records (no re-training, no re-decoding):

    python bench/tau_vs_tokens.py runs/eagle3_long/default [--out docs/tau_vs_tokens.png]

The distill stage, run with `distill.select=decoder distill.eval_every=N` (as `+experiment=eagle3_long` does),
decodes its held-out answers' prompts with the lossless decoder every N steps and records τ, the acceptance proxy
and the loss positions scored so far (`distill/meta.json`, summary `acceptance_proxy`). This prints those points as
a table and plots τ against training tokens, with the run's MT-Bench eval (the selected checkpoint and the
training-free rows, `eval/report.json`) as horizontal references when the run has one. The held-out prompts are
the data_gen answers distill held out (short decodes, `distill.select_max_new_tokens`), not MT-Bench, so the
curve shows the trend; the eval's rows are the comparable numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_points(run_dir: Path) -> list[dict]:
    meta = run_dir / "distill" / "meta.json"
    if not meta.is_file():
        sys.exit(f"{meta}: no finished distill stage in {run_dir}")
    points = json.loads(meta.read_text())["summary"].get("acceptance_proxy", [])
    missing = [p["step"] for p in points if "block_efficiency" not in p or "loss_tokens" not in p]
    if not points or missing:
        sys.exit(f"{meta}: the distill stage recorded no held-out τ with token counts at steps {missing or 'any'}; "
                 f"run it with distill.select=decoder distill.eval_every=N (e.g. +experiment=eagle3_long)")
    return points


def eval_rows(run_dir: Path) -> dict[str, float]:
    report = run_dir / "eval" / "report.json"
    if not report.is_file():
        return {}
    drafters = json.loads(report.read_text())["drafters"]
    return {name: row["block_efficiency"] for name, row in drafters.items() if "block_efficiency" in row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: <run_dir>/tau_vs_tokens.png)")
    options = parser.parse_args()
    points, references = load_points(options.run_dir), eval_rows(options.run_dir)
    print("| step | training tokens scored | acceptance proxy | τ on held-out answers (γ from distill) |")
    print("|---|---|---|---|")
    for p in points:
        print(f"| {p['step']} | {p['loss_tokens']:,} | {p['proxy']:.3f} | {p['block_efficiency']:.3f} |")
    if references:
        print("\nMT-Bench eval of this run: " + ", ".join(f"{k} τ {v:.3f}" for k, v in references.items()))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    axis.plot([p["loss_tokens"] for p in points], [p["block_efficiency"] for p in points], "o-",
              label="trained drafter, held-out answers")
    for (name, tau), style in zip(sorted(references.items(), key=lambda item: -item[1]), ["--", ":", "-.", "--"] * 4):
        axis.axhline(tau, linestyle=style, linewidth=1, color="grey")
        axis.annotate(f"{name} (MT-Bench) {tau:.2f}", (0, tau), fontsize=7, va="bottom")
    axis.set_xlabel("training tokens scored")
    axis.set_ylabel("τ (block efficiency)")
    axis.set_title(f"τ against training tokens: {options.run_dir}")
    axis.legend(loc="lower right", fontsize=8)
    out = options.out or options.run_dir / "tau_vs_tokens.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    print(f"\nplot: {out}")


if __name__ == "__main__":
    main()
