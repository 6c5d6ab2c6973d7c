"""`python train/run.py +experiment=smoke` end to end, as a user runs it: real subprocess, real wandb (offline)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_gen.shards import load_records, shard_provenance
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # real train/run.py subprocesses: the fast command (-m "not slow") leaves them out
STAGES = ["data_gen", "pretrain", "distill", "eval", "export"]
SECRET = "wandb-key-that-must-never-be-written-0123456789"


def run_cli(tmp_path, *overrides, check=True):
    env = dict(os.environ, DRAFTSMITH_CACHE=str(tmp_path / "cache"), WANDB_API_KEY=SECRET, WANDB_SILENT="true")
    result = subprocess.run([sys.executable, "train/run.py", "+experiment=smoke", f"runs_root={tmp_path / 'runs'}",
                             *overrides], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("smoke")
    result = run_cli(tmp_path)
    return tmp_path, result


def test_every_stage_writes_a_self_explaining_output(smoke_run):
    tmp_path, _ = smoke_run
    run_dir = tmp_path / "runs" / "smoke" / "default"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    for stage in STAGES:
        meta = json.loads((run_dir / stage / "meta.json").read_text())
        assert meta["config"]["experiment"] == "smoke"
        assert meta["target"]["name"] == "tiny-random-llama" and len(meta["target"]["sha256"]) == 64
        assert meta["git_commit"].removesuffix("-dirty") == head, meta["git_commit"]
    assert not list(run_dir.glob("*.partial"))
    shard = sorted((run_dir / "data_gen" / "shards").glob("shard-*.arrow"))[0]
    made = shard_provenance(shard)  # every shard says how it was made, as meta.json does for the stage
    assert made["config"]["experiment"] == "smoke" and made["target"] == meta["target"]
    assert made["git_commit"].removesuffix("-dirty") == head
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    baselines = ["prompt_lookup", "ngram", "prompt_lookup+ngram", "token_recycling"]
    assert set(report["drafters"]) == {"untrained", "pretrained", "distilled", *baselines}
    assert report["baselines"] == baselines and report["best"] in {"pretrained", "distilled"}  # never a baseline
    assert "(training-free)" in report["table_markdown"]
    assert all(m["lossless"] is True for m in report["drafters"].values())
    assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))  # the real wandb wrote its offline run files


def test_the_api_key_is_never_written(smoke_run):
    tmp_path, _ = smoke_run
    for path in (tmp_path / "runs").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"secret found in {path}"


def test_export_loads_as_assistant_model_and_stays_lossless(smoke_run):
    tmp_path, _ = smoke_run
    exported = tmp_path / "runs" / "smoke" / "default" / "export" / "drafter"
    assert "Measured acceptance" in (exported / "README.md").read_text()
    target_dir = next((tmp_path / "cache" / "tiny_random").iterdir())
    target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    drafter = AutoModelForCausalLM.from_pretrained(exported).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Say something."}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    plain = target.generate(**inputs, max_new_tokens=30, do_sample=False)
    assisted = target.generate(**inputs, max_new_tokens=30, do_sample=False, assistant_model=drafter)
    assert torch.equal(plain, assisted)


def test_rerun_skips_complete_stages_and_redoes_partial_ones(smoke_run):
    tmp_path, _ = smoke_run
    run_dir = tmp_path / "runs" / "smoke" / "default"
    before = {s: (run_dir / s / "meta.json").read_text() for s in STAGES}
    (run_dir / "eval").rename(run_dir / "eval.partial")  # as if killed before eval finished
    result = run_cli(tmp_path, "logger=none")
    for stage in ["data_gen", "pretrain", "distill"]:
        assert f"{stage}: complete output" in result.stdout
        assert (run_dir / stage / "meta.json").read_text() == before[stage]
    assert "eval: running" in result.stdout and (run_dir / "eval" / "meta.json").exists()
    assert not (run_dir / "eval.partial").exists()


def test_changed_settings_are_an_error_not_a_silent_reuse(smoke_run):
    tmp_path, _ = smoke_run
    result = run_cli(tmp_path, "logger=none", "pretrain.steps=11", check=False)
    assert result.returncode == 2  # one line, no traceback: the user changed a setting, nothing is broken
    assert result.stderr.strip().splitlines()[-1].startswith("[draftsmith] error: ")
    assert "was made with other settings (pretrain.steps: 10 -> 11)" in result.stderr


def test_eval_alone_on_a_drafter_given_by_path(smoke_run):
    tmp_path, _ = smoke_run
    drafter = tmp_path / "runs" / "smoke" / "default" / "export" / "drafter"
    result = run_cli(tmp_path, "logger=none", "run_name=only_eval", "stages=[eval]", "eval.include_untrained=false",
                     f"+eval.drafters.mine={drafter}")
    report = json.loads((tmp_path / "runs" / "smoke" / "only_eval" / "eval" / "report.json").read_text())
    assert list(report["drafters"]) == ["mine", "prompt_lookup", "token_recycling"]  # no data_gen: no corpus rows
    assert report["best"] == "mine" and report["drafters"]["mine"]["lossless"]
    assert "ngram skipped: no data_gen output" in result.stdout
    assert report["drafter_paths"]["ngram"].startswith("skipped")
    assert not (tmp_path / "runs" / "smoke" / "only_eval" / "data_gen").exists()


def test_on_policy_data_from_the_pipelines_own_drafter(smoke_run):
    """DistillSpec data: the pretrain stage's checkpoint answers about half the prompts, the target the rest,
    and the target's top-k log-probabilities are stored for every answer token."""
    tmp_path, _ = smoke_run
    drafter = tmp_path / "runs" / "smoke" / "default" / "pretrain" / "model"
    run_cli(tmp_path, "logger=none", "run_name=on_policy", "stages=[data_gen]", f"data_gen.on_policy_drafter={drafter}",
            "data_gen.on_policy_ratio=0.5", "data_gen.top_k_logprobs=4")
    out = tmp_path / "runs" / "smoke" / "on_policy" / "data_gen"
    report = json.loads((out / "report.json").read_text())
    assert report["by_generator"]["drafter"] > 0 and report["by_generator"]["target"] > 0
    rows = list(load_records(out))
    assert all(len(r["topk_ids"]) == sum(r["loss_mask"]) for r in rows)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["settings"]["data_gen"]["on_policy_drafter"] == str(drafter)


