"""Loss ablation on the real target: one data_gen output, one pretrained drafter, one distillation per loss with
the same steps and learning rate, then one eval run comparing them all on held-out MT-Bench prompts.

    python bench/loss_ablation.py                       # quickstart settings, losses ce fkl rkl jsd tvd tvdpp
    python bench/loss_ablation.py --losses fkl tvdpp --eval-prompts 8 -- distill.epochs=5

Every stage is the pipeline's own (`train/run.py`); this script only copies the shared inputs into one run folder
per loss so that each distillation starts from identical data and weights. Results: the eval stage's
`runs/<experiment>/ablation_eval/eval/report.md`, printed at the end.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.pipeline import run  # noqa: E402

LOSSES = ["ce", "fkl", "rkl", "jsd", "tvd", "tvdpp"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="quickstart")
    parser.add_argument("--losses", nargs="+", default=LOSSES)
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--runs-root", default="runs")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every distillation (after --)")
    options = parser.parse_args()
    common = [f"+experiment={options.experiment}", f"runs_root={options.runs_root}"]
    root = REPO_ROOT / options.runs_root / options.experiment
    run([*common, "run_name=ablation_base", "stages=[data_gen,pretrain]"])
    drafters = {"pretrained": root / "ablation_base" / "pretrain" / "model"}
    for loss in options.losses:
        name = f"ablation_{loss}"
        for stage in ("data_gen", "pretrain"):
            if not (root / name / stage).exists():
                shutil.copytree(root / "ablation_base" / stage, root / name / stage)
        run([*common, f"run_name={name}", "stages=[distill]", f"loss={loss}", *options.overrides])
        drafters[loss] = root / name / "distill" / "model"
    run([*common, "run_name=ablation_eval", "stages=[eval]", f"eval_data.limit={options.eval_prompts}",
         "eval.include_untrained=false", *[f"+eval.drafters.{name}={path}" for name, path in drafters.items()]])
    print((root / "ablation_eval" / "eval" / "report.md").read_text())
    for loss in options.losses:
        summary = json.loads((root / f"ablation_{loss}" / "distill" / "meta.json").read_text())["summary"]
        print(f"{loss}: best acceptance proxy {summary['best_acceptance_proxy']} at step {summary['best_step']} "
              f"of {summary['steps']}, final loss {summary['final_loss']}, {summary['seconds']} s")


if __name__ == "__main__":
    main()
