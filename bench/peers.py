"""Our trainer beside the peers' EAGLE-3 trainers: the same target, training rows, draft vocabulary, aux layers and
epochs, each drafter decoded by our eval and served by vLLM.

    bench/peer_trainers/setup && python bench/peers.py [--epochs 3] [--run-name peers] [--no-vllm]
    python bench/peers.py --run-name trial --epochs 1 --override data.limit=48 distill.corpus_records=24
    python bench/peers.py --arm norms 'drafter.norm_before_fc=true drafter.norm_before_residual=true
        drafter.norm_output=true'

1. ours: `train/run.py +experiment=quickstart` data_gen, then distill with the held-out τ of our lossless decoder
   recorded at every epoch's end (`distill.select=decoder`, the checkpoint with the best one becomes the drafter);
2. speculators 0.9.0 (.venv-peers/speculators): the same training and held-out rows, the target's features in its
   format, our draft vocabulary and layers (bench/peer_trainers/speculators_io.py), the same number of epochs, its own
   loss, optimizer (Muon), schedule and packing; every epoch's checkpoint decoded by the same decoder on the same
   held-out prompts, the best one kept, as ours;
3. `--arm NAME 'OVERRIDES'` (repeatable): our trainer again with one of a peer's choices (e.g. speculators'
   Eagle-3.1 norms), the same records, feature cache and budget, in run `<run-name>-NAME`;
4. every drafter through our MT-Bench eval (one table with the training-free rows), then, where .venv-vllm exists,
   ours and speculators' served by vLLM (`eval.serving_check`: acceptance per position beside ours;
   `bench/vllm_spec.py`: tokens/s at batch 1 against vLLM plain and vLLM's own `method: ngram`).
Writes `<runs>/peers/<run-name>/peers.{json,md}` and `tau_vs_tokens.png`; prints the table. Training seconds are
the training steps alone (ours: distill's clock less its held-out evaluations; speculators: its logged step times),
tokens the positions each loss scored at its first step; peak memory is the whole trainer process's (`/usr/bin/time`).
ModelOpt and SpecForge are not run yet (bench/README.md says why and what they need).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
SPECULATORS_PYTHON = REPO / ".venv-peers" / "speculators" / "bin" / "python"


def timed_run(command: list[str], log: Path, env: dict | None = None) -> dict:
    """Run `command` (its output into `log`); its wall seconds and peak resident memory (MiB)."""
    usage = log.with_suffix(".rss")
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(usage), *command], cwd=REPO, stdout=out,
                              stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"[peers] {' '.join(command[:4])} ... failed (exit {done.returncode}); see {log}:\n"
                 + "\n".join(log.read_text().splitlines()[-25:]))
    return {"seconds": round(seconds, 1), "peak_mib": round(int(usage.read_text().split()[-1]) / 1024)}


def ours_command(options, stages: str, *extra: str, run_name: str | None = None) -> list[str]:
    """train/run.py for one of our runs; every run of the bench shares one feature cache (the same rows, layers and
    target, so one prefill)."""
    features = options.runs_root / "peers" / options.run_name / "features"
    return [sys.executable, "train/run.py", f"+experiment={options.experiment}",
            f"run_name={run_name or options.run_name}", f"runs_root={options.runs_root}", "logger=none",
            f"stages={stages}", f"distill.epochs={options.epochs}", "distill.select=decoder",
            f"distill.feature_cache_dir={features}", *options.override, *extra]


def train_ours(options, run_name: str, steps_per_epoch: int, log: Path, *arm: str) -> dict:
    """Our distill stage on the shared data_gen records; its timing, scored tokens and held-out τ per epoch."""
    run_dir = options.runs_root / options.experiment / run_name
    reused = (run_dir / "distill" / "meta.json").exists()  # a finished distill is reused: nothing to time then
    timing = timed_run(ours_command(options, "[data_gen,distill]", f"distill.eval_every={steps_per_epoch}", *arm,
                                    run_name=run_name), log)
    summary = json.loads((run_dir / "distill" / "meta.json").read_text())["summary"]
    return timing | {
        "peak_mib": None if reused else timing["peak_mib"], "overrides": list(arm),
        "scored_tokens": summary["loss_tokens_this_run"],
        "train_seconds": round(summary["seconds"] - summary.get("evaluation_seconds", 0.0), 1),  # steps only
        "points": [{"tokens": p["loss_tokens"], "tau": p["block_efficiency"]}
                   for p in summary["acceptance_proxy"] if p["step"] > 0],
        "checkpoint": str(run_dir / "distill" / "model")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="quickstart")
    parser.add_argument("--run-name", default="peers")
    parser.add_argument("--runs-root", type=Path, default=REPO / "runs")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--total-seq-len", type=int, default=1024, help="speculators' packed row (tokens a step)")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM serving rows")
    parser.add_argument("--arm", nargs=2, action="append", default=[], metavar=("NAME", "OVERRIDES"),
                        help="also our trainer with these overrides (space-separated, quoted), e.g. --arm norms "
                             "'drafter.norm_before_fc=true drafter.norm_output=true'")
    parser.add_argument("--override", nargs="*", default=[],
                        help="Hydra overrides for every run of ours, e.g. data.limit=64 (a smaller trial)")
    options = parser.parse_args()
    if not SPECULATORS_PYTHON.exists():
        sys.exit(f"[peers] no {SPECULATORS_PYTHON}: run bench/peer_trainers/setup first")
    from hydra.utils import instantiate

    from bench.peer_trainers import speculators_io as speculators
    from data_gen.chat import end_of_turn_ids
    from models import eagle3_export
    from models.feature_drafter import FeatureDraft, load_feature_drafter
    from models.loading import load_target
    from train.distill import corpus_rows, decoder_block_efficiency, distill_rows

    run_dir = options.runs_root / options.experiment / options.run_name
    out = options.runs_root / "peers" / options.run_name
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"epochs": options.epochs, "experiment": options.experiment, "trainers": {}}

    print("[peers] data_gen (ours, shared by every trainer)", flush=True)
    timed_run(ours_command(options, "[data_gen]"), out / "data_gen.log")
    config = json.loads((run_dir / "data_gen" / "meta.json").read_text())["config"]
    distill = instantiate(config["distill"], _convert_="all")
    target = load_target(instantiate(config["target"], _convert_="all"), Path(config["cache_dir"]))
    extra = corpus_rows(target.tokenizer, instantiate(config["corpus"], _convert_="all"), Path(config["cache_dir"]),
                        distill.corpus_records, distill.max_seq_len)[0] if distill.corpus_records else []
    train_rows, heldout = distill_rows(run_dir / "data_gen", distill.teacher, distill.heldout_records, extra)
    steps_per_epoch = math.ceil(len(train_rows) / distill.batch_size)

    print(f"[peers] ours: {len(train_rows)} training rows, {options.epochs} epochs", flush=True)
    results["trainers"]["draftsmith"] = train_ours(options, options.run_name, steps_per_epoch, out / "ours.log")
    for name, overrides in options.arm:  # our trainer with one of a peer's choices, on the same budget
        arm_run = f"{options.run_name}-{name}"
        arm_data = options.runs_root / options.experiment / arm_run / "data_gen"
        if not arm_data.exists():
            shutil.copytree(run_dir / "data_gen", arm_data)  # the same records (its fingerprint matches)
        print(f"[peers] ours + {name} ({overrides})", flush=True)
        results["trainers"][name] = train_ours(options, arm_run, steps_per_epoch, out / f"{name}.log",
                                               *overrides.split())

    drafter = load_feature_drafter(run_dir / "distill" / "model", target.model)
    inputs = speculators.write_inputs(target.model, train_rows, heldout, drafter.spec.feature_layers,
                                      drafter.head.d2t, distill.max_seq_len, out / "speculators",
                                      every_position=distill.train_on == "all")
    save = out / "speculators" / "checkpoints"
    metrics = out / "speculators" / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    print(f"[peers] speculators: the same rows, {options.epochs} epochs", flush=True)
    peer = timed_run(speculators.command(SPECULATORS_PYTHON, target.path, inputs, save, options.epochs,
                                         distill.optim.lr, options.total_seq_len),
                     out / "speculators.log", env=dict(os.environ, SPEC_METRICS_JSONL=str(metrics)))
    logged = [m for m in speculators.read_metrics(metrics) if "profile" in m]
    peer |= {"scored_tokens": inputs["scored_per_epoch"] * options.epochs,
             "train_seconds": round(sum(m["profile"]["step_ms"] for m in logged) / 1000, 1),
             "cpu_changes": list(speculators.CPU_CHANGES), "points": []}
    stop_ids = end_of_turn_ids(target.tokenizer, target.model.generation_config)
    best = (float("-inf"), None)
    for epoch, folder in enumerate(speculators.epoch_checkpoints(save), start=1):
        tau = decoder_block_efficiency(FeatureDraft(eagle3_export.read_folder(folder, target.model), target.model),
                                       target.model, heldout, distill, stop_ids)
        peer["points"].append({"tokens": inputs["scored_per_epoch"] * epoch, "tau": round(tau, 6),
                               "checkpoint": str(folder)})
        best = max(best, (tau, str(folder)))
    peer["checkpoint"] = best[1]
    own = json.loads((Path(best[1]) / "val_metrics.json").read_text())  # its own validation on the held-out rows
    peer["own_validation_accuracy"] = [own[f"full_acc_{k}_epoch"] for k in range(3) if f"full_acc_{k}_epoch" in own]
    results["trainers"]["speculators"] = peer
    del target

    print("[peers] eval: both drafters and the training-free rows on the eval prompts", flush=True)
    arms = [f"+eval.drafters.{name}={results['trainers'][name]['checkpoint']}" for name, _ in options.arm]
    timed_run(ours_command(options, "[data_gen,distill,eval,export]", f"distill.eval_every={steps_per_epoch}",
                           f"+eval.drafters.speculators={peer['checkpoint']}", *arms), out / "eval.log")
    report_path = run_dir / "eval" / "report.json"
    report = json.loads(report_path.read_text())
    results["eval"] = {name: {k: row.get(k) for k in ("block_efficiency", "accepted_per_position", "speedup_median")}
                       for name, row in report["drafters"].items()}
    if not options.no_vllm and VLLM_PYTHON.exists():
        export = run_dir / "export" / "drafter-eagle3"
        spec_dir = Path(peer["checkpoint"])
        print("[peers] vLLM: acceptance of our export (the eval's best row of ours), speculators' and vLLM's ngram",
              flush=True)
        timed_run([str(VLLM_PYTHON), "-m", "eval.serving_check", str(export), f"{spec_dir}=speculators",
                   "--report", str(report_path), "--ngram"], out / "serving_check.log")
        served = [json.loads((d.parent / f"{d.name}.serving_check.json").read_text())
                  for d in (export, spec_dir, report_path.parent / "vllm-ngram")]
        results["served"] = {r["drafter"]: {"mean_acceptance_length": r["vllm"]["mean_acceptance_length"],
                                            "accepted_per_position": r["vllm"]["accepted_per_position"],
                                            "lossless": r["lossless"]} for r in served}
        print("[peers] vLLM: tokens/s at batch 1", flush=True)
        exported = json.loads((export.parent / "meta.json").read_text())["summary"]["drafter"]  # the eval's best row
        timed_run([str(VLLM_PYTHON), "bench/vllm_spec.py", f"{export}={exported}", f"{spec_dir}=speculators",
                   "--ngram", "--report",
                   str(report_path), "--batch", "1", "--repeats", "2", "--json", str(out / "vllm_batch1.json")],
                  out / "vllm_spec.log")
        results["vllm_batch1"] = json.loads((out / "vllm_batch1.json").read_text())
    (out / "peers.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (out / "peers.md").write_text(table)
    plot(results, out / "tau_vs_tokens.png")
    print(table)


def joined(values, digits: int = 2) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values or [])


def markdown(results: dict) -> str:
    lines = ["| trainer | scored tokens | train s | tokens/s | peak MiB | held-out τ per epoch | eval τ | "
             "accepted per position (ours) | our wall speedup | vLLM mean acceptance length | vLLM per position |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for trainer, row in results["trainers"].items():
        name = "distilled" if trainer == "draftsmith" else trainer  # the trainer's row in our eval
        evaluated = results.get("eval", {}).get(name, {})
        served = results.get("served", {}).get(name, {})
        lines.append(
            f"| {trainer} | {row['scored_tokens']:,} | {row['train_seconds']:.0f} | "
            f"{row['scored_tokens'] / max(row['train_seconds'], 1e-9):.0f} | {row['peak_mib']} | "
            f"{joined([p['tau'] for p in row['points']], 3)} | {evaluated.get('block_efficiency', float('nan')):.3f} | "
            f"{joined(evaluated.get('accepted_per_position'))} | "
            f"{evaluated.get('speedup_median', float('nan')):.2f}× | "
            f"{served.get('mean_acceptance_length', float('nan')):.3f} | "
            f"{joined(served.get('accepted_per_position'))} |")
    own = results["trainers"].get("speculators", {}).get("own_validation_accuracy")
    if own:
        lines += ["", "speculators' own validation (teacher-forced top-1 on the held-out rows, all earlier steps "
                      f"right): {joined(own)} per step, against the acceptance per position above."]
    if "vllm_batch1" in results:
        lines += ["", "vLLM at batch 1 (tokens/s, × vLLM plain):", ""]
        lines += [f"- {r['side']}: {r['tokens_per_s']:.1f} ({r['speedup']:.2f}×), output == plain: {r['lossless']}"
                  for r in results["vllm_batch1"]["rows"]]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for trainer, row in results["trainers"].items():
        axis.plot([p["tokens"] for p in row["points"]], [p["tau"] for p in row["points"]], marker="o", label=trainer)
    axis.set_xlabel("training tokens scored")
    axis.set_ylabel("τ on held-out prompts (our decoder)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