EAGLE3 = ["drafter=eagle3", "drafter.feature_layers=[0,1]", "drafter.draft_vocab_size=64", "loss=eagle3",
          "loss.unroll=2", "distill.train_on=all", "distill.feature_cache=true", "distill.corpus_records=4"]


@pytest.mark.parametrize("name, overrides", [("eagle", ["drafter=eagle", "loss=eagle"]), ("eagle3", EAGLE3)],
                         ids=["eagle", "eagle3"])
def test_a_feature_level_drafter_trains_and_is_evaluated_by_the_decoder(smoke_run, name, overrides):
    """EAGLE end to end (and EAGLE-3 with fused layers, a draft vocabulary, the training-time test, the feature
    cache and corpus rows): distill on the run's data, then the eval stage decodes with it (reading the target's
    features) and checks every output against plain decoding; the held-out check sees the same data_gen."""
    tmp_path, _ = smoke_run
    default = tmp_path / "runs" / "smoke" / "default"
    eagle = tmp_path / "runs" / "smoke" / name
    eagle.mkdir(parents=True)
    (eagle / "data_gen").symlink_to(default / "data_gen", target_is_directory=True)
    # eval.hybrid and eval.merged rows too
    hybrids = ["distilled+prompt_lookup", "distilled+ngram", "distilled&prompt_lookup"] if name == "eagle3" else []
    run_cli(tmp_path, "logger=none", f"run_name={name}", "stages=[distill,eval]", *overrides, "eval.decode.tree=[2,2]",
            *(["eval.hybrid=[prompt_lookup,ngram]", "eval.merged=[prompt_lookup]", "eval.merged_skip_at=3"]
              if hybrids else []))
    summary = json.loads((eagle / "distill" / "meta.json").read_text())["summary"]
    if name == "eagle3":
        assert summary["corpus_records"] == 4 and summary["feature_cache"] and summary["unroll"] == 2
        assert (eagle / "distill" / "features" / "manifest.json").exists()
    report = json.loads((eagle / "eval" / "report.json").read_text())
    assert set(report["drafters"]) == {"untrained", "distilled", *report["baselines"], *hybrids}
    assert report["baselines"] and all(m["lossless"] is True for m in report["drafters"].values())  # trees: all rows
    assert report["drafter_paths"]["distilled"].endswith("distill/model")
    assert report["hybrids"] == hybrids and report["best"] == "distilled"  # a hybrid is no checkpoint to export
    for hybrid in hybrids[:2]:
        assert "behind training-free" in report["drafter_paths"][hybrid]
    if hybrids:
        assert ("its tree [2, 2] and training-free prompt_lookup's guess" in
                report["drafter_paths"]["distilled&prompt_lookup"])
        merged = report["drafters"]["distilled&prompt_lookup"]
        assert merged["mean_verified_per_step"] >= 1 and 0 < merged["drafter_run_fraction"] <= 1


def test_preflight_checks_every_stage_before_the_first_one_runs(smoke_run):
    _, result = smoke_run
    out = result.stdout
    assert "[draftsmith] preflight: data_gen, pretrain, distill, eval, export can run here" in out
    assert out.index("[draftsmith] preflight:") < out.index("[draftsmith] data_gen: running")
