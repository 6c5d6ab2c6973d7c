"""Recipe table on the real target: drafter kind × initialisation × loss × training data → τ, acceptance per
position, wall speedup and training time, on the same held-out MT-Bench prompts, the training-free rows included.

    python bench/recipes.py                                  # every recipe below, the quickstart's data and eval
    python bench/recipes.py --recipes standalone eagle3 --corpus-records 400 -- distill.epochs=4

One data_gen output (the experiment's) is shared; each recipe is the pipeline's own stages (`train/run.py`) in a
run folder of its own, with that data copied in, so every drafter learns from identical records. One eval run then
decodes every drafter and the training-free baselines side by side (same prompts, same process, same γ). Printed
at the end: the eval's `report.md` and a training table (tokens scored, seconds, best acceptance proxy).
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

# name -> (stages after data_gen, overrides, what it is: kind / initialisation / loss / data)
RECIPES = {
    "standalone": (["pretrain", "distill"], [],
                   "token 11M / pretrained on ShareGPT, target embeddings / FKL / answers"),
    "eagle": (["distill"], ["drafter=eagle", "loss=eagle"],
              "feature (last layer, target head) / random / SmoothL1 + 0.1·FKL / answers"),
    "eagle3": (["distill"], ["drafter=eagle3", "loss=eagle3", "distill.train_on=all", "distill.feature_cache=true",
                             "distill.batch_size=4", "distill.optim.lr=1e-3"],
               "feature (layers 2,15,27, 8k head) / target head rows / FKL, unroll 3 / all tokens"),
    "eagle3_corpus": (["distill"], ["drafter=eagle3", "loss=eagle3", "distill.train_on=all",
                                    "distill.feature_cache=true", "distill.batch_size=4", "distill.optim.lr=1e-3",
                                    "distill.corpus_records={corpus_records}"],
                      "as eagle3 / + {corpus_records} ShareGPT conversations"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="standalone",
                        help="the base experiment every recipe overrides (data, data_gen and eval settings)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--corpus-records", type=int, default=400)
    parser.add_argument("--eval-prompts", type=int, default=8, help="MT-Bench conversations (both turns decoded)")
    parser.add_argument("--runs-root", default="runs")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every recipe (after --)")
    options = parser.parse_args()
    common = [f"+experiment={options.experiment}", f"runs_root={options.runs_root}", "logger=none"]
    root = REPO_ROOT / options.runs_root / options.experiment
    run([*common, "run_name=recipe_data", "stages=[data_gen]"])
    drafters, rows = {}, []
    for name in options.recipes:
        stages, overrides, what = RECIPES[name]
        overrides = [o.format(corpus_records=options.corpus_records) for o in overrides]
        folder = f"recipe_{name}"
        if not (root / folder / "data_gen").exists():
            shutil.copytree(root / "recipe_data" / "data_gen", root / folder / "data_gen")
        run([*common, f"run_name={folder}", f"stages=[{','.join(stages)}]", *overrides, *options.overrides])
        drafters[name] = root / folder / "distill" / "model"
        summaries = {stage: json.loads((root / folder / stage / "meta.json").read_text())["summary"]
                     for stage in stages}
        seconds = sum(summary.get("seconds", 0.0) + summary.get("prepare_seconds", 0.0)  # the stages' own clocks,
                      for summary in summaries.values())                            # a feature cache's prefill too
        rows.append((name, what.format(corpus_records=options.corpus_records), summaries["distill"], seconds))
    if not (root / "recipe_eval" / "data_gen").exists():  # the n-gram baseline's table comes from it
        shutil.copytree(root / "recipe_data" / "data_gen", root / "recipe_eval" / "data_gen")
    run([*common, "run_name=recipe_eval", "stages=[eval]", f"eval_data.limit={options.eval_prompts}",
         "eval.include_untrained=false", *[f"+eval.drafters.{name}={path}" for name, path in drafters.items()]])
    print((root / "recipe_eval" / "eval" / "report.md").read_text())
    print("| recipe | kind / initialisation / loss / data | tokens scored | training s (its stages' own clocks) | "
          "best acceptance proxy |")
    print("|---|---|---|---|---|")
    for name, what, summary, seconds in rows:
        print(f"| {name} | {what} | {summary['loss_tokens_this_run']:,} | {seconds:.0f} | "
              f"{summary['best_acceptance_proxy']} |")


if __name__ == "__main__":
    main()
