"""Kill -9 a real data_gen run mid-way, rerun it, and get exactly the records of an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from data_gen.shards import load_records
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # a real data_gen subprocess, killed and rerun: not in .ci/check-latest's fast part

ARGS = ["+experiment=smoke", "stages=[data_gen]", "logger=none", "data.limit=48", "data_gen.shard_size=4",
        "data_gen.batch_size=1", "data_gen.max_new_tokens=48", "data_gen.sampling.temperature=0.8", "data_gen.sampling.top_p=0.95"]


def command(runs_root):
    return [sys.executable, "train/run.py", *ARGS, f"runs_root={runs_root}"]


def test_sigkill_then_rerun_gives_the_uninterrupted_record_set(tmp_path):
    env = dict(os.environ, DRAFTSMITH_CACHE=str(tmp_path / "cache"))
    reference = subprocess.run(command(tmp_path / "reference"), cwd=REPO_ROOT, env=env, capture_output=True,
                               text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    shards = len(json.loads((tmp_path / "reference" / "smoke" / "default" / "data_gen" / "manifest.json")
                            .read_text())["shards"])

    killed_root = tmp_path / "killed"
    shards_dir = killed_root / "smoke" / "default" / "data_gen.partial" / "shards"
    process = subprocess.Popen(command(killed_root), cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(shards_dir.glob("shard-*.arrow"))) < 2:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    committed = len(list(shards_dir.glob("shard-*.arrow")))
    assert 2 <= committed < shards, "the kill must land mid-run"
    assert not (killed_root / "smoke" / "default" / "data_gen").exists()

    resumed = subprocess.run(command(killed_root), cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming: {committed} of {shards} shards already complete" in resumed.stdout
    expected = list(load_records(tmp_path / "reference" / "smoke" / "default" / "data_gen"))
    actual = list(load_records(killed_root / "smoke" / "default" / "data_gen"))
    report = json.loads((killed_root / "smoke" / "default" / "data_gen" / "report.json").read_text())
    assert report["written_bytes"] <= report["estimated_bytes"]  # the disk estimate is an upper bound
    assert len(expected) >= 40 and len({r["id"] for r in actual}) == len(actual)  # no duplicate
    assert actual == expected  # no gap, same order, same tokens, same seeds
