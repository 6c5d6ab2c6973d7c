"""Stage data_gen on the tiny target: records, loss masks and the accounting of what was skipped."""
from __future__ import annotations

import json

import torch
from datasets import load_from_disk

from data_gen.generate import GenerationSettings, chat_token_ids, end_of_turn_ids, generate, prompt_token_ids
from data_gen.sources import Conversation
from train.tracking import LoggerSettings, Tracker


def conversation(i: int, text: str) -> Conversation:
    return Conversation(id=f"c{i}", source="test", messages=[{"role": "user", "content": text}])


def test_generate_writes_prompt_response_and_assistant_only_mask(tiny_target, tmp_path):
    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    conversations = [conversation(0, "hello there"), conversation(1, "a much longer question " * 3),
                     conversation(2, "hello there"),  # duplicate prompt
                     conversation(3, "x" * 500)]       # longer than max_prompt_tokens
    settings = GenerationSettings(max_new_tokens=12, max_prompt_tokens=200, batch_size=2)
    tracker = Tracker(LoggerSettings(backend="none", mode="disabled"), tmp_path, "data_gen", {})
    report = generate(model, tokenizer, conversations, settings, tmp_path, tracker)
    assert report["skipped"] == {"duplicate prompt": 1, "prompt longer than max_prompt_tokens=200": 1}
    rows = list(load_from_disk(str(tmp_path / "dataset")))
    assert [r["id"] for r in rows] == ["c0", "c1"]  # input order restored after length bucketing
    stop_ids = end_of_turn_ids(tokenizer, model)
    for row, source in zip(rows, conversations):
        prompt = prompt_token_ids(tokenizer, source.messages)
        assert row["prompt_ids"] == prompt
        assert row["input_ids"] == prompt + row["response_ids"]
        assert row["loss_mask"] == [0] * len(prompt) + [1] * len(row["response_ids"])
        # the stored response is exactly what plain greedy generation gives for this prompt
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                  eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        assert row["response_ids"] == expected[: len(row["response_ids"])]
        assert row["finish_reason"] in {"stop", "length"}
        if row["finish_reason"] == "length":
            assert len(row["response_ids"]) == 12
    assert json.loads((tmp_path / "report.json").read_text())["records"] == 2


def test_mask_covers_exactly_what_the_template_renders_as_assistant(tiny_target):
    """Rendering prompt + response text through the chat template gives back the same ids, and the masked span
    decodes to the assistant content plus the end-of-turn token."""
    tokenizer = tiny_target.tokenizer
    messages = [{"role": "user", "content": "What is 2+2?"}]
    answer = "It is 4."
    prompt = prompt_token_ids(tokenizer, messages)
    full = chat_token_ids(tokenizer, messages + [{"role": "assistant", "content": answer}])
    assert full[: len(prompt)] == prompt
    response = full[len(prompt):]
    assert tokenizer.decode(response).startswith(answer + tokenizer.eos_token)
