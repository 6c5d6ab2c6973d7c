"""The cluster's warning signal without a cluster: SIGUSR1 to a real pretrain run makes it checkpoint at the next
step, leave the mark the SLURM scripts requeue on and exit 3; the rerun (what the requeued job does) finishes
with the uninterrupted run's loss curve. tests/slurm/ does the same through SLURM for a two-node distill job."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from infra.preemption import EXIT_CODE
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # real training subprocesses

ARGS = ["+experiment=smoke", "logger=none", "pretrain.steps=300", "pretrain.checkpoint_every=1000",
        "stages=[pretrain]"]


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "pretrain" / "curve.jsonl").read_text().splitlines()]


def test_the_warning_signal_stops_at_a_checkpoint_and_the_rerun_finishes_the_same_curve(tmp_path):
    env = dict(os.environ, DRAFTSMITH_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               DRAFTSMITH_PREEMPT_MARK=str(tmp_path / "preempted"))
    command = [sys.executable, "train/run.py", *ARGS, f"runs_root={tmp_path}"]
    whole = subprocess.run([*command, "run_name=whole"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert not (tmp_path / "preempted").exists()

    process = subprocess.Popen([*command, "run_name=stopped"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "smoke" / "stopped" / "pretrain.partial" / "curve.jsonl"
    deadline = time.monotonic() + 300
    while not (partial.exists() and len(partial.read_text().splitlines()) >= 5):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.02)
    process.send_signal(signal.SIGUSR1)
    out, err = process.communicate(timeout=300)
    assert process.returncode == EXIT_CODE, err[-3000:]
    step = int(out.split("pretrain stopped after step ")[1].split()[0])
    assert 5 <= step < 300
    assert (tmp_path / "preempted").read_text().startswith(f"pretrain stopped after step {step} of 300")
    assert [p.name for p in (partial.parent / "checkpoints").iterdir()] == [f"step-{step:07d}"]

    rerun = subprocess.run([*command, "run_name=stopped"], cwd=REPO_ROOT, env=dict(env, DRAFTSMITH_PREEMPT_MARK=""),
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f'"resumed_at": {step}' in rerun.stdout
    assert losses(tmp_path / "smoke" / "stopped") == losses(tmp_path / "smoke" / "whole")
