"""Loss ablation on the real target: one data_gen output, one distillation per loss and seed with the same steps and
learning rate, then one greedy and one sampled (T = 1) eval run comparing them all on held-out MT-Bench prompts,
and the spread between losses set against the spread between seeds of the same loss.

    python bench/loss_ablation.py               # EAGLE-3 drafter; losses ce fkl rkl jsd tvd tvdpp; seeds 0 1
    python bench/loss_ablation.py --kind standalone --losses fkl tvdpp --seeds 0 -- distill.epochs=5

Every stage is the pipeline's own (`train/run.py`); this script only copies the shared inputs into one run folder
per loss and seed so that each distillation starts from identical data (and, for the standalone kind, identical
pretrained weights: pretraining runs once, with the first seed). Feature drafters share one feature cache
(`distill.feature_cache_dir`), so the target's prefill runs once. Results: the eval stage's reports
`runs/<experiment>/ablation_eval_{greedy,sampled}/eval/report.md` and a summary table, printed at the end.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.pipeline import run  # noqa: E402
from bench.recipes import RECIPES  # noqa: E402

LOSSES = ["ce", "fkl", "rkl", "jsd", "tvd", "tvdpp"]
# kind -> (stages made once and shared, overrides of every distillation, how a loss is chosen)
KINDS = {
    "standalone": (["data_gen", "pretrain"], [], "loss={loss}"),
    "eagle3": (["data_gen"], RECIPES["eagle3"][1], "loss@loss.token={loss}"),  # the token loss of the unrolled steps
}
MODES = {"greedy": [], "sampled": ["eval=sampled", "eval.baselines=[]"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="standalone",
                        help="the base experiment every recipe overrides (data, data_gen and eval settings)")
    parser.add_argument("--kind", default="eagle3", choices=list(KINDS))
    parser.add_argument("--losses", nargs="+", default=LOSSES, choices=LOSSES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--eval-prompts", type=int, default=8)
    parser.add_argument("--turns", type=int, default=1, help="MT-Bench turns decoded per conversation")
    parser.add_argument("--runs-root", default="runs")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every distillation (after --)")
    options = parser.parse_args()
    shared_stages, kind_overrides, choose_loss = KINDS[options.kind]
    common = [f"+experiment={options.experiment}", f"runs_root={options.runs_root}", "logger=none"]
    root = REPO_ROOT / options.runs_root / options.experiment
    base = f"ablation_{options.kind}_base"
    run([*common, f"run_name={base}", f"stages=[{','.join(shared_stages)}]", f"seed={options.seeds[0]}"])
    if options.kind != "standalone":
        kind_overrides = [*kind_overrides, f"distill.feature_cache_dir={root / 'ablation_features'}"]
    drafters = {} if options.kind != "standalone" else {"pretrained": root / base / "pretrain" / "model"}
    for loss in options.losses:
        for seed in options.seeds:
            name = f"ablation_{options.kind}_{loss}_s{seed}"
            for stage in shared_stages:
                if not (root / name / stage).exists():
                    shutil.copytree(root / base / stage, root / name / stage)
            run([*common, f"run_name={name}", "stages=[distill]", f"seed={seed}", *kind_overrides,
                 choose_loss.format(loss=loss), *options.overrides])
            drafters[f"{loss}_s{seed}"] = root / name / "distill" / "model"
    reports = {}
    for mode, mode_overrides in MODES.items():
        name = f"ablation_{options.kind}_eval_{mode}"
        if not (root / name / "data_gen").exists():  # the n-gram baseline's table comes from it
            shutil.copytree(root / base / "data_gen", root / name / "data_gen")
        run([*common, f"run_name={name}", "stages=[eval]", f"eval_data.limit={options.eval_prompts}",
             f"eval.turns={options.turns}", "eval.decode.gamma=3", "eval.include_untrained=false", *mode_overrides,
             *[f"+eval.drafters.{label}={path}" for label, path in drafters.items()]])
        print((root / name / "eval" / "report.md").read_text())
        reports[mode] = json.loads((root / name / "eval" / "report.json").read_text())["drafters"]
    print(summary(options, root, reports))


def summary(options, root: Path, reports: dict) -> str:
    """Per loss: τ (greedy, sampled) and the held-out acceptance proxy for each seed; then the spread between the
    losses' means beside the spread between seeds (noise)."""
    lines = ["| loss | seed | τ greedy | accepted per position (greedy) | τ sampled (T=1) | "
             "accepted per position (sampled) | acceptance proxy | distill s |", "|---|---|---|---|---|---|---|---|"]
    means, noise = {mode: {} for mode in MODES}, {mode: [] for mode in MODES}
    for loss in options.losses:
        for mode in MODES:
            taus = [reports[mode][f"{loss}_s{seed}"]["block_efficiency"] for seed in options.seeds]
            means[mode][loss] = statistics.mean(taus)
            noise[mode].append(max(taus) - min(taus))
        for seed in options.seeds:
            greedy, sampled = (reports[mode][f"{loss}_s{seed}"] for mode in MODES)
            meta = json.loads((root / f"ablation_{options.kind}_{loss}_s{seed}" / "distill" / "meta.json").read_text())
            distill = meta["summary"]
            seconds = distill["seconds"] + distill.get("prepare_seconds", 0.0)  # with a feature prefill, if it ran
            positions = ["/".join(f"{a:.2f}" for a in row["accepted_per_position"]) for row in (greedy, sampled)]
            lines.append(f"| {loss} | {seed} | {greedy['block_efficiency']:.3f} | {positions[0]} | "
                         f"{sampled['block_efficiency']:.3f} | {positions[1]} | "
                         f"{distill['best_acceptance_proxy']:.3f} | {seconds:.0f} |")
    for mode in MODES:
        ranked = sorted(means[mode], key=means[mode].get, reverse=True)
        spread = means[mode][ranked[0]] - means[mode][ranked[-1]]
        lines.append(f"\n{mode}: mean τ over seeds " + ", ".join(f"{loss} {means[mode][loss]:.3f}" for loss in ranked)
                     + f"; spread between losses {spread:.3f}, between seeds of one loss (largest) "
                       f"{max(noise[mode]):.3f}, (mean) {statistics.mean(noise[mode]):.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
