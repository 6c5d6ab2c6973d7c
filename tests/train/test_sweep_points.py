"""A sweep survives a bad point: every point is a row of the comparison table with its outcome, the table is always
written, and the exit status says whether every point succeeded (train/pipeline/sweep.py, runner.main)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO_ROOT
from train.pipeline.sweep import POINT_FILE, CompareSweep


def point(sweep_dir, number: int, run_dir, outcome: str) -> None:
    (sweep_dir / str(number)).mkdir(parents=True)
    (sweep_dir / str(number) / POINT_FILE).write_text(json.dumps({"overrides": [], "run_dir": str(run_dir),
                                                                  "outcome": outcome}))


def test_refused_and_failed_points_are_rows_with_their_reason_and_the_exit_status_counts_them(tmp_path, capsys):
    sweep_dir = tmp_path / "sweeps" / "now"
    point(sweep_dir, 0, tmp_path / "pretrain.steps=10", "done")
    point(sweep_dir, 1, tmp_path / "pretrain.steps=-5", "refused: pretrain.steps=-5: must be ≥ 1")
    point(sweep_dir, 2, tmp_path / "loss=jsd", "failed: RuntimeError: out of | memory")
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}})
    with pytest.raises(SystemExit) as stopped:
        CompareSweep().on_multirun_end(config)
    assert stopped.value.code == 1
    table = (sweep_dir / "compare.md").read_text()
    assert "3 point(s), 1 done" in table
    assert "| 0 | pretrain.steps=10 | done (no eval report: eval not among its stages) |" in table
    assert "| 1 | pretrain.steps=-5 | refused: pretrain.steps=-5: must be ≥ 1 |" in table
    assert "| 2 | loss=jsd | failed: RuntimeError: out of \\| memory |" in table
    assert "2 of 3 sweep points did not succeed (pretrain.steps=-5, loss=jsd)" in capsys.readouterr().err
    for number in (1, 2):
        (sweep_dir / str(number) / POINT_FILE).unlink()
    CompareSweep().on_multirun_end(config)  # every point done: no exit


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "local"])
def test_a_refused_point_does_not_stop_the_sweep(tmp_path, launcher):
    """The refused point first: with the basic launcher it used to end the sweep there (sys.exit), with submitit's
    local one in an UncompletedJobError traceback with no table."""
    command = [sys.executable, "train/run.py", "-m", "+experiment=smoke", "logger=none", f"runs_root={tmp_path}",
               "stages=[pretrain]", "pretrain.steps=-5,3"] + (["hydra/launcher=local"] if launcher == "local" else [])
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    (sweep_dir,) = (tmp_path / "smoke" / "sweeps").iterdir()
    table = (sweep_dir / "compare.md").read_text()
    assert "2 point(s), 1 done" in table and "| pretrain.steps=3 | done" in table
    assert "| pretrain.steps=-5 | refused: pretrain.steps=-5: must be ≥ 1" in table, table
    assert (tmp_path / "smoke" / "pretrain.steps=3" / "pretrain" / "meta.json").exists()
    assert "1 of 2 sweep points did not succeed (pretrain.steps=-5)" in done.stderr
