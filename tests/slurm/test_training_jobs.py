"""Training as SLURM jobs: slurm/train.sbatch across the test cluster's two nodes (two slurmd on this machine; one
task per node runs torchrun for it, the first node is the master), ZeRO-2 over gloo, against one process; and the
warning signal
before a time limit: every rank checkpoints at the same step, the job requeues itself, and the requeued job
finishes with the loss curve of an uninterrupted run."""
from __future__ import annotations

import shutil
import time

import pytest

from tests.conftest import REPO_ROOT
from tests.slurm.conftest import curve, draftsmith, finished, run, sbatch, wait_until
from slurm.cluster import job_state

pytestmark = pytest.mark.slow

ARGS = ["+experiment=smoke", "logger=none", "data.limit=24", "distill.epochs=40", "distill.batch_size=4",
        "distill.accumulation=2", "distill.checkpoint_every=1000", "loss=jsd", "stages=[distill]"]
STEPS = 120  # 15 training records, 4 per step (2 micro-batches): 4 steps an epoch (the last one short) x 40


@pytest.fixture(scope="module")
def trained_once(slurm_env, tmp_path_factory):
    """data_gen once, then distill in one plain process: the reference curve."""
    root = tmp_path_factory.mktemp("slurm_training")
    draftsmith(slurm_env, *ARGS[:-1], f"runs_root={root}", "run_name=single", "stages=[data_gen,distill]")
    return root


def two_node_job(slurm_env, root, run_name: str, tmp_path) -> tuple[str, object]:
    """slurm/train.sbatch on 2 nodes of 1 process each, on a copy of the reference data."""
    (root / "smoke" / run_name).mkdir(parents=True)
    shutil.copytree(root / "smoke" / "single" / "data_gen", root / "smoke" / run_name / "data_gen")
    log = tmp_path / "train.out"
    job = sbatch(slurm_env, "--nodes=2", "--cpus-per-task=1", "--mem=4G", f"--output={log}",
                 "slurm/train.sbatch", "1", *ARGS, f"runs_root={root}", f"run_name={run_name}", "deepspeed=zero2")
    return job, log


def test_two_nodes_of_zero2_train_as_one_process_does(slurm_env, trained_once, tmp_path):
    job, log = two_node_job(slurm_env, trained_once, "two_nodes", tmp_path)
    ended = wait_until(slurm_env, job, finished, log=log)
    assert ended.state == "COMPLETED", log.read_text()[-3000:]
    assert "2 node(s) (n[1-2]) x 1 process(es), master n1 at 127.0.0.1" in log.read_text()
    meta = (trained_once / "smoke" / "two_nodes" / "distill" / "meta.json").read_text()
    assert '"processes": 2' in meta and '"deepspeed_stage": 2' in meta
    single, two = curve(trained_once / "smoke" / "single"), curve(trained_once / "smoke" / "two_nodes")
    assert len(single) == len(two) == STEPS
    assert [e["loss"] for e in two] == pytest.approx([e["loss"] for e in single], rel=1e-4)


def test_the_warning_signal_checkpoints_requeues_and_resumes_to_the_same_curve(slurm_env, trained_once, tmp_path):
    job, log = two_node_job(slurm_env, trained_once, "preempted", tmp_path)
    partial = trained_once / "smoke" / "preempted" / "distill.partial" / "curve.jsonl"
    deadline = time.monotonic() + 300
    while not (partial.exists() and len(partial.read_text().splitlines()) >= 10):
        assert time.monotonic() < deadline and job_state(job).active, log.read_text()[-3000:] if log.exists() else ""
        time.sleep(0.05)
    # what SLURM sends `--signal=USR1@180` before the time limit, sent now (to every process of the job's steps)
    assert run(["scancel", "--signal=USR1", job], slurm_env).returncode == 0
    requeued = wait_until(slurm_env, job, lambda s: s.state == "PENDING" and s.reason == "BeginTime", timeout=120,
                          log=log)
    assert requeued.state == "PENDING"
    text = log.read_text()
    stopped = [line for line in text.splitlines() if "requeueing it" in line]
    assert len(stopped) == 1 and "distill stopped after step" in stopped[0], text[-3000:]
    step = int(stopped[0].split("distill stopped after step ")[1].split()[0])
    assert 10 <= step < STEPS
    checkpoints = [p.name for p in (partial.parent / "checkpoints").iterdir()]
    assert checkpoints == [f"step-{step:07d}"]  # checkpoint_every=1000: this one is the signal's
    # SLURM holds a requeued job back until its old credential expired (120 s by default, 10 s on the test
    # cluster: tests/slurm/cluster.py), then starts it again by itself
    ended = wait_until(slurm_env, job, finished, log=log)
    assert ended.state == "COMPLETED", run(["scontrol", "show", "job", job], slurm_env).stdout + log.read_text()[-3000:]
    assert "start 2," in log.read_text()  # the same job, started a second time, appending to its log
    resumed = curve(trained_once / "smoke" / "preempted")
    single = curve(trained_once / "smoke" / "single")
    assert [e["step"] for e in resumed] == list(range(STEPS))  # each step once: the curve was cut back on resume
    assert [e["loss"] for e in resumed] == pytest.approx([e["loss"] for e in single], rel=1e-4)
    uninterrupted = trained_once / "smoke" / "two_nodes" / "distill" / "curve.jsonl"
    if uninterrupted.exists():  # the same two-node launch without the signal: the same numbers exactly
        assert [e["loss"] for e in resumed] == [e["loss"] for e in curve(trained_once / "smoke" / "two_nodes")]
    assert REPO_ROOT.exists()
