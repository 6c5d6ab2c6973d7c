"""Stage `online` (train/online/stage.py) on the tiny random target: what the buffer holds comes from verification, greedy
replay equals real serving, a harmful update is rolled back, kill -9 resumes exactly, bad settings are refused."""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_gen.sources import PromptSourceSpec
from data_gen.stream import StreamPhase, domain_of
from eval.decoder import DecodeSettings, VerificationRecorder, speculative_generate
from infra.settings import SettingsError
from infra.stage import StageRun
from losses.kl import forward_kl
from losses.mix import LossMix
from models.drafter import TokenDraft, save_drafter
from tests.conftest import REPO_ROOT, TINY_PROMPTS, quiet_tracker
from train.core.checkpoint import MANIFEST, STEP_FOLDER
from train.core.optim import OptimSettings
from train.online.arms import Arm, ArmState, arms_for
from train.online.buffer import BufferSettings, Served, rows_from
from train.online.learners import TokenLearner
from train.online.replay import replay_steps
from train.online.settings import OnlineSettings, PublishSettings, ScheduleSettings
from train.online.stage import run_stage

FKL = LossMix({"fkl": {"fn": forward_kl, "weight": 1.0}})


def prompts_file(tmp_path, name, texts):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"id": f"{name}{i}", "prompt": t}) + "\n" for i, t in enumerate(texts)))
    return PromptSourceSpec(name=name, format="jsonl", location=str(path), shuffle_seed=None)


def two_phases(tmp_path, count=6):
    return {"a": StreamPhase(source=prompts_file(tmp_path, "a", TINY_PROMPTS[:count]), count=count),
            "b": StreamPhase(source=prompts_file(tmp_path, "b", [t.upper() for t in TINY_PROMPTS[:count]]),
                             count=count)}


def stage_run(tmp_path, target, name="run", resume="auto") -> StageRun:
    out = tmp_path / name / "online.partial"
    out.mkdir(parents=True, exist_ok=True)
    return StageRun(stage="online", out_dir=out, run_dir=tmp_path / name, cache_dir=tmp_path / "cache",
                    tracker=quiet_tracker(tmp_path, "online"), config={}, target_identity={},
                    load_target=lambda: target, resume=resume)


@pytest.fixture()
def copy_of_target(tiny_target, tmp_path):
    """A drafter that is the target itself (acceptance 1): what an update can only make worse."""
    folder = tmp_path / "drafter"
    save_drafter(copy.deepcopy(tiny_target.model), tiny_target.tokenizer, folder)
    return folder


def stream_lines(run_dir, arm):
    return [json.loads(line) for line in (run_dir / "online.partial" / "arms" / arm / "stream.jsonl")
            .read_text().splitlines()]


@contextlib.contextmanager
def updates_never_run(target):
    """Within the block, an `ArmState.update` during which any layer of `target` runs fails the test (a feature
    drafter's update uses the target's embedding and head, never its layers)."""
    calls = []
    hook = target.get_decoder().layers[0].register_forward_hook(lambda *a: calls.append(1))
    original = ArmState.update

    def guarded(self, index):
        before = len(calls)
        line = original(self, index)
        assert len(calls) == before, "an update ran the target"
        return line

    ArmState.update = guarded
    try:
        yield
    finally:
        ArmState.update = original
        hook.remove()


def test_verification_record_is_the_targets_distribution_at_every_drafted_position(tiny_target):
    """The recorder keeps what the verification forward computed: at block position j the target's log-softmax given
    the committed prefix and the first j drafts, equal to a fresh full forward over the same tokens."""
    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    prompts = [tokenizer.encode(text) for text in TINY_PROMPTS[:3]]
    drafter = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in drafter.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))  # a drafter that is sometimes wrong
    recorder = VerificationRecorder(len(prompts), top_k=5)
    generations = speculative_generate(model, TokenDraft(drafter), prompts, DecodeSettings(gamma=3, max_new_tokens=12,
                                                                                            batch_size=2), [],
                                       recorder=recorder)
    rejected = 0
    for prompt, generation, steps in zip(prompts, generations, recorder.steps):
        served = Served("k", 0, "a", prompt, generation.tokens, steps)
        assert sum(len(s["drafts"]) for s in steps) == generation.stats.drafted
        assert sum(served.accepted(s) for s in steps) == generation.stats.accepted
        for step in steps:
            block = prompt + generation.tokens[: step["start"]] + step["drafts"]
            with torch.no_grad():
                full = torch.log_softmax(model(torch.tensor([block])).logits[0].float(), -1)
            for j in range(len(step["drafts"]) + 1):
                position = len(prompt) + step["start"] - 1 + j
                expected = full[position].topk(5)
                assert step["topk_ids"][j] == expected.indices.tolist()
                assert torch.allclose(torch.tensor(step["topk_logprobs"][j]), expected.values, atol=1e-4)
            rejected += served.accepted(step) < len(step["drafts"])
    assert rejected > 0  # positions after a rejection (the drafter's own proposals) were checked too


