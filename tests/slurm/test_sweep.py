"""A sweep through Hydra's submitit launcher: one SLURM job per point, one run folder each, one table at the end."""
from __future__ import annotations

import json
import re
import sys

import pytest

from tests.slurm.conftest import run

pytestmark = pytest.mark.slow


def test_a_two_point_sweep_runs_one_job_per_point_and_ends_with_one_table(slurm_env, tmp_path):
    result = run([sys.executable, "train/run.py", "-m", "hydra/launcher=slurm", "+experiment=smoke", "logger=none",
                  f"runs_root={tmp_path}", "cluster.run.cpus=1", "cluster.run.mem_gb=4", "loss=fkl,jsd"],
                 slurm_env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "smoke" / "sweeps").iterdir()
    tasks = sorted(p.name for p in (sweep_dir / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(tasks) == 2 and tasks[0].split("_")[0] == tasks[1].split("_")[0]  # one array task per point
    for point, loss in enumerate(("fkl", "jsd")):
        recorded = json.loads((sweep_dir / str(point) / "point.json").read_text())
        assert recorded["outcome"] == "done" and recorded["run_dir"] == str(tmp_path / "smoke" / f"loss={loss}")
        meta = json.loads((tmp_path / "smoke" / f"loss={loss}" / "distill" / "meta.json").read_text())
        assert meta["config"]["loss"]["terms"] == [loss] or loss in json.dumps(meta["config"]["loss"])
    table = (sweep_dir / "compare.md").read_text()
    for loss in ("fkl", "jsd"):
        assert f"| loss={loss}/distilled |" in table and f"| loss={loss}/prompt_lookup |" in table
    assert "[draftsmith] sweep comparison" in result.stdout and table.strip() in result.stdout
