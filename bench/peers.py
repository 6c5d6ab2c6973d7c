"""Our trainer beside the peers' EAGLE-3 trainers: the same target, training rows, draft vocabulary, aux layers and
epochs, each drafter decoded by our eval and served by vLLM.

    bench/peer_trainers/setup && python bench/peers.py [--epochs 3] [--run-name peers] [--no-vllm]
    python bench/peers.py --run-name trial --epochs 1 --override data.limit=64 distill.corpus_records=24
    python bench/peers.py --arm norms '+drafter.norm_before_fc=true +drafter.norm_before_residual=true
        +drafter.norm_output=true' --arm muon '+distill.optim.name=muon'

1. ours: `train/run.py +experiment=quickstart` data_gen, then distill with the held-out τ of our lossless decoder
   recorded at every epoch's end (`distill.select=decoder`, the checkpoint with the best one becomes the drafter);
2. speculators 0.9.0 (.venv-peers/speculators): the same training and held-out rows, the target's features in its
   format, our draft vocabulary and layers (bench/peer_trainers/speculators_io.py), the same number of epochs, its own
   loss, optimizer (its default: Muon over the weight matrices, AdamW over the rest), schedule and packing;
3. ModelOpt 0.47.0 (.venv-peers/modelopt), offline: the same rows and features in its .pt layout, our draft
   vocabulary and layers, its draft layer in our drafter's shape, our batch, learning rate, warm-up and epochs, its
   own loss (soft targets over the draft vocabulary, 0.9 decay over 3 TTT steps), AdamW and linear schedule, its
   padding collator (bench/peer_trainers/modelopt_io.py). Its export names the layers it hooked by output and a YaRN
   rope it did not train with: our eval decodes a copy describing what it trained (`modelopt_io.as_trained`), vLLM
   serves that copy and the export as written (the served-against-trained row);
   every peer's every epoch decoded by the same decoder on the same held-out prompts, each side keeping its best;
4. `--arm NAME 'OVERRIDES'` (repeatable): our trainer again with one of a peer's choices (e.g. speculators'
   Eagle-3.1 norms), the same records, feature cache and budget, in run `<run-name>-NAME`;
5. every drafter through our MT-Bench eval (one table with the training-free rows), then, where .venv-vllm exists,
   served by vLLM (`eval.serving_check`: acceptance per position beside ours; `bench/vllm_spec.py`: tokens/s at
   batch 1 against vLLM plain and vLLM's own `method: ngram`).
Writes `<runs>/peers/<run-name>/peers.{json,md}` and `tau_vs_tokens.png`; prints the table. Training seconds are
the training steps alone (ours: distill's clock less its held-out evaluations; speculators: its logged step times;
ModelOpt: the driver's per-step clock), tokens the positions each loss scored at its first step; peak memory is
the whole trainer process's (`/usr/bin/time`). SpecForge is not run (bench/README.md says what blocks it).
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
MODELOPT_PYTHON = REPO / ".venv-peers" / "modelopt" / "bin" / "python"
PEER_PYTHON = {"speculators": SPECULATORS_PYTHON, "modelopt": MODELOPT_PYTHON}


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


def decoded_points(folders: list[Path], tokens: list[int], target, heldout, distill, stop_ids) -> list[dict]:
    """Each checkpoint folder (an engine's EAGLE-3 layout) read as vLLM reads it and decoded by our decoder on the
    held-out prompts: τ at the tokens it had scored."""
    from models import eagle3_export
    from models.feature_drafter import FeatureDraft
    from train.distill import decoder_block_efficiency

    return [{"tokens": scored, "checkpoint": str(folder),
             "tau": round(decoder_block_efficiency(
                 FeatureDraft(eagle3_export.read_folder(folder, target.model), target.model), target.model, heldout,
                 distill, stop_ids), 6)}
            for folder, scored in zip(folders, tokens)]


def best_point(points: list[dict]) -> str:
    """The checkpoint with the best held-out τ (each side keeps its best, as distill.select=decoder does ours)."""
    return max(points, key=lambda p: p["tau"])["checkpoint"]


def train_speculators(options, work: Path, log: Path, target, train_rows, heldout, distill, drafter,
                      stop_ids) -> dict:
    """speculators 0.9.0 on our rows (its own loss, Muon + AdamW optimizer, schedule and packing), every epoch
    decoded."""
    from bench.peer_trainers import speculators_io as speculators

    inputs = speculators.write_inputs(target.model, train_rows, heldout, drafter.spec.feature_layers,
                                      drafter.head.d2t, distill.max_seq_len, work,
                                      every_position=distill.train_on == "all")
    save, metrics = work / "checkpoints", work / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    peer = timed_run(speculators.command(SPECULATORS_PYTHON, target.path, inputs, save, options.epochs,
                                         distill.optim.lr, options.total_seq_len),
                     log, env=dict(os.environ, SPEC_METRICS_JSONL=str(metrics)))
    logged = [m for m in speculators.read_metrics(metrics) if "profile" in m]
    folders = speculators.epoch_checkpoints(save)
    peer |= {"version": speculators.PEER, "scored_tokens": inputs["scored_per_epoch"] * options.epochs,
             "train_seconds": round(sum(m["profile"]["step_ms"] for m in logged) / 1000, 1),
             "cpu_changes": list(speculators.CPU_CHANGES),
             "points": decoded_points(folders, [inputs["scored_per_epoch"] * (i + 1) for i in range(len(folders))],
                                      target, heldout, distill, stop_ids)}
    peer["checkpoint"] = best_point(peer["points"])
    own = json.loads((Path(peer["checkpoint"]) / "val_metrics.json").read_text())  # its validation, held-out rows
    peer["own_validation_accuracy"] = [own[f"full_acc_{k}_epoch"] for k in range(3) if f"full_acc_{k}_epoch" in own]
    return peer


def train_modelopt(options, work: Path, log: Path, target, train_rows, heldout, distill, drafter, stop_ids) -> dict:
    """ModelOpt 0.47.0's offline EAGLE-3 training on our rows and features (its loss, AdamW, linear schedule and
    padding collator), at our batch, learning rate and warm-up, its draft layer in our drafter's shape; every
    epoch's export decoded. Its export names the aux layers by output and a YaRN rope it did not train with
    (modelopt_io.EXPORT_DEFECTS): our eval decodes a copy with the trained layers and rope (`checkpoint`), vLLM
    serves that copy and the export as written (`as_exported`)."""
    from bench.peer_trainers import modelopt_io as modelopt

    inputs = modelopt.write_inputs(target.model, target.path, train_rows, heldout, drafter.spec.feature_layers,
                                   drafter.head.d2t, distill.max_seq_len, work,
                                   every_position=distill.train_on == "all")
    layer = drafter.layer_config
    shape = {"intermediate_size": layer.intermediate_size, "num_attention_heads": layer.num_attention_heads,
             "num_key_value_heads": layer.num_key_value_heads, "head_dim": layer.head_dim}
    save = work / "checkpoints"
    peer = timed_run(modelopt.command(MODELOPT_PYTHON, work / "inputs.json", save, options.epochs, distill.optim.lr,
                                      distill.batch_size, distill.optim.warmup_steps, shape), log)
    steps = modelopt.read_steps(save)
    exports = modelopt.epoch_exports(save)
    fixed = [modelopt.as_trained(folder) for folder in exports]
    per_epoch = steps["scored_tokens"] / max(len(exports), 1)
    peer |= {"version": modelopt.PEER, "scored_tokens": steps["scored_tokens"],
             "train_seconds": steps["train_seconds"], "cpu_changes": list(modelopt.CPU_CHANGES),
             "export_defects": list(modelopt.EXPORT_DEFECTS),
             "points": decoded_points(fixed, [round(per_epoch * (i + 1)) for i in range(len(fixed))],
                                      target, heldout, distill, stop_ids)}
    peer["checkpoint"] = best_point(peer["points"])
    best_export = exports[fixed.index(Path(peer["checkpoint"]))]
    peer["as_exported"] = str(best_export)
    peer["own_validation_accuracy"] = json.loads((best_export / "heldout_acc.json").read_text())["per_ttt_step"]
    return peer


PEERS = {"speculators": train_speculators, "modelopt": train_modelopt}


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
    parser.add_argument("--peers", nargs="*", default=["speculators", "modelopt"], choices=["speculators", "modelopt"],
                        help="the peers' trainers to run beside ours (default: both)")
    parser.add_argument("--override", nargs="*", default=[],
                        help="Hydra overrides for every run of ours, e.g. data.limit=64 (a smaller trial)")
    options = parser.parse_args()
    for name in options.peers:
        if not PEER_PYTHON[name].exists():
            sys.exit(f"[peers] no {PEER_PYTHON[name]}: run bench/peer_trainers/setup {name} first")
    from hydra.utils import instantiate

    from data_gen.chat import end_of_turn_ids
    from models.feature_drafter import load_feature_drafter
    from models.loading import load_target
    from train.core.rows import corpus_rows, distill_rows

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
    shared = {"target": target, "train_rows": train_rows, "heldout": heldout, "distill": distill, "drafter": drafter,
              "stop_ids": end_of_turn_ids(target.tokenizer, target.model.generation_config)}
    for name in options.peers:
        done = out / name / "result.json"  # a finished peer run is reused (a rerun redoes only what is missing)
        if done.exists() and json.loads(done.read_text()).get("epochs") == options.epochs:
            print(f"[peers] {name}: reusing {done}", flush=True)
            results["trainers"][name] = json.loads(done.read_text())["result"]
            continue
        print(f"[peers] {name}: the same rows, {options.epochs} epochs", flush=True)
        results["trainers"][name] = PEERS[name](options, out / name, out / f"{name}.log", **shared)
        done.write_text(json.dumps({"epochs": options.epochs, "result": results["trainers"][name]}, indent=2))
    del target

    print("[peers] eval: every trainer's drafter and the training-free rows on the eval prompts", flush=True)
    rows = [f"+eval.drafters.{name}={results['trainers'][name]['checkpoint']}"
            for name in [*(arm for arm, _ in options.arm), *options.peers]]
    timed_run(ours_command(options, "[data_gen,distill,eval,export]", f"distill.eval_every={steps_per_epoch}",
                           *rows), out / "eval.log")
    report_path = run_dir / "eval" / "report.json"
    report = json.loads(report_path.read_text())
    results["eval"] = {name: {k: row.get(k) for k in ("block_efficiency", "accepted_per_position", "speedup_median")}
                       for name, row in report["drafters"].items()}
    if not options.no_vllm and VLLM_PYTHON.exists():
        export = run_dir / "export" / "drafter-eagle3"
        exported = json.loads((export.parent / "meta.json").read_text())["summary"]["drafter"]  # the eval's best row
        # label -> (folder, the eval row it is compared with): ours, each peer's drafter as our eval decoded it, and
        # where a peer's own export differs from what it trained (item 4), that export as the peer wrote it
        served_dirs = {"draftsmith" if exported == "distilled" else exported: (export, exported)}
        for name in options.peers:
            row = results["trainers"][name]
            served_dirs[name] = (Path(row["checkpoint"]), name)
            if row.get("as_exported"):
                served_dirs[f"{name} (as exported)"] = (Path(row["as_exported"]), name)
        print(f"[peers] vLLM: acceptance of {', '.join(served_dirs)} and vLLM's ngram", flush=True)
        timed_run([str(VLLM_PYTHON), "-m", "eval.serving_check", *(f"{d}={r}" for d, r in served_dirs.values()),
                   "--report", str(report_path), "--ngram"], out / "serving_check.log")
        served_dirs["vllm-ngram"] = (report_path.parent / "vllm-ngram", None)
        results["served"] = {}
        for label, (folder, _) in served_dirs.items():
            r = json.loads((folder.parent / f"{folder.name}.serving_check.json").read_text())
            results["served"][label] = {"mean_acceptance_length": r["vllm"]["mean_acceptance_length"],
                                        "accepted_per_position": r["vllm"]["accepted_per_position"],
                                        "lossless": r["lossless"]}
        print("[peers] vLLM: tokens/s at batch 1", flush=True)
        timed_run([str(VLLM_PYTHON), "bench/vllm_spec.py", f"{export}={exported}",
                   *(f"{results['trainers'][name]['checkpoint']}={name}" for name in options.peers), "--ngram",
                   "--report", str(report_path), "--batch", "1", "--repeats", "2",
                   "--json", str(out / "vllm_batch1.json")], out / "vllm_spec.log")
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
        served = results.get("served", {}).get(trainer, {})
        lines.append(
            f"| {trainer} | {row['scored_tokens']:,} | {row['train_seconds']:.0f} | "
            f"{row['scored_tokens'] / max(row['train_seconds'], 1e-9):.0f} | {row['peak_mib']} | "
            f"{joined([p['tau'] for p in row['points']], 3)} | {evaluated.get('block_efficiency', float('nan')):.3f} | "
            f"{joined(evaluated.get('accepted_per_position'))} | "
            f"{evaluated.get('speedup_median', float('nan')):.2f}× | "
            f"{served.get('mean_acceptance_length', float('nan')):.3f} | "
            f"{joined(served.get('accepted_per_position'))} |")
    for label, served in results.get("served", {}).items():  # a peer's export as it wrote it: served, not trained
        if label not in results["trainers"] and label != "vllm-ngram":
            lines.append(f"| {label} | | | | | | | | | {served['mean_acceptance_length']:.3f} | "
                         f"{joined(served['accepted_per_position'])} |")
    ngram = results.get("served", {}).get("vllm-ngram")
    if ngram:
        lines += ["", f"vLLM's own `method: ngram` (training-free) on the same prompts: mean acceptance length "
                      f"{ngram['mean_acceptance_length']:.3f}, per position {joined(ngram['accepted_per_position'])}."]
    own = {name: row["own_validation_accuracy"] for name, row in results["trainers"].items()
           if row.get("own_validation_accuracy")}
    if own:
        lines += ["", "Each peer's own held-out accuracy per TTT step (teacher-forced top-1 on the held-out rows; "
                      "speculators' with every earlier step right), against the acceptance per position above: "
                  + "; ".join(f"{name} {joined(values)}" for name, values in own.items()) + "."]
    for name, row in results["trainers"].items():
        for heading, key in (("run-time changes", "cpu_changes"), ("export defects left as written", "export_defects")):
            if row.get(key):
                lines += ["", f"{name} ({row.get('version', '')}) {heading}:", ""] + [f"- {item}" for item in row[key]]
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
