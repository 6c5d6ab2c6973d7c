"""Sweeps (`python train/run.py -m ... loss=fkl,tvdpp`): one run folder per point, one comparison table at the end.

With any Hydra launcher (the basic one, hydra/launcher=local or hydra/launcher=slurm for one SLURM job per point):
- each point runs into `runs/<experiment>/<point>/`, where <point> is its overrides (`loss=fkl`, or
  `distill.epochs=4,loss=jsd`) unless the sweep sets run_name; rerunning the same sweep reuses those folders
  (finished stages are skipped, training resumes);
- each point leaves `point.json` (its overrides, run folder, outcome) in its sweep folder
  `runs/<experiment>/sweeps/<time>/<n>/`;
- a point that is refused (a bad setting: one line) or fails (its traceback) is recorded and the sweep goes on to
  the next, with any launcher;
- when every point has ended, `CompareSweep` (a Hydra callback, registered in conf/config.yaml) prints one table of
  every point with its outcome (done, or refused / failed and why), then every drafter of every point's eval report
  side by side (eval.compare), writes both to `runs/<experiment>/sweeps/<time>/compare.md`, and exits with status 1
  when any point did not succeed (0 when all did).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from eval.compare import combine
from eval.report import markdown_report

POINT_FILE = "point.json"


def sweep_point(config: DictConfig) -> Path | None:
    """In a multirun, name this point's run folder after its overrides (unless run_name is one of them) and return
    the file to record the point in; None in a single run."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra_config = HydraConfig.get()
    if not any(re.match(r"^[+~]{0,2}run_name=", o) for o in hydra_config.overrides.task):
        with open_dict(config):
            config.run_name = point_name(hydra_config.overrides.task) or f"point-{hydra_config.job.num}"
    folder = Path(hydra_config.runtime.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / POINT_FILE


NOT_IN_NAMES = ("experiment", "runs_root", "run_name", "cache_dir", "logger", "cluster", "stages")


def point_name(overrides: list[str]) -> str:
    """`distill.epochs=4,loss=jsd`: the overrides that make a point's results, sorted (where it runs, what it
    logs to and what it is called are left out), as a folder name."""
    kept = sorted(o.lstrip("+~") for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] not in NOT_IN_NAMES)
    return ",".join(kept).replace("/", "_")


def record_point(path: Path | None, config: DictConfig, outcome: str) -> None:
    if path is None:
        return
    run_dir = Path(config.runs_root).resolve() / config.experiment / config.run_name
    path.write_text(json.dumps({"overrides": list(HydraConfig.get().overrides.task), "run_dir": str(run_dir),
                                "outcome": outcome}, indent=1) + "\n")


def read_points(sweep_dir: Path) -> list[dict]:
    """Every point's record in `sweep_dir`, in launch order."""
    files = sorted(sweep_dir.glob(f"*/{POINT_FILE}"),
                   key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return [json.loads(path.read_text()) | {"number": path.parent.name} for path in files]


def compare_points(sweep_dir: Path) -> str:
    """Every point of the sweep in `sweep_dir` as a row (its run folder and outcome: done, or refused / failed and
    why), then the eval reports of the points that made one side by side."""
    points = read_points(sweep_dir)
    done = sum(point["outcome"] == "done" for point in points)
    lines = [f"# Sweep {sweep_dir}: {len(points)} point(s), {done} done", "", "| # | point | outcome |",
             "|---|---|---|"]
    reports, unreadable = [], []
    for point in points:
        outcome = " ".join(point["outcome"].split()).replace("|", "\\|")
        report = Path(point["run_dir"]) / "eval" / "report.json"
        if point["outcome"] == "done":
            if report.exists():
                reports.append(report)
            else:
                outcome += " (no eval report: eval not among its stages)"
        lines.append(f"| {point['number']} | {Path(point['run_dir']).name} | {outcome} |")
    text = "\n".join(lines) + "\n"
    if reports:
        try:
            combined = combine(reports)
        except SystemExit as error:  # a report that does not read: named, the table of points still written
            unreadable.append(str(error))
        else:
            text += "\n" + markdown_report(combined, label="point/drafter")
            if combined["differing_settings"]:
                text += "\nSettings differ between points: " + "; ".join(
                    f"{key} = {values}" for key, values in combined["differing_settings"].items()) + "\n"
    for line in unreadable:
        text += f"\nNot compared: {line}\n"
    return text


class CompareSweep(Callback):
    """Hydra callback: after the last point of a multirun, the table of every point (printed and in compare.md),
    then exit status 0 only if every point is done (1 otherwise, naming how many are not)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        table = compare_points(sweep_dir)
        (sweep_dir / "compare.md").write_text(table)
        print(f"[draftsmith] sweep comparison ({sweep_dir / 'compare.md'}):\n{table}", flush=True)
        points = read_points(sweep_dir)
        failed = [point for point in points if point["outcome"] != "done"]
        if failed:
            print(f"[draftsmith] error: {len(failed)} of {len(points)} sweep points did not succeed "
                  f"({', '.join(Path(point['run_dir']).name for point in failed)}); see {sweep_dir / 'compare.md'}",
                  file=sys.stderr, flush=True)
            sys.exit(1)
