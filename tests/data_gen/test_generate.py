"""Stage data_gen on the tiny target: records, multi-turn, seeds, top-k storage, on-policy, workers, accounting."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import data_gen.generate as data_gen_module
from data_gen.chat import end_of_turn_ids, prompt_token_ids
from data_gen.generate import GenerationSettings, ShardsPending, WorkerSettings, generate
from data_gen.shards import load_records, read_shard, shard_path
from data_gen.sources import Conversation
from infra.tracking import LoggerSettings, Tracker
from models.drafter import DrafterSpec, build_drafter, save_drafter
from models.sampling import SamplingSettings, request_seed

QUESTIONS = ["hello there", "a much longer question " * 3, "what is 2+2?", "name three colours", "why?",
             "tell me a story about a cat", "count to five", "what is the capital of France?"]


def conversation(i: int, *turns: str) -> Conversation:
    messages = []
    for n, text in enumerate(turns):
        messages.append({"role": "user" if n % 2 == 0 else "assistant", "content": text})
    return Conversation(id=f"c{i}", source="test", messages=messages)


def run(tiny_target, conversations, out_dir, worker=WorkerSettings(), drafter=None, **overrides):
    settings = GenerationSettings(**({"max_new_tokens": 12, "max_prompt_tokens": 200, "batch_size": 3} | overrides))
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(LoggerSettings(backend="none", mode="disabled"), out_dir, "data_gen", {})
    report = generate(tiny_target.model, tiny_target.tokenizer, conversations, settings, out_dir, tracker,
                      worker=worker, drafter=drafter)
    return report, list(load_records(out_dir))


def plain_greedy(model, prompt, max_new_tokens, stop_ids, pad_id):
    output = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=stop_ids, pad_token_id=pad_id)
    return output[0, len(prompt):].tolist()


def test_first_turn_records_match_plain_greedy_and_skips_are_counted(tiny_target, tmp_path):
    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    conversations = [conversation(0, "hello there"), conversation(1, "a much longer question " * 3),
                     conversation(2, "hello there"),  # duplicate prompt
                     conversation(3, "x" * 500)]       # longer than max_prompt_tokens
    report, rows = run(tiny_target, conversations, tmp_path)
    assert report["skipped"] == {"duplicate prompt": 1, "prompt longer than max_prompt_tokens=200": 1}
    assert [r["id"] for r in rows] == ["test/c0/0", "test/c1/0"]  # plan order, whatever the batching
    stop_ids = end_of_turn_ids(tokenizer, model.generation_config)
    for row, source in zip(rows, conversations):
        prompt = prompt_token_ids(tokenizer, source.messages)
        assert row["prompt_ids"] == prompt and row["input_ids"] == prompt + row["response_ids"]
        assert row["loss_mask"] == [0] * len(prompt) + [1] * len(row["response_ids"])
        expected = plain_greedy(model, prompt, 12, stop_ids, tokenizer.pad_token_id)
        assert row["response_ids"] == expected[: len(row["response_ids"])]
        assert (row["finish_reason"] == "length") == ("hit_max_new_tokens" in row["flags"])
        assert row["sampling"]["max_new_tokens"] == 12 and row["generator"] == "target" and row["turns"] == 1
    assert report["records"] == 2 and (tmp_path / "response_lengths.png").stat().st_size > 1000
    assert json.loads((tmp_path / "manifest.json").read_text())["records"] == 2


def test_truncate_mode_keeps_overlong_prompts_within_the_limit(tiny_target, tmp_path):
    report, rows = run(tiny_target, [conversation(0, "x" * 500), conversation(1, "short")], tmp_path,
                       overlong_prompt="truncate")
    assert report["flagged"]["prompt truncated to max_prompt_tokens"] == 1 and report["records"] == 2
    assert len(rows[0]["prompt_ids"]) <= 200 and "prompt" not in json.dumps(report["skipped"])


def test_all_turns_regenerated_on_the_targets_own_answers(tiny_target, tmp_path):
    """turns=all: the second answer is conditioned on the target's first answer (not the dataset's), and the loss
    mask covers both answers exactly."""
    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    stop_ids = end_of_turn_ids(tokenizer, model.generation_config)
    source = conversation(0, "hi", "ORIGINAL ANSWER", "and then?", "ORIGINAL 2")
    _, [row] = run(tiny_target, [source], tmp_path / "all", turns="all", max_new_tokens=10)
    first = plain_greedy(model, prompt_token_ids(tokenizer, source.messages[:1]), 10, stop_ids,
                         tokenizer.pad_token_id)
    first_text = tokenizer.decode(first[:-1] if first[-1] in stop_ids else first)
    history = [source.messages[0], {"role": "assistant", "content": first_text}, source.messages[2]]
    assert row["turns"] == 2 and row["prompt_ids"] == prompt_token_ids(tokenizer, history)
    assert "ORIGINAL" not in tokenizer.decode(row["input_ids"])
    masked = [i for i, m in enumerate(row["loss_mask"]) if m]
    spans = np.split(masked, np.where(np.diff(masked) > 1)[0] + 1)
    assert len(spans) == 2  # the first answer inside the prompt, the final response
    assert tokenizer.decode([row["input_ids"][i] for i in spans[0]]) == first_text + tokenizer.eos_token
    assert [row["input_ids"][i] for i in spans[1]] == row["response_ids"]
    second = plain_greedy(model, row["prompt_ids"], 10, stop_ids, tokenizer.pad_token_id)
    assert row["response_ids"] == second[: len(row["response_ids"])]

    _, [last] = run(tiny_target, [source], tmp_path / "last", turns="last", max_new_tokens=10)
    assert "ORIGINAL ANSWER" in tokenizer.decode(last["prompt_ids"])  # the dataset's history, not regenerated
    assert sum(last["loss_mask"]) == len(last["response_ids"]) and last["turns"] == 1


def test_sampled_records_do_not_depend_on_batching_or_sharding(tiny_target, tmp_path):
    conversations = [conversation(i, q) for i, q in enumerate(QUESTIONS)]
    sampling = dict(sampling=SamplingSettings(temperature=1.0, top_p=0.9, top_k=50), samples_per_prompt=2)
    _, a = run(tiny_target, conversations, tmp_path / "a", batch_size=1, shard_size=3, **sampling)
    _, b = run(tiny_target, conversations, tmp_path / "b", batch_size=5, shard_size=100, **sampling)
    assert len(a) == 16 and [r["response_ids"] for r in a] == [r["response_ids"] for r in b]
    assert a[0]["response_ids"] != a[1]["response_ids"]  # two samples of one prompt differ
    assert a[1]["sampling"]["seed"] == request_seed(0, "test/c0/1/turn0")
    _, c = run(tiny_target, conversations, tmp_path / "c", seed=1, **sampling)
    assert [r["response_ids"] for r in a] != [r["response_ids"] for r in c]


def test_topk_logprobs_round_trip(tiny_target, tmp_path):
    model = tiny_target.model
    conversations = [conversation(i, q) for i, q in enumerate(QUESTIONS[:4])]
    _, rows = run(tiny_target, conversations, tmp_path, top_k_logprobs=5)
    table, _ = read_shard(shard_path(tmp_path, 0))
    assert str(table.schema.field("topk_logprobs").type) == "list<item: fixed_size_list<item: halffloat>[5]>"
    for row in rows:
        ids, logprobs = np.array(row["topk_ids"]), np.array(row["topk_logprobs"], dtype=np.float32)
        positions = [t - 1 for t, m in enumerate(row["loss_mask"]) if m]
        assert ids.shape == logprobs.shape == (len(positions), 5)
        with torch.inference_mode():
            full = torch.log_softmax(model(torch.tensor([row["input_ids"]])).logits[0].float(), dim=-1)
        expected = torch.topk(full[positions], 5, dim=-1)
        assert (ids == expected.indices.numpy()).all()
        assert np.allclose(logprobs, expected.values.numpy(), atol=2e-2, rtol=1e-3)  # fp16 storage
        assert (ids[:, 0] == np.array(row["response_ids"])).all()  # greedy answers are the target's argmax


def test_on_policy_mixture_uses_the_drafter_checkpoint(tiny_target, tmp_path):
    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    drafter = build_drafter(DrafterSpec(name="d", hidden_size=32, num_layers=1, num_heads=2,
                                        num_kv_heads=2, intermediate_size=64),
                            model, tokenizer)
    save_drafter(drafter, tokenizer, tmp_path / "drafter")
    conversations = [conversation(i, q) for i, q in enumerate(QUESTIONS)]
    _, rows = run(tiny_target, conversations, tmp_path / "out", drafter=drafter,
                  on_policy_drafter=str(tmp_path / "drafter"), on_policy_ratio=0.5, top_k_logprobs=3)
    expected = {r["id"]: request_seed(0, f"{r['id']}/policy") / 2 ** 63 < 0.5 for r in rows}
    assert {r["id"]: r["generator"] == "drafter" for r in rows} == expected
    assert 0 < sum(expected.values()) < len(rows)
    stop_ids = end_of_turn_ids(tokenizer, model.generation_config)
    for row in rows:
        author = drafter if row["generator"] == "drafter" else model
        reference = plain_greedy(author, row["prompt_ids"], 12, stop_ids, tokenizer.pad_token_id)
        assert row["response_ids"] == reference[: len(row["response_ids"])]
        assert len(row["topk_ids"]) == len(row["response_ids"])  # the target scores the drafter's answer too


def test_two_workers_make_the_same_records_as_one(tiny_target, tmp_path):
    conversations = [conversation(i, q) for i, q in enumerate(QUESTIONS)]
    _, single = run(tiny_target, conversations, tmp_path / "single", shard_size=2)
    with pytest.raises(ShardsPending, match=r"shards \[1, 3\]"):
        run(tiny_target, conversations, tmp_path / "pair", worker=WorkerSettings(0, 2), shard_size=2)
    assert not (tmp_path / "pair" / "manifest.json").exists()
    report, pair = run(tiny_target, conversations, tmp_path / "pair", worker=WorkerSettings(1, 2), shard_size=2)
    assert pair == single and report["records"] == 8


def test_refuses_to_start_when_the_disk_is_too_small(tiny_target, tmp_path, monkeypatch):
    usage = dataclasses.make_dataclass("Usage", ["total", "used", "free"])
    monkeypatch.setattr(data_gen_module.shutil, "disk_usage", lambda path: usage(10_000, 9_000, 1_000))
    with pytest.raises(OSError, match=r"estimated disk use: .* Not enough space"):
        run(tiny_target, [conversation(0, "hello")], tmp_path, max_new_tokens=200, top_k_logprobs=20)
    assert not (tmp_path / "shards").exists()


def test_dry_run_plans_without_generating(tiny_target, tmp_path):
    with pytest.raises(ShardsPending, match="dry run"):
        run(tiny_target, [conversation(0, "hello"), conversation(1, "hello")], tmp_path, dry_run=True)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["jobs"] == 1 and plan["skipped"] == {"duplicate prompt": 1} and not (tmp_path / "shards").exists()


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="data_gen.turns='every'"):
        GenerationSettings(turns="every")
    with pytest.raises(ValueError, match="temperature > 0"):
        GenerationSettings(samples_per_prompt=4)
    with pytest.raises(ValueError, match="on_policy_drafter"):
        GenerationSettings(on_policy_ratio=0.3)


def test_static_cache_gives_the_same_records_as_the_dynamic_one(tiny_target, tmp_path):
    conversations = [conversation(i, q) for i, q in enumerate(QUESTIONS)]
    sampling = dict(max_new_tokens=20, sampling=SamplingSettings(temperature=1.0), batch_size=4)  # ragged prompts, per-row generators
    _, dynamic = run(tiny_target, conversations, tmp_path / "dynamic", **sampling)
    _, static = run(tiny_target, conversations, tmp_path / "static", cache="static", **sampling)
    assert len({len(r["prompt_ids"]) for r in dynamic}) > 4
    assert static == dynamic


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_rows_that_stop_early_leave_the_batch_without_changing_the_others(tiny_target, cache):
    """Stop on a token the tiny model emits often, so rows of one batch finish at different steps; every row must
    equal what it gets alone in a batch of one."""
    from collections import Counter as Tally

    from data_gen.backends import HFBackend, Request

    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    requests = [Request(str(i), prompt_token_ids(tokenizer, [{"role": "user", "content": q}]), i)
                for i, q in enumerate(QUESTIONS)]
    sampling = SamplingSettings()
    free_running = HFBackend(model, tokenizer.pad_token_id, [-1], sampling, 24, 8, cache, progress=False)
    common = Tally(t for c in free_running.generate(requests) for t in c.token_ids).most_common(1)[0][0]
    batched = HFBackend(model, tokenizer.pad_token_id, [common], sampling, 24, 8, cache, progress=False)
    alone = HFBackend(model, tokenizer.pad_token_id, [common], sampling, 24, 1, cache, progress=False)
    together, single = batched.generate(requests), alone.generate(requests)
    assert len({len(c.token_ids) for c in together if c.finish_reason == "stop"}) > 1  # ragged stops
    assert any(c.finish_reason == "length" for c in together)
    assert together == single
