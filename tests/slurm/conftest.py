"""One real SLURM cluster (munged, slurmctld, slurmd: tests/slurm/cluster.py) for every test in this folder, and
helpers to submit jobs to it and wait for them. CI installs SLURM first (.ci/setup-slurm); where it is missing or
this is not root, the tests are skipped with the reason, and under CI=true they fail instead."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.slurm import cluster as slurm_cluster
from slurm.cluster import JobState, job_state

pytestmark = pytest.mark.slow


def unavailable() -> str | None:
    missing = slurm_cluster.missing_programs()
    if missing:
        return f"SLURM is not installed (missing {missing}); .ci/setup-slurm installs it (Debian slurm-wlm, munge)"
    if os.geteuid() != 0:
        return "the test cluster's slurmd runs jobs as root: run the SLURM tests as root (CI does)"
    return None


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    reason = unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM tests: {reason}")
        pytest.skip(reason)
    running = slurm_cluster.up(tmp_path_factory.mktemp("slurm"))
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = running.env["SLURM_CONF"]  # this session's clients (slurm.cluster) talk to it
    yield running
    slurm_cluster.down(running)
    if before is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = before


@pytest.fixture(autouse=True)
def no_jobs_left_behind(request):
    """Whatever a test submitted is cancelled when it ends, passed or failed (the daemons stay for the next)."""
    yield
    if "cluster" in request.fixturenames:
        request.getfixturevalue("cluster").cancel_all()


@pytest.fixture(scope="session")
def slurm_env(cluster, tmp_path_factory) -> dict[str, str]:
    """The environment jobs and clients get: the cluster's SLURM_CONF, one cache for all tests here, one thread
    per process (two CPUs, often two jobs at once)."""
    return dict(os.environ, **cluster.env, DRAFTSMITH_CACHE=str(tmp_path_factory.mktemp("slurm_cache")),
                OMP_NUM_THREADS="1")


def run(command: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def sbatch(env: dict, *arguments: str) -> str:
    result = run(["sbatch", "--parsable", *arguments], env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def wait_until(env: dict, job_id: str, done, timeout: float = 600, log: Path | None = None) -> JobState:
    """Poll the job until done(state) holds; fail with its state and log after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        current = job_state(job_id)
        if done(current):
            return current
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            pytest.fail(f"job {job_id} is {current} after {timeout:.0f} s\n{tail}")
        time.sleep(0.5)


def finished(current: JobState) -> bool:
    return not current.active and current.state != "UNKNOWN"


def curve(run_dir: Path, stage: str = "distill") -> list[dict]:
    return [json.loads(line) for line in (run_dir / stage / "curve.jsonl").read_text().splitlines()]


def draftsmith(env: dict, *arguments: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """train/run.py in this process's environment (no SLURM): references the jobs are compared with."""
    result = run([sys.executable, "train/run.py", *arguments], env, timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result