def test_rows_hold_the_configured_positions_and_sources():
    """Step 0 drafts [5, 6, 7] of which 2 are accepted (position 2 is a correction); step 1 drafts [8, 9], both
    accepted, and position 5 is the bonus token."""
    def topk(n):
        return [[[100 + n * 10 + j]] for j in range(n)], [[[-0.1 * j]] for j in range(n)]
    ids0, values0 = topk(4)
    ids1, values1 = topk(3)
    steps = [{"start": 0, "drafts": [5, 6, 7], "topk_ids": [i[0] for i in ids0], "topk_logprobs": [v[0] for v in values0]},
             {"start": 3, "drafts": [8, 9], "topk_ids": [i[0] for i in ids1], "topk_logprobs": [v[0] for v in values1]}]
    served = Served("r", 0, "a", [1, 2], [5, 6, 3, 8, 9, 4], steps)
    assert [served.accepted(s) for s in steps] == [2, 2]
    marked = {}
    for positions in ("corrected", "drafted", "all"):
        (row,) = rows_from(served, BufferSettings(positions=positions), seed=0)
        assert row.input_ids == [1, 2, 5, 6, 3, 8, 9, 4] and row.prompt_ids == [1, 2]
        marked[positions] = [i - 2 for i, m in enumerate(row.loss_mask) if m]
        assert len(row.topk_ids) == len(marked[positions])
    assert marked == {"corrected": [2, 5], "drafted": [0, 1, 2, 3, 4], "all": [0, 1, 2, 3, 4, 5]}
    (row,) = rows_from(served, BufferSettings(positions="corrected"), seed=0)
    assert row.topk_ids == [[142], [132]]  # block position 2 of step 0, position 2 of step 1
    student = rows_from(served, BufferSettings(source="student"), seed=0)
    assert [r.input_ids for r in student] == [[1, 2, 5, 6, 7, 143], [1, 2, 5, 6, 3, 8, 9, 132]]
    assert [sum(r.loss_mask) for r in student] == [4, 3] and student[0].topk_ids == [[140], [141], [142], [143]]
    mixed = [rows_from(served, BufferSettings(source="mixed_token", mix=0.5), seed=s) for s in range(20)]
    assert {len(rows) for rows in mixed} >= {1, 2}  # per step, sometimes the proposal, sometimes the served path


def test_greedy_replay_counts_what_the_decoder_counts():
    # guesses right at 0, 1; wrong at 2; right at 3..5; max 6 new tokens, gamma 3
    steps, stats = replay_steps([10, 11, 12, 13, 14, 15], [[10, 11, 99, 13, 14, 15]] * 3, 3, 6)
    assert [s["start"] for s in steps] == [0, 3] and stats.accepted_per_step == [2, 2]
    assert steps[0]["drafts"] == [10, 11, 99] and stats.drafted == 3 + 2  # the last step drafts min(3, 6 - 3 - 1)
    assert stats.emitted == 6 and stats.steps == 2


def test_replay_equals_real_serving_and_updates_never_run_the_target(tiny_target, copy_of_target, tmp_path):
    """The frozen arm's per-request counts in replay mode equal real serving's; the spot checks agree; during an
    update the target never runs (what it learns from was stored at verification)."""
    phases = two_phases(tmp_path)
    common = dict(stream=phases, init_from=str(copy_of_target), decode=DecodeSettings(gamma=3, max_new_tokens=10),
                  max_prompt_tokens=64, max_seq_len=128, baselines=("frozen",),
                  schedule=ScheduleSettings(every_requests=2, steps=1, batch_size=2),
                  publish=PublishSettings(heldout_every=3, window=2, min_window=1), moving_window=2, plots=False)
    with updates_never_run(tiny_target.model):
        served = run_stage(stage_run(tmp_path, tiny_target, "serve"), OnlineSettings(mode="serve", **common), FKL)
        replay = run_stage(stage_run(tmp_path, tiny_target, "replay"),
                           OnlineSettings(mode="replay", spot_check_every=1, **common), FKL)
    keys = ("index", "phase", "drafted", "accepted", "steps", "emitted")
    for arm in ("frozen", "ours"):
        real = [{k: l[k] for k in keys} for l in stream_lines(tmp_path / "serve", arm)]
        assert real and real == [{k: l[k] for k in keys} for l in stream_lines(tmp_path / "replay", arm)]
    assert served["ours_updates"] >= 2 and served["frozen_updates"] == 0
    report = json.loads((tmp_path / "replay" / "online.partial" / "report.json").read_text())
    assert report["arms"]["ours"]["spot_checks"] == 12 and report["arms"]["ours"]["replay_mismatches"] == 0
    assert report["arms"]["frozen"]["lossless_checks"] == 0
    served_report = json.loads((tmp_path / "serve" / "online.partial" / "report.json").read_text())
    assert served_report["arms"]["frozen"]["lossless_checks"] == 12
    assert set(report["phases"]["ours"]) == {"a", "b"} and "| ours |" in report["table_markdown"]
    assert replay == served


