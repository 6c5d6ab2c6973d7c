"""DeepSpeed for real: 2 processes over gloo (torchrun), ZeRO-1/2/3, against one plain-PyTorch process.

Each launch runs `train/run.py stages=[pretrain,distill]` on the same data_gen output as the single-process
reference; their per-step losses (and distill's gradient norms) must agree. Every rank holds half of each batch,
so agreement also proves the loss is normalised over the whole step, not per rank. The GPU variant (NCCL, bf16) is skipped here.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # multi-process torchrun launches: not in .ci/check-latest's fast part

ARGS = ["+experiment=smoke", "logger=none", "data.limit=24", "distill.epochs=2", "distill.batch_size=4",
        "distill.accumulation=2", "distill.checkpoint_every=3", "loss=jsd"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(runs_root: Path, run_name: str, *extra: str, processes: int = 1,
           torchrun: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, DRAFTSMITH_CACHE=str(runs_root / "cache"), OMP_NUM_THREADS="1")
    prefix = [sys.executable]
    if processes > 1 or torchrun:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                  "--master_port", str(free_port())]
    result = subprocess.run([*prefix, "train/run.py", *ARGS, f"runs_root={runs_root}", f"run_name={run_name}",
                             *extra], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def curve(runs_root: Path, run_name: str, stage: str = "distill") -> list[dict]:
    path = runs_root / "smoke" / run_name / stage / "curve.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    launch(root, "single", "stages=[data_gen,pretrain,distill]")
    return root


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_process_zero_matches_one_process(reference, stage):
    name = f"zero{stage}"
    shutil.copytree(reference / "smoke" / "single" / "data_gen", reference / "smoke" / name / "data_gen")
    result = launch(reference, name, "stages=[pretrain,distill]", f"deepspeed=zero{stage}", processes=2)
    assert result.stdout.count("distill: done") == 1  # rank 0 speaks for the launch
    pretrained, pretrained_here = curve(reference, "single", "pretrain"), curve(reference, name, "pretrain")
    assert [e["loss"] for e in pretrained_here] == pytest.approx([e["loss"] for e in pretrained], rel=1e-4)
    expected, actual = curve(reference, "single"), curve(reference, name)
    assert len(actual) == len(expected) >= 6
    assert [e["loss"] for e in actual] == pytest.approx([e["loss"] for e in expected], rel=1e-4)
    assert [e["grad_norm"] for e in actual] == pytest.approx([e["grad_norm"] for e in expected], rel=1e-3)
    meta = json.loads((reference / "smoke" / name / "distill" / "meta.json").read_text())
    assert meta["summary"]["processes"] == 2 and meta["summary"]["deepspeed_stage"] == stage
    checkpoints = sorted((reference / "smoke" / name / "distill" / "checkpoints").glob("step-*"))
    assert checkpoints and (checkpoints[-1] / "deepspeed").is_dir()  # DeepSpeed's own sharded format
    assert (reference / "smoke" / name / "distill" / "model" / "model.safetensors").exists()


FEATURE = ["drafter=eagle", "drafter.intermediate_size=256", "loss=eagle", "loss.feature_noise=0"]  # no noise: the
# single process draws it for the whole batch, each rank for its half


@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_zero_trains_a_feature_drafter_as_one_process_does(reference, stage):
    single, name = "feature_single", f"feature_zero{stage}"
    for run in (single, name):
        if not (reference / "smoke" / run / "data_gen").exists():
            shutil.copytree(reference / "smoke" / "single" / "data_gen", reference / "smoke" / run / "data_gen")
    if not (reference / "smoke" / single / "distill").exists():
        launch(reference, single, "stages=[distill]", *FEATURE)
    launch(reference, name, "stages=[distill]", *FEATURE, f"deepspeed=zero{stage}", processes=2)
    expected, actual = curve(reference, single), curve(reference, name)
    assert len(actual) == len(expected) >= 6
    assert [e["loss"] for e in actual] == pytest.approx([e["loss"] for e in expected], rel=1e-4)
    assert [e["grad_norm"] for e in actual] == pytest.approx([e["grad_norm"] for e in expected], rel=1e-3)
    summary = json.loads((reference / "smoke" / name / "distill" / "meta.json").read_text())["summary"]
    assert summary["drafter_kind"] == "feature" and summary["processes"] == 2
    assert (reference / "smoke" / name / "distill" / "model" / "feature_drafter.json").exists()


def test_other_stages_refuse_a_multi_process_launch(reference):
    env = dict(os.environ, DRAFTSMITH_CACHE=str(reference / "cache"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), "train/run.py", *ARGS, f"runs_root={reference}",
                             "run_name=refused", "stages=[data_gen,distill]", "deepspeed=zero1"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "stages ['data_gen'] run in one process" in result.stdout + result.stderr


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL + bf16 ZeRO needs 2 GPUs; CPU runs use gloo above")
def test_two_gpu_zero2_bf16(reference):
    name = "gpu_zero2_bf16"
    shutil.copytree(reference / "smoke" / "single" / "data_gen", reference / "smoke" / name / "data_gen")
    launch(reference, name, "stages=[pretrain,distill]", "deepspeed=zero2", "deepspeed.bf16=true", "device=cuda",
           processes=2)
    expected, actual = curve(reference, "single"), curve(reference, name)
    assert [e["loss"] for e in actual] == pytest.approx([e["loss"] for e in expected], rel=5e-2)  # bf16


class RunsCode:
    """A pickle payload: unpickling it runs a shell command (what a crafted checkpoint file would hold)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_deepspeed_checkpoint_never_runs_on_resume(tmp_path):
    """Resume verifies DeepSpeed's files against the checkpoint's manifest before any unpickling (a replaced file
    is skipped, the older checkpoint used), and unpickles them with weights_only=True even when the manifest was
    rewritten to match: the command inside the crafted file never runs."""
    zero = ["deepspeed=zero2", "distill.epochs=4", "distill.accumulation=1"]
    launch(tmp_path, "crafted", "stages=[data_gen,pretrain,distill]", *zero, torchrun=True)
    run_dir = tmp_path / "smoke" / "crafted"
    marker = tmp_path / "the-crafted-file-ran"

    def plant(rewrite_manifest: bool) -> Path:
        if (run_dir / "distill").exists():
            (run_dir / "distill").rename(run_dir / "distill.partial")
            (run_dir / "distill.partial" / "meta.json").unlink()
        newest = sorted((run_dir / "distill.partial" / "checkpoints").glob("step-*[0-9]"))[-1]
        torch.save({"module": RunsCode(marker)}, newest / "deepspeed" / "mp_rank_00_model_states.pt")
        if rewrite_manifest:
            from infra.integrity import digests
            from train.core.checkpoint import MANIFEST, checkpoint_files
            (newest / MANIFEST).write_text(json.dumps({"files": digests(newest, checkpoint_files(newest))}))
        return newest

    newest = plant(rewrite_manifest=False)
    resumed = launch(tmp_path, "crafted", "stages=[distill]", *zero, torchrun=True)
    assert f"checkpoint {newest.name} is damaged and skipped" in resumed.stdout
    assert "mp_rank_00_model_states.pt has 1," in resumed.stdout  # its size differs from the manifest's
    assert "[distill] resuming from" in resumed.stdout
    assert not marker.exists()
    assert (run_dir / "distill" / "checkpoints" / f"{newest.name}.damaged").is_dir()  # kept aside, not deleted

    plant(rewrite_manifest=True)
    env = dict(os.environ, DRAFTSMITH_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    refused = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
                              str(free_port()), "train/run.py", *ARGS, f"runs_root={tmp_path}", "run_name=crafted",
                              "stages=[distill]", *zero], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                             timeout=900)
    assert refused.returncode != 0
    assert "refused to unpickle a file holding a type outside DeepSpeed's allow-list" in refused.stderr
    assert "posix.system" in refused.stderr or "os.system" in refused.stderr
    assert not marker.exists()
