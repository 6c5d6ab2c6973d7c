"""The whole pipeline as dependent SLURM jobs (slurm/pipeline.py, slurm/cluster.py) on a real cluster."""
from __future__ import annotations

import json
import os
import sys

import pytest

from tests.slurm.conftest import run

pytestmark = pytest.mark.slow

SMOKE = ["+experiment=smoke", "logger=none", "cluster.data_gen.cpus=1", "cluster.data_gen.mem_gb=2",
         "cluster.train.mem_gb=4", "cluster.run.mem_gb=4"]


def pipeline(env: dict, *arguments: str):
    return run([sys.executable, "slurm/pipeline.py", *arguments], env, timeout=900)


def test_one_command_runs_every_stage_as_dependent_jobs(slurm_env, tmp_path):
    result = pipeline(slurm_env, *SMOKE, f"runs_root={tmp_path}", "cluster.data_gen.workers=2",
                      "data_gen.shard_size=4", "cluster.train.nodes=2", "cluster.train.cpus=1", "deepspeed=zero2",
                      "--wait")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "smoke" / "default"
    plan = json.loads((run_dir / "slurm" / "pipeline.json").read_text())
    assert [(job["name"], job["stages"], job["after"]) for job in plan] == [
        ("data_gen", ["data_gen"], None), ("train", ["pretrain", "distill"], "data_gen"),
        ("run", ["eval", "export"], "train")]
    for job in plan:  # the ids it printed are the jobs it submitted, and every one completed
        assert f"job {job['job_id']}" in result.stdout
    assert result.stdout.strip().splitlines()[-3:] == [
        f"  data_gen job {plan[0]['job_id']:<8} data_gen                 COMPLETED (2 tasks)",
        f"  train    job {plan[1]['job_id']:<8} pretrain+distill         COMPLETED",
        f"  run      job {plan[2]['job_id']:<8} eval+export              COMPLETED"]
    logs = sorted(p.name for p in (run_dir / "slurm").glob("data_gen-*.out"))
    assert logs == [f"data_gen-{plan[0]['job_id']}_0.out", f"data_gen-{plan[0]['job_id']}_1.out"]
    for task in (0, 1):  # each array task made its own shards; the last to finish wrote the manifest
        assert f"data_gen shards (worker {task}/2)" in (run_dir / "slurm" / logs[task]).read_text()
    assert len(json.loads((run_dir / "data_gen" / "manifest.json").read_text())["shards"]) == 4  # 13 records
    train_log = (run_dir / "slurm" / f"train-{plan[1]['job_id']}.out").read_text()
    assert "2 node(s) (n[1-2]) x 1 process(es)" in train_log  # pretrain and distill data-parallel on both nodes
    assert json.loads((run_dir / "distill" / "meta.json").read_text())["summary"]["processes"] == 2
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert {"pretrained", "distilled"} <= set(report["drafters"])
    assert all(d["lossless"] for d in report["drafters"].values())
    assert (run_dir / "export" / "model_card.md").exists() or any((run_dir / "export").iterdir())
    status = pipeline(slurm_env, "--status", str(run_dir))
    assert status.returncode == 0 and status.stdout.count("COMPLETED") == 3


def test_a_failed_job_stops_the_jobs_after_it_and_names_its_error(slurm_env, tmp_path):
    broken = tmp_path / "prompts.jsonl"
    broken.write_text('{"id": "a", "conversations": [{"from": "human", "value": "hi"}]}\n{"id": "b", "conv\n')
    result = pipeline(slurm_env, *SMOKE, f"runs_root={tmp_path}", "data.format=jsonl", f"data.location={broken}",
                      "data.file=null", "--wait")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    plan = json.loads((tmp_path / "smoke" / "default" / "slurm" / "pipeline.json").read_text())
    data_gen, train, rest = result.stdout.strip().splitlines()[-3:]
    assert f"data_gen job {plan[0]['job_id']}" in data_gen and "FAILED" in data_gen
    assert f"{broken}:2: malformed JSON" in data_gen  # the failure, in the job's own words
    for line in (train, rest):
        assert f"CANCELLED: not run, because data_gen (job {plan[0]['job_id']}) did not succeed" in line
    assert not (tmp_path / "smoke" / "default" / "pretrain").exists()


def test_bad_settings_submit_nothing(slurm_env, tmp_path):
    for bad, says in ((["cluster.train.nodes=2"], "data-parallel training needs deepspeed"),
                      (["cluster.data_gen.workers=0"], "cluster.data_gen.workers=0: must be ≥ 1"),
                      (["distill.epochz=3"], "distill.epochz")):
        result = pipeline(slurm_env, *SMOKE, f"runs_root={tmp_path}", *bad)
        assert result.returncode == 2 and says in result.stderr, result.stderr
    assert not list(tmp_path.rglob("pipeline.json"))
    assert run(["squeue", "-h"], slurm_env).stdout.strip() == ""


def test_a_dry_run_prints_the_sbatch_lines(tmp_path):
    """No cluster needed: what would be submitted, with the cluster settings bound (the GPU example)."""
    result = run([sys.executable, "slurm/pipeline.py", "+experiment=llama8b_eagle3", f"runs_root={tmp_path}",
                  "cluster.partition=h100", "--dry-run"], dict(os.environ))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "[pipeline] dry run: nothing submitted"
    assert "--array=0-3" in lines[0] and "--gres=gpu:8" in lines[0] and "--partition=h100" in lines[0]
    assert "--export=ALL,DRAFTSMITH_ENV=vllm" in lines[0]  # data_gen=vllm runs in .venv-vllm
    assert "--nodes=2" in lines[1] and "slurm/train.sbatch 8" in lines[1] and "afterok: the data_gen job" in lines[1]
    assert "stages=[distill]" in lines[1] and "stages=[eval,export]" in lines[2]  # the recipe has no pretrain
    assert not (tmp_path / "llama8b_eagle3").exists()