@pytest.mark.parametrize("metric, check_on", [("tau", "heldout"), ("alpha", "heldout"), ("tau", "next")])
def test_a_harmful_update_is_rolled_back(tiny_target, copy_of_target, tmp_path, metric, check_on):
    """lr = 1 (Adam moves every weight by about 1 per step) wrecks a drafter that equals its target; the check (on
    held-out requests, or on the requests served after the candidate was made) sees τ (or α) fall and rolls back:
    the serving drafter keeps its weights and the trainer returns to them."""
    settings = OnlineSettings(stream=two_phases(tmp_path), init_from=str(copy_of_target), mode="replay",
                              decode=DecodeSettings(gamma=3, max_new_tokens=10), max_prompt_tokens=64,
                              max_seq_len=128, baselines=(),
                              schedule=ScheduleSettings(every_requests=2, steps=2, batch_size=2),
                              publish=PublishSettings(heldout_every=3, window=2, min_window=1, metric=metric,
                                                      tolerance=0.01, check_on=check_on),
                              optim=OptimSettings(lr=1.0, warmup_steps=0, min_lr_ratio=1.0), plots=False,
                              spot_check_every=0)
    before = {k: v.clone() for k, v in tiny_target.model.state_dict().items()}
    summary = run_stage(stage_run(tmp_path, tiny_target), settings, FKL)
    updates = [json.loads(l) for l in (tmp_path / "run" / "online.partial" / "arms" / "ours" / "updates.jsonl")
               .read_text().splitlines()]
    judged = [u for u in updates if "published" in u]  # next: a candidate is judged by the update after it
    assert len(judged) == len(updates) - (check_on == "next") >= 2
    assert summary["ours_rollbacks"] == len(judged) and summary["ours_version"] == 0
    assert all(u["candidate"] < u["serving"] - 0.01 and not u["published"] for u in judged)
    if check_on == "next":
        assert not any(line["heldout"] for line in stream_lines(tmp_path / "run", "ours"))  # every request trains
    from models.kinds import load_any
    final = load_any(tmp_path / "run" / "online.partial" / "model", tiny_target)
    for name, value in final.state_dict().items():
        assert torch.equal(value, before[name]), name  # what served after every rollback is the original drafter
    # the same update with a sane rate is published (within the tolerance: a drafter equal to its target can only
    # lose α, however little)
    sane = run_stage(stage_run(tmp_path, tiny_target, "sane"),
                     OnlineSettings(**{**vars(settings), "optim": OptimSettings(lr=1e-6, warmup_steps=0,
                                                                                 min_lr_ratio=1.0)}), FKL)
    assert sane["ours_version"] >= 1


def test_osd_arm_is_the_public_codes_online_path():
    (frozen, osd, ours) = arms_for(OnlineSettings(stream={"a": StreamPhase(source=PromptSourceSpec(
        name="x", format="jsonl", location="x"), count=1)}), FKL)
    assert (frozen.learn, osd.learn, ours.learn) == (False, True, True)
    assert osd.buffer.positions == "corrected" and osd.buffer.clear_after_update and osd.buffer.source == "teacher"
    assert (osd.schedule.every_requests, osd.schedule.steps) == (8, 1) and not osd.publish.check
    assert osd.optim.lr == 1e-4 and osd.optim.min_lr_ratio == 1.0 and list(osd.loss.terms) == ["fkl"]


