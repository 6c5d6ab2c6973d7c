"""Kill -9 a real distill run mid-way, rerun it, and get exactly the uninterrupted run's loss curve, for a
token-level and a feature-level drafter.

The token run uses the loss whose gradient draws random numbers (TVD++, sampled estimator) and on-policy steps
whose answers the drafter samples; the feature run (EAGLE) draws its input-feature noise every step. So a resumed
curve only matches if the checkpoint restored the weights, the optimizer, the schedule, the data position and
every RNG state.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT
from train.core.checkpoint import MANIFEST, STEP_FOLDER

pytestmark = pytest.mark.slow  # a real training subprocess, killed and resumed: not in .ci/check-latest's fast part

ARGS = ["+experiment=smoke", "logger=none", "data.limit=24", "distill.epochs=40", "distill.batch_size=4",
        "distill.checkpoint_every=5", "distill.eval_every=10"]
KINDS = {"token": ["drafter.hidden_size=128", "drafter.num_layers=4", "drafter.intermediate_size=384", "loss=tvdpp",
                   "loss.terms.tvdpp.fn.estimator=sampled", "distill.on_policy.ratio=0.25",
                   "distill.on_policy.max_new_tokens=12"],
         "feature": ["drafter=eagle", "drafter.intermediate_size=1024", "loss=eagle", "loss.feature_noise=0.2"]}


def command(runs_root, kind, *extra):
    return [sys.executable, "train/run.py", *ARGS, *KINDS[kind], f"runs_root={runs_root}", *extra]


def curve(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "distill" / "curve.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_sigkill_then_resume_gives_the_uninterrupted_loss_curve(tmp_path, kind):
    env = dict(os.environ, DRAFTSMITH_CACHE=str(tmp_path / "cache"))
    reference = subprocess.run(command(tmp_path / "reference", kind, "stages=[data_gen,distill]"), cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=900)
    assert reference.returncode == 0, reference.stderr[-3000:]
    reference_dir = tmp_path / "reference" / "smoke" / "default"
    total_steps = json.loads((reference_dir / "distill" / "meta.json").read_text())["summary"]["steps"]

    killed_dir = tmp_path / "killed" / "smoke" / "default"
    shutil.copytree(reference_dir / "data_gen", killed_dir / "data_gen")
    checkpoints = killed_dir / "distill.partial" / "checkpoints"
    process = subprocess.Popen(command(tmp_path / "killed", kind, "stages=[distill]"), cwd=REPO_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not any(int(p.name.split("-")[1]) >= 10 for p in checkpoints.glob("step-*")
                                             if STEP_FOLDER.fullmatch(p.name) and (p / MANIFEST).exists()):
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed_dir / "distill").exists(), "the kill must land mid-run"
    interrupted = (killed_dir / "distill.partial" / "curve.jsonl").read_text().splitlines()
    assert 10 <= len(interrupted) < total_steps

    resumed = subprocess.run(command(tmp_path / "killed", kind, "stages=[distill]"), cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[distill] resuming from" in resumed.stdout
    summary = json.loads((killed_dir / "distill" / "meta.json").read_text())["summary"]
    assert 10 <= summary["resumed_at"] < total_steps
    expected, actual = curve(reference_dir), curve(killed_dir)
    if kind == "token":
        assert any(entry["on_policy"] for entry in expected[summary["resumed_at"]:])
    assert summary["drafter_kind"] == kind
    assert actual == expected  # every step: same loss, same gradient norm, same on-policy draws, bit for bit
    assert summary["acceptance_proxy"] == json.loads((reference_dir / "distill" / "meta.json").read_text()
                                                     )["summary"]["acceptance_proxy"]
    saved = json.loads(sorted((killed_dir / "distill" / "checkpoints").glob("step-*"))[-1].joinpath("state.json")
                       .read_text())
    assert saved["config"]["distill"]["checkpoint_every"] == 5 and saved["target"]["name"] == "tiny-random-llama"
    assert len(saved["target"]["sha256"]) == 64 and saved["git_commit"]  # a checkpoint says how it was made


DAMAGE = {  # what a kill -9 mid-write, a full disk or a stray edit leaves in a checkpoint
    "model.safetensors truncated": lambda folder: truncate(folder / "model.safetensors"),
    "optimizer.pt truncated": lambda folder: truncate(folder / "optimizer.pt"),
    "state.json emptied": lambda folder: (folder / "state.json").write_text(""),
}


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def test_a_damaged_newest_checkpoint_is_skipped_and_resume_falls_back(tmp_path):
    """A finished run's checkpoints, the newest damaged three ways in turn: resume=auto reports it, moves it aside
    and resumes from the one before, and the curve still equals the uninterrupted run's; with every checkpoint
    damaged the error names them and what to do."""
    args = ["distill.epochs=4", "distill.checkpoint_every=4", "distill.keep_checkpoints=2"]
    env = dict(os.environ, DRAFTSMITH_CACHE=str(tmp_path / "cache"))
    reference = subprocess.run(command(tmp_path / "reference", "token", "stages=[data_gen,distill]", *args),
                               cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert reference.returncode == 0, reference.stderr[-3000:]
    reference_dir = tmp_path / "reference" / "smoke" / "default"
    for damage, apply in DAMAGE.items():
        run_dir = tmp_path / damage.replace(" ", "_") / "smoke" / "default"
        shutil.copytree(reference_dir / "data_gen", run_dir / "data_gen")
        shutil.copytree(reference_dir / "distill", run_dir / "distill.partial")
        (run_dir / "distill.partial" / "meta.json").unlink()
        older, newest = sorted((run_dir / "distill.partial" / "checkpoints").glob("step-*"))[-2:]
        apply(newest)
        resumed = subprocess.run(command(run_dir.parents[1], "token", "stages=[distill]", *args), cwd=REPO_ROOT,
                                 env=env, capture_output=True, text=True, timeout=900)
        assert resumed.returncode == 0, (damage, resumed.stderr[-3000:])
        assert f"checkpoint {newest.name} is damaged and skipped: {newest}" in resumed.stdout, damage
        assert f"resuming from {run_dir / 'distill.partial' / 'checkpoints' / older.name}" in resumed.stdout, damage
        assert curve(run_dir) == curve(reference_dir), damage
        assert (run_dir / "distill" / "checkpoints" / f"{newest.name}.damaged").is_dir()

    run_dir = tmp_path / "all_damaged" / "smoke" / "default"
    shutil.copytree(reference_dir / "data_gen", run_dir / "data_gen")
    shutil.copytree(reference_dir / "distill", run_dir / "distill.partial")
    (run_dir / "distill.partial" / "meta.json").unlink()
    for folder in (run_dir / "distill.partial" / "checkpoints").glob("step-*"):
        truncate(folder / "model.safetensors")
    refused = subprocess.run(command(run_dir.parents[1], "token", "stages=[distill]", *args), cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=900)
    assert refused.returncode == 2
    assert "[draftsmith] error: every checkpoint under" in refused.stderr and "resume=never" in refused.stderr
    assert "Traceback" not in refused.stderr
