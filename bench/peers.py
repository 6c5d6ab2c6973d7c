"""Our trainer beside the peers' EAGLE-3 trainers: the same target, training rows, draft vocabulary, aux layers and
epochs, each drafter decoded by our eval and served by vLLM.

    bench/peer_trainers/setup && python bench/peers.py [--epochs 3] [--run-name peers] [--no-vllm]
    python bench/peers.py --run-name trial --epochs 1 --override data.limit=48 distill.corpus_records=24

1. ours: `train/run.py +experiment=quickstart` data_gen, then distill with the held-out τ of our lossless decoder
   recorded at every epoch's end (`distill.select=decoder`, the checkpoint with the best one becomes the drafter);
2. speculators 0.9.0 (.venv-peers/speculators): the same training and held-out rows, the target's features in its
   format, our draft vocabulary and layers (bench/peer_trainers/speculators_io.py), the same number of epochs, its own
   loss, optimizer (Muon), schedule and packing; every epoch's checkpoint decoded by the same decoder on the same
   held-out prompts, the best one kept, as ours;
3. both drafters through our MT-Bench eval (one table with the training-free rows), then, where .venv-vllm exists,
   served by vLLM (`eval.serving_check`: acceptance per position beside ours; `bench/vllm_spec.py`: tokens/s at
   batch 1 against vLLM plain and vLLM's own `method: ngram`).
Writes `<runs>/peers/<run-name>/peers.{json,md}` and `tau_vs_tokens.png`; prints the table. Training seconds and
peak memory are each trainer's own process (`/usr/bin/time`), tokens are the positions each loss scored.
ModelOpt and SpecForge are not run yet (bench/README.md says why and what they need).
"""
from __future__ import annotations

import argparse
import json
import math
import os
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


def ours_command(options, stages: str, *extra: str) -> list[str]:
    return [sys.executable, "train/run.py", f"+experiment={options.experiment}", f"run_name={options.run_name}",
            f"runs_root={options.runs_root}", "logger=none", f"stages={stages}", f"distill.epochs={options.epochs}",
            "distill.select=decoder", *options.override, *extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="quickstart")
    parser.add_argument("--run-name", default="peers")
    parser.add_argument("--runs-root", type=Path, default=REPO / "runs")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--total-seq-len", type=int, default=1024, help="speculators' packed row (tokens a step)")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM serving rows")
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
    reused = (run_dir / "distill" / "meta.json").exists()  # a finished distill is reused: nothing to time then
    ours = timed_run(ours_command(options, "[data_gen,distill]", f"distill.eval_every={steps_per_epoch}"),
                     out / "ours.log")
    summary = json.loads((run_dir / "distill" / "meta.json").read_text())["summary"]
    if reused:
        ours["peak_mib"] = None
    ours |= {"scored_tokens": summary["loss_tokens_this_run"], "train_seconds": summary["seconds"],
             "points": [{"tokens": p["loss_tokens"], "tau": p["block_efficiency"]}
                        for p in summary["acceptance_proxy"] if p["step"] > 0], "checkpoint": str(run_dir / "distill" /
                                                                                                    "model")}
    results["trainers"]["draftsmith"] = ours

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
    results["trainers"]["speculators"] = peer
    del target

    print("[peers] eval: both drafters and the training-free rows on the eval prompts", flush=True)
    timed_run(ours_command(options, "[data_gen,distill,eval,export]", f"distill.eval_every={steps_per_epoch}",
                           f"+eval.drafters.speculators={peer['checkpoint']}"), out / "eval.log")
    report_path = run_dir / "eval" / "report.json"
    report = json.loads(report_path.read_text())
    results["eval"] = {name: {k: row.get(k) for k in ("block_efficiency", "accepted_per_position", "speedup_median")}
                       for name, row in report["drafters"].items()}
    if not options.no_vllm and VLLM_PYTHON.exists():
        export = run_dir / "export" / "drafter-eagle3"
        spec_dir = Path(peer["checkpoint"])
        print("[peers] vLLM: acceptance of both exports and vLLM's ngram", flush=True)
        timed_run([str(VLLM_PYTHON), "-m", "eval.serving_check", str(export), f"{spec_dir}=speculators",
                   "--report", str(report_path), "--ngram"], out / "serving_check.log")
        served = [json.loads((d.parent / f"{d.name}.serving_check.json").read_text())
                  for d in (export, spec_dir, report_path.parent / "vllm-ngram")]
        results["served"] = {r["drafter"]: {"mean_acceptance_length": r["vllm"]["mean_acceptance_length"],
                                            "accepted_per_position": r["vllm"]["accepted_per_position"],
                                            "lossless": r["lossless"]} for r in served}
        print("[peers] vLLM: tokens/s at batch 1", flush=True)
        timed_run([str(VLLM_PYTHON), "bench/vllm_spec.py", str(export), str(spec_dir), "--ngram", "--report",
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
    rows = {"draftsmith": "distilled", "speculators": "speculators"}
    for trainer, row in results["trainers"].items():
        evaluated = results.get("eval", {}).get(rows[trainer], {})
        served = results.get("served", {}).get(rows[trainer], {})
        lines.append(
            f"| {trainer} | {row['scored_tokens']:,} | {row['train_seconds']:.0f} | "
            f"{row['scored_tokens'] / max(row['train_seconds'], 1e-9):.0f} | {row['peak_mib']} | "
            f"{joined([p['tau'] for p in row['points']], 3)} | {evaluated.get('block_efficiency', float('nan')):.3f} | "
            f"{joined(evaluated.get('accepted_per_position'))} | "
            f"{evaluated.get('speedup_median', float('nan')):.2f}× | "
            f"{served.get('mean_acceptance_length', float('nan')):.3f} | "
            f"{joined(served.get('accepted_per_position'))} |")
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