@pytest.mark.parametrize("change, message", [
    ({"mode": "replay", "decode": {"sampling": {"temperature": 1.0}}}, "online.mode=replay replays greedy"),
    ({"decode": {"tree": (2, 2)}}, "online.decode: online serving drafts fixed γ chains"),
    ({"mode": "replay", "buffer": BufferSettings(source="student")}, "buffer.source=student"),
    ({"baselines": ("frozen", "medusa")}, "unknown ['medusa']"),
    ({"stream": {}}, "online.stream is empty"),
    ({"max_seq_len": 100}, "online.max_seq_len=100 is shorter"),
])
def test_settings_that_cannot_work_are_refused(change, message):
    phase = {"a": StreamPhase(source=PromptSourceSpec(name="x", format="jsonl", location="x"), count=1)}
    with pytest.raises(SettingsError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        OnlineSettings(**({"stream": phase} | change))


def test_recovery_counts_requests_until_an_arm_stays_ahead_of_the_frozen_drafter_on_the_same_requests():
    """Paired per request: an arm whose accepted tokens, summed from the phase's start, stay above the frozen
    drafter's from request 3 on recovers in 3; one that pulls ahead and then gives it all back never does; a single
    lucky request early does not count; the frozen arm itself has no recovery."""
    from train.online.report import phase_table

    def lines(accepted, phase="b", first=0):
        return [{"index": first + i, "phase": phase, "accepted": a, "drafted": 9, "emitted": a + 1, "steps": 3,
                 "acceptance": a / 9} for i, a in enumerate(accepted)]

    frozen = lines([3, 3, 3, 3, 3, 3])
    logs = {"frozen": frozen, "ahead": lines([3, 2, 5, 4, 3, 4]), "gives_back": lines([5, 5, 3, 1, 1, 3]),
            "lucky_once": lines([9, 0, 0, 0, 0, 3]), "level": lines([3, 3, 3, 3, 3, 3])}
    table = phase_table(logs, ["b"], width=2)
    assert {arm: table[arm]["b"]["recovery_requests"] for arm in logs} == {
        "frozen": None, "ahead": 3, "gives_back": None, "lucky_once": None, "level": None}


def test_domains_of_first_turns():
    assert domain_of("Explain quantum computing in simple terms") == "english"
    assert domain_of("알고 있는 것을 최대한 설명 해 줘서 고마워!") == "other_language"
    assert domain_of("fix this:\n```python\nprint(1)\n```") == "code"
    assert domain_of("import os\ndef main():\n    pass") == "code"


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_exactly(tiny_target, copy_of_target, tmp_path):
    """kill -9 once ours has checkpointed, rerun: the logs, updates and final drafter equal an uninterrupted run's,
    and no request is counted twice."""
    a = prompts_file(tmp_path, "a", TINY_PROMPTS)
    args = ["+experiment=smoke", "logger=none", "stages=[online]", f"online.init_from={copy_of_target}",
            "~online.stream.other_languages", "~online.stream.code", "~online.stream.mtbench_math_code_reasoning",
            "~online.stream.english_again", "online.stream.english.source.format=jsonl",
            f"online.stream.english.source.location={a.location}", "online.stream.english.source.file=null",
            "online.stream.english.source.shuffle_seed=null", "online.stream.english.source.offset=0", "online.stream.english.domain=any",
            "online.stream.english.count=10", "online.decode.max_new_tokens=24", "online.schedule.every_requests=1",
            "online.schedule.steps=2", "online.schedule.batch_size=2", "online.publish.heldout_every=2",
            "online.publish.min_window=1", "online.optim.lr=1e-4", "online.plots=false", "online.baselines=[]"]
    env = dict(os.environ, DRAFTSMITH_CACHE=str(tmp_path / "cache"))

    def command(root):
        return [sys.executable, "train/run.py", *args, f"runs_root={root}"]

    reference = subprocess.run(command(tmp_path / "reference"), cwd=REPO_ROOT, env=env, capture_output=True,
                               text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    checkpoints = tmp_path / "killed" / "smoke" / "default" / "online.partial" / "arms" / "ours" / "checkpoints"
    process = subprocess.Popen(command(tmp_path / "killed"), cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not any(int(STEP_FOLDER.fullmatch(p.name).group(1)) >= 4
                                             for p in checkpoints.glob("step-*")
                                             if STEP_FOLDER.fullmatch(p.name) and (p / MANIFEST).exists()):
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_dir = tmp_path / "killed" / "smoke" / "default"
    assert not (killed_dir / "online").exists(), "the kill must land mid-run"
    resumed = subprocess.run(command(tmp_path / "killed"), cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[online] ours: resuming from" in resumed.stdout
    reference_dir = tmp_path / "reference" / "smoke" / "default"

    def logged(run_dir, name):
        lines = [json.loads(l) for l in (run_dir / "online" / "arms" / "ours" / name).read_text().splitlines()]
        return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]

    assert logged(killed_dir, "stream.jsonl") == logged(reference_dir, "stream.jsonl")
    assert [l["index"] for l in logged(killed_dir, "stream.jsonl")] == list(range(10))  # each request once
    assert logged(killed_dir, "updates.jsonl") == logged(reference_dir, "updates.jsonl")
    assert len(logged(killed_dir, "updates.jsonl")) >= 4
    from safetensors.torch import load_file
    assert all(torch.equal(x, y) for x, y in zip(
        load_file(killed_dir / "online" / "model" / "model.safetensors").values(),
        load_file(reference_dir / "online" / "model" / "model.safetensors").values()))


def test_updates_follow_the_token_schedule(tiny_target, copy_of_target, tmp_path):
    """every_tokens: an update once the buffered requests hold that many generated tokens (held-out ones aside)."""
    settings = OnlineSettings(stream=two_phases(tmp_path), init_from=str(copy_of_target), mode="replay",
                              decode=DecodeSettings(gamma=3, max_new_tokens=10), max_prompt_tokens=64,
                              max_seq_len=128, baselines=(),
                              schedule=ScheduleSettings(every_requests=1, every_tokens=25, steps=1, batch_size=2),
                              publish=PublishSettings(check=False), plots=False, spot_check_every=0)
    run_stage(stage_run(tmp_path, tiny_target), settings, FKL)
    arm = tmp_path / "run" / "online.partial" / "arms" / "ours"
    served = [json.loads(l) for l in (arm / "stream.jsonl").read_text().splitlines()]
    updates = [json.loads(l) for l in (arm / "updates.jsonl").read_text().splitlines()]
    expected, pending = [], 0
    for line in served:
        pending += line["emitted"]
        if pending >= 25:
            expected.append(line["index"])
            pending = 0
    assert [u["after_request"] for u in updates] == expected and len(expected) >= 2


def test_a_rejected_candidate_falls_back_to_the_starting_drafter_when_that_is_better(tiny_target):
    """fallback_to_base: the serving drafter went bad (noise, as after a run of updates that fit an old domain),
    the new candidate is no better, and the starting drafter wins on the window: it serves again, as a new version,
    and the trainer restarts from it."""
    from eval.decoder import plain_generate
    from train.core.rows import Row

    model = tiny_target.model
    prompts = [tiny_target.tokenizer.encode(t) for t in TINY_PROMPTS[:4]]
    answers = plain_generate(model, prompts, DecodeSettings(max_new_tokens=10), [])
    window = [Served(f"w{i}", i, "a", p, a, []) for i, (p, a) in enumerate(zip(prompts, answers))]
    with torch.no_grad():
        scores = [torch.log_softmax(model(torch.tensor([p + a])).logits[0, len(p) - 1: -1], -1).topk(4)
                  for p, a in zip(prompts, answers)]
    rows = [Row(id=f"r{i}", input_ids=p + a, loss_mask=[0] * len(p) + [1] * len(a), prompt_ids=p,
                topk_ids=s.indices.tolist(), topk_logprobs=s.values.tolist())
            for i, (p, a, s) in enumerate(zip(prompts, answers, scores))]
    settings = OnlineSettings(stream=two_phases_stub(), decode=DecodeSettings(gamma=3, max_new_tokens=10),
                              max_prompt_tokens=64, max_seq_len=128)
    arm = Arm("ours", True, BufferSettings(), ScheduleSettings(every_requests=1, steps=2, batch_size=2),
              PublishSettings(metric="tau", fallback_to_base=True, min_window=1),
              OptimSettings(lr=1.0, warmup_steps=0, min_lr_ratio=1.0), FKL)
    pad_id = tiny_target.tokenizer.eos_token_id
    state = ArmState(arm, copy.deepcopy(model), settings, TokenLearner(model, 3, 128, pad_id), pad_id)
    with torch.no_grad():
        for parameter in list(state.serving.parameters()) + list(state.trainer.parameters()):
            parameter.copy_(torch.randn_like(parameter))
    state.window = window
    state.buffer.add(rows, "t")
    line = state.update(7)
    assert not line["published"] and line["reverted_to_base"] and line["base"] > max(line["serving"], line["candidate"])
    assert state.counters["version"] == 1 and state.counters["reverted_to_base"] == 1
    for (name, serving), trainer in zip(state.serving.state_dict().items(), state.trainer.state_dict().values()):
        assert torch.equal(serving, model.state_dict()[name]) and torch.equal(trainer, serving), name


def two_phases_stub():
    return {"a": StreamPhase(source=PromptSourceSpec(name="x", format="jsonl", location="x"), count=1)}


def test_a_label_loss_with_the_drafters_own_proposals_is_refused(tiny_target, tmp_path):
    from losses.ce import cross_entropy
    settings = OnlineSettings(stream=two_phases_stub(), buffer=BufferSettings(source="mixed_request"))
    with pytest.raises(SettingsError, match=r"loss terms \['ce'\] learn the next token"):
        run_stage(stage_run(tmp_path, tiny_target), settings, LossMix({"ce": {"fn": cross_entropy, "weight": 1.0}}))


# ---------------------------------------------------------------- feature drafters (EAGLE-3) online

EAGLE3 = dict(feature_layers=(0, 1), draft_vocab_size=96, layout="eagle3")
EAGLE3_LOSS = dict(feature_weight=0.0, token_weight=1.0, unroll=3)


@pytest.fixture(scope="module")
def eagle3_drafter(tiny_target, records_dir, tmp_path_factory):
    """An EAGLE-3 drafter distilled briefly on the tiny target's answers: right often enough, at several depths, for
    replay to be checked against serving (a fresh one is accepted ~never)."""
    from losses.feature import FeatureLoss
    from models.feature_drafter import FeatureDrafterSpec, build_feature_drafter
    from train.distill import DistillSettings, distill
    from train.core.rows import read_rows

    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    out = tmp_path_factory.mktemp("eagle3")
    answers = [row.input_ids for row in read_rows(records_dir, "online")]
    drafter = build_feature_drafter(FeatureDrafterSpec(**EAGLE3), model, answers)
    distill(drafter, model, tokenizer, records_dir, FeatureLoss(**EAGLE3_LOSS),
            DistillSettings(epochs=60, batch_size=2, heldout_records=2, train_on="all",
                            optim=OptimSettings(lr=1e-2, warmup_steps=2)), out, quiet_tracker(out),
            stop_ids=[tokenizer.eos_token_id])
    return out / "last"


def test_feature_drafter_replay_is_what_serving_drafts_at_every_depth(tiny_target, eagle3_drafter):
    """Greedy replay of an EAGLE-3 drafter (one unrolled forward per request) gives, step by step, the drafts and
    accepted counts the real decoder records; deeper drafts read the drafter's own features, so a depth-blind
    replay (a token drafter's) would differ."""
    from models.kinds import draft_for, load_any
    from train.online.learners import learner_for

    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    drafter = load_any(eagle3_drafter, tiny_target)
    prompts = [tokenizer.encode(text) for text in TINY_PROMPTS]
    settings = DecodeSettings(gamma=3, max_new_tokens=16, batch_size=1)
    from eval.decoder import plain_generate
    answers = plain_generate(model, prompts, settings, [tokenizer.eos_token_id])
    items = [(str(i), p, a) for i, (p, a) in enumerate(zip(prompts, answers))]
    learner = learner_for(drafter, model, 3, 128, tokenizer.eos_token_id, items)
    guesses = learner.guesses(drafter, items)
    assert any(g[0] != g[1] for g in guesses), "depths agree everywhere: the test would not see a depth-blind replay"
    deep = 0
    for (key, prompt, answer), per_depth in zip(items, guesses):
        recorder = VerificationRecorder(1, top_k=2)
        generation = speculative_generate(model, draft_for(drafter, model), [prompt], settings, [tokenizer.eos_token_id],
                                          recorder=recorder)[0]
        assert generation.tokens == answer
        steps, stats = replay_steps(answer, per_depth, 3, settings.max_new_tokens)
        real = recorder.steps[0]
        assert [s["start"] for s in steps] == [s["start"] for s in real], key
        for mine, theirs in zip(steps, real):
            assert theirs["drafts"][: len(mine["drafts"])] == mine["drafts"], (key, mine["start"])
            deep += mine["accepted"] >= 1 and len(mine["drafts"]) > 1
        assert (stats.drafted, stats.accepted, stats.emitted) == (generation.stats.drafted, generation.stats.accepted,
                                                                  generation.stats.emitted)
    assert deep > 0  # drafts at depth ≥ 2 were compared


@pytest.mark.parametrize("metric", ["tau", "alpha"])
def test_a_feature_drafter_learns_online_in_replay(tiny_target, eagle3_drafter, tmp_path, metric):
    """The whole stage with an EAGLE-3 drafter: every request spot-checked against real serving (no mismatch),
    updates publish or roll back by the window check, the target's layers never run during an update, and the
    final drafter saves as a feature drafter."""
    from losses.feature import FeatureLoss
    from models.kinds import kind_of, load_any

    settings = OnlineSettings(stream=two_phases(tmp_path), init_from=str(eagle3_drafter), mode="replay",
                              decode=DecodeSettings(gamma=3, max_new_tokens=12), max_prompt_tokens=64,
                              max_seq_len=128, spot_check_every=1,
                              schedule=ScheduleSettings(every_requests=2, steps=2, batch_size=2),
                              publish=PublishSettings(heldout_every=3, window=2, min_window=1, metric=metric),
                              optim=OptimSettings(lr=1e-3, warmup_steps=0, min_lr_ratio=1.0), moving_window=2,
                              plots=False)
    with updates_never_run(tiny_target.model):
        summary = run_stage(stage_run(tmp_path, tiny_target), settings, FeatureLoss(**EAGLE3_LOSS))
    report = json.loads((tmp_path / "run" / "online.partial" / "report.json").read_text())
    for arm in ("frozen", "osd", "ours"):
        assert report["arms"][arm]["spot_checks"] == 12 and report["arms"][arm]["replay_mismatches"] == 0, arm
    assert summary["ours_updates"] >= 3 and summary["osd_updates"] == 1 and summary["frozen_updates"] == 0
    updates = [json.loads(l) for l in (tmp_path / "run" / "online.partial" / "arms" / "ours" / "updates.jsonl")
               .read_text().splitlines()]
    assert all(u["metric"] == metric and all(loss is not None for loss in u["losses"]) for u in updates)
    saved = load_any(tmp_path / "run" / "online.partial" / "model", tiny_target)
    assert kind_of(saved).name == "feature" and saved.spec.draft_vocab_size == 96


def test_feature_drafters_are_refused_where_they_cannot_learn(tiny_target, eagle3_drafter, tmp_path):
    from losses.feature import FeatureLoss

    common = dict(stream=two_phases(tmp_path), init_from=str(eagle3_drafter), max_prompt_tokens=64, max_seq_len=128)
    with pytest.raises(SettingsError, match="online.mode=serve with the feature drafter"):
        run_stage(stage_run(tmp_path, tiny_target), OnlineSettings(mode="serve", **common), FeatureLoss(**EAGLE3_LOSS))
    with pytest.raises(SettingsError, match="a feature drafter learns online with a feature loss"):
        run_stage(stage_run(tmp_path, tiny_target), OnlineSettings(mode="replay", **common), FKL)


def test_the_stream_passes_over_conversations_the_drafter_trained_on(tmp_path):
    """A domain's scan can reach the slice distill took corpus conversations from (distill.corpus_records): those
    are passed over and counted, found from the distill stage's recorded config."""
    from data_gen.stream import build_stream
    from train.online.stage import corpus_trained_on, distilled_on

    source = prompts_file(tmp_path, "a", TINY_PROMPTS)
    distill_dir = tmp_path / "run" / "distill"
    distill_dir.mkdir(parents=True)
    corpus = {"_target_": "data_gen.sources.PromptSourceSpec", "name": "corpus", "format": "jsonl",
              "location": source.location, "shuffle_seed": None}
    (distill_dir / "meta.json").write_text(json.dumps({"config": {"distill": {"corpus_records": 3},
                                                                  "corpus": corpus}}))
    run = stage_run(tmp_path, None)
    trained_on = corpus_trained_on(distilled_on(run))
    assert {i for _, _, i in trained_on} == {"a0", "a1", "a2"}
    requests, report = build_stream({"chat": StreamPhase(source=source, count=4)}, tmp_path / "cache",
                                    trained_on=trained_on)
    assert [r.conversation.id for r in requests] == ["a3", "a4", "a5", "a6"]
    assert report.phases[0]["passed_over"] == {"in the drafter's training data": 3}



def test_a_malformed_stream_line_names_the_phases_key_and_a_skip_is_counted(tmp_path):
    """The error's hint is the setting that exists (online.stream.<phase>.source.bad_records; data.bad_records is
    not one); with it, the skipped lines are counted in the stream's report, with the first of them named."""
    from dataclasses import replace

    from data_gen.sources import SourceFormatError
    from data_gen.stream import build_stream

    source = prompts_file(tmp_path, "a", TINY_PROMPTS[:6])
    lines = Path(source.location).read_text().splitlines()
    Path(source.location).write_text("\n".join(lines[:2] + ["{not json", "[1, 2]"] + lines[2:]) + "\n")
    with pytest.raises(SourceFormatError, match=r"a\.jsonl:3: .*set online\.stream\.chat\.source\.bad_records="
                                                r"skip"):
        build_stream({"chat": StreamPhase(source=source, count=4)}, tmp_path / "cache")
    skipping = replace(source, bad_records="skip")
    requests, report = build_stream({"chat": StreamPhase(source=skipping, count=4),
                                     "more": StreamPhase(source=skipping, count=2)}, tmp_path / "cache")
    assert len(requests) == 6 and sum(report.phases[0]["source_skipped"].values()) == 2
    assert report.phases[1]["source_skipped"] == {}  # the shared source is counted once
    assert "its source skipped" in report.summary() and "a.jsonl:3" in report.summary()

def distilled_run(tmp_path, drafter_folder, records_dir, max_seq_len=48, heldout=2, summary=None):
    """A run folder whose distill stage produced `drafter_folder` from `records_dir` (its meta.json as distill writes
    it: the settings and summary rehearsal reads)."""
    run_dir = tmp_path / "run"
    shutil.copytree(records_dir, run_dir / "data_gen")
    (run_dir / "data_gen" / "meta.json").write_text("{}")
    shutil.copytree(drafter_folder, run_dir / "distill" / "model")
    (run_dir / "distill" / "meta.json").write_text(json.dumps({"config": {"distill": {
        "heldout_records": heldout, "max_seq_len": max_seq_len, "corpus_records": 0}}, "summary": summary or {}}))
    return run_dir


def test_rehearsal_batches_hold_the_rows_the_drafter_was_distilled_on(tiny_target, copy_of_target, records_dir,
                                                                      tmp_path, monkeypatch):
    """buffer.rehearsal_share: that share of every batch of ours comes from distill's training rows (its held-out rows
    never), cut as distill cut them, each with the target's top-k at its scored positions; the draws are seeded by
    update and step (a resumed run draws the same), and the reference arms never rehearse."""
    from train.online.learners import answer_logits
    from train.core.rows import read_rows, split_heldout

    distilled_run(tmp_path, copy_of_target, records_dir)
    seen = []
    real_step = ArmState.train_step
    monkeypatch.setattr(ArmState, "train_step", lambda self, rows: seen.append((self.arm.name, rows)) or
                        real_step(self, rows))
    settings = OnlineSettings(stream=two_phases(tmp_path), mode="replay",
                              decode=DecodeSettings(gamma=3, max_new_tokens=10),
                              max_prompt_tokens=64, max_seq_len=128, spot_check_every=0, plots=False,
                              buffer=BufferSettings(positions="all", rehearsal_share=0.5),
                              schedule=ScheduleSettings(every_requests=2, steps=2, batch_size=4),
                              publish=PublishSettings(check=False))
    report = json.loads(json.dumps(run_stage(stage_run(tmp_path, tiny_target), settings, FKL)))
    trained, heldout = split_heldout(read_rows(records_dir, "online"), 2)
    trained_ids, heldout_ids = {r.id for r in trained}, {r.id for r in heldout}
    ours = [rows for arm, rows in seen if arm == "ours"]
    assert len(ours) == 2 * report["ours_updates"] >= 8
    for rows in ours:
        drawn = [r for r in rows if r.id in trained_ids | heldout_ids]
        assert len(drawn) == 2 and not {r.id for r in drawn} & heldout_ids
        for row in drawn:
            assert len(row.input_ids) <= 48 and len(row.topk_ids) == row.loss_positions(128)
    assert all(not {r.id for r in rows} & trained_ids for arm, rows in seen if arm == "osd")
    assert any(len(r.input_ids) > 48 for r in trained)  # so cutting is seen
    row = next(r for rows in ours for r in rows if r.id in trained_ids)
    answer = row.input_ids[len(row.prompt_ids):]
    expected = answer_logits(tiny_target.model, [(row.id, row.prompt_ids, answer)], 128, 0)[0]
    assert row.topk_ids[-len(answer):] == expected.topk(20, -1).indices.tolist()
    state = ArmState(Arm("ours", True, settings.buffer, settings.schedule, settings.publish, settings.optim, FKL),
                     copy.deepcopy(tiny_target.model), settings, TokenLearner(tiny_target.model, 3, 128, 0), 0, trained)
    assert [r.id for r in state.batch("3:1")] == [r.id for r in state.batch("3:1")] != [r.id for r in
                                                                                       state.batch("3:0")]


def test_rehearsal_is_refused_without_the_rows_the_drafter_was_distilled_on(tiny_target, copy_of_target, tmp_path):
    settings = OnlineSettings(stream=two_phases(tmp_path), init_from=str(copy_of_target), mode="replay",
                              max_prompt_tokens=64, max_seq_len=128, buffer=BufferSettings(rehearsal_share=0.5))
    with pytest.raises(SettingsError, match=r"online.buffer.rehearsal_share=0.5: .*online.init_from is set"):
        run_stage(stage_run(tmp_path, tiny_target), settings, FKL)


def test_feature_rehearsal_reads_distills_feature_cache(tiny_target, eagle3_drafter, records_dir, tmp_path, capsys):
    """A feature drafter's rehearsal rows take their target features from distill's cache (fp16, as distill trained
    on them) where it holds them at the row's length, and compute the rest: the two agree to fp16 rounding."""
    from models.kinds import load_any
    from train.core.feature_cache import FeatureCache, build_or_load
    from train.online.learners import FeatureLearner
    from train.core.rows import read_rows

    model = tiny_target.model
    drafter = load_any(eagle3_drafter, tiny_target)
    rows = read_rows(records_dir, "online")
    build_or_load(model, rows[:3], drafter.feature_layers, 128, 0, tmp_path / "features")
    computed = FeatureLearner(model, 3, 128, 0, FeatureCache({}), drafter.feature_layers)
    computed.rehearse(rows, 20, None)
    cached = FeatureLearner(model, 3, 128, 0, FeatureCache({}), drafter.feature_layers)
    cached.rehearse(rows, 20, tmp_path / "features")
    assert f"{3} rows from {tmp_path / 'features'}, {len(rows) - 3} computed" in capsys.readouterr().out
    for row in rows:
        for mine, theirs in zip(cached.features.entries[row.id], computed.features.entries[row.id]):
            assert mine.shape == theirs.shape
            torch.testing.assert_close(mine.float(), theirs.float(), atol=2e-2, rtol=1e-2)
    assert cached.features.entries[rows[0].id][1].dtype == torch.float16  # read from the cache, not recomputed


def test_feature_rehearsal_finds_the_cache_where_distill_recorded_it(tiny_target, eagle3_drafter, records_dir,
                                                                     tmp_path, capsys):
    """The stage reads the feature cache from the folder distill's summary names (relative to the distill folder,
    as distill records it), and computes nothing it holds."""
    from losses.feature import FeatureLoss
    from models.kinds import load_any
    from train.core.feature_cache import build_or_load
    from train.core.rows import read_rows, split_heldout

    run_dir = distilled_run(tmp_path, eagle3_drafter, records_dir, summary={"feature_cache_folder": "kept"})
    drafter = load_any(eagle3_drafter, tiny_target)
    trained, _ = split_heldout(read_rows(records_dir, "online"), 2)
    build_or_load(tiny_target.model, trained, drafter.feature_layers, 48, 0, run_dir / "distill" / "kept")
    settings = OnlineSettings(stream=two_phases(tmp_path), mode="replay",
                              decode=DecodeSettings(gamma=3, max_new_tokens=8),
                              max_prompt_tokens=64, max_seq_len=128, spot_check_every=0, plots=False,
                              buffer=BufferSettings(rehearsal_share=0.5),
                              schedule=ScheduleSettings(every_requests=4, steps=1, batch_size=2))
    run_stage(stage_run(tmp_path, tiny_target), settings, FeatureLoss(**EAGLE3_LOSS))
    assert f"{len(trained)} rows from {run_dir / 'distill' / 'kept'}, 0 computed" in capsys.readouterr().out
