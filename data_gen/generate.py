"""Stage `data_gen`: the target answers real prompts; we keep its tokens and an assistant-only loss mask.

    python train/run.py +experiment=quickstart stages=[data_gen]

Prompts are rendered with the target's chat template, bucketed by length, left-padded and generated in
batches. Output: a `datasets` (Arrow) dataset with `input_ids` = prompt + response and `loss_mask` = 1 exactly
on the response tokens (the end-of-turn token included), plus a report of what was kept and skipped.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from data_gen.sources import Conversation
from train.tracking import Tracker


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    max_prompt_tokens: int = 512
    batch_size: int = 8
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


def chat_token_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict],
                   add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` rendered by the chat template (transformers may return a list or an encoding)."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """The exact ids the target sees before it starts answering."""
    return chat_token_ids(tokenizer, messages, add_generation_prompt=True)


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> list[int]:
    """Token ids that end an answer: the tokenizer's eos plus whatever the generation config lists."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def cut_at_end_of_turn(tokens: list[int], stop_ids: list[int]) -> tuple[list[int], str]:
    """Response tokens up to and including the first stop token; finish reason 'stop' or 'length'."""
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: index + 1], "stop"
    return tokens, "length"


@torch.inference_mode()
def generate_batch(model: PreTrainedModel, prompts: list[list[int]], pad_id: int, stop_ids: list[int],
                   settings: GenerationSettings) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    sampling = dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p) \
        if settings.temperature > 0 else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    output = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                            max_new_tokens=settings.max_new_tokens, pad_token_id=pad_id, eos_token_id=stop_ids,
                            **sampling)
    return [row[width:].tolist() for row in output]


def generate(target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, conversations: list[Conversation],
             settings: GenerationSettings, out_dir: Path, tracker: Tracker) -> dict:
    """Regenerate first-turn answers with the target; write `out_dir/dataset` and `out_dir/report.json`."""
    torch.manual_seed(settings.seed)
    skipped: Counter = Counter()
    flagged: Counter = Counter()
    seen_prompts: set[tuple[int, ...]] = set()
    jobs = []
    for order, conversation in enumerate(conversations):
        ids = prompt_token_ids(tokenizer, conversation.first_turn_prompt())
        if len(ids) > settings.max_prompt_tokens:
            skipped[f"prompt longer than max_prompt_tokens={settings.max_prompt_tokens}"] += 1
            continue
        if tuple(ids) in seen_prompts:
            skipped["duplicate prompt"] += 1
            continue
        seen_prompts.add(tuple(ids))
        jobs.append((order, conversation, ids))
    jobs.sort(key=lambda job: len(job[2]), reverse=True)  # length buckets: little padding per batch

    stop_ids = end_of_turn_ids(tokenizer, target)
    records, generated_tokens, started = [], 0, time.perf_counter()
    batches = [jobs[i: i + settings.batch_size] for i in range(0, len(jobs), settings.batch_size)]
    progress = tqdm(batches, desc="data_gen", unit="batch")
    for batch in progress:
        outputs = generate_batch(target, [ids for _, _, ids in batch], tokenizer.pad_token_id, stop_ids, settings)
        for (order, conversation, prompt_ids), raw in zip(batch, outputs):
            response, finish_reason = cut_at_end_of_turn(raw, stop_ids)
            generated_tokens += len(response)
            if finish_reason == "length":
                flagged["hit max_new_tokens"] += 1
            if len(response) <= 1 and finish_reason == "stop":
                skipped["empty response"] += 1
                continue
            records.append({
                "order": order, "id": conversation.id, "source": conversation.source,
                "category": conversation.category, "prompt_ids": prompt_ids, "response_ids": response,
                "input_ids": prompt_ids + response, "loss_mask": [0] * len(prompt_ids) + [1] * len(response),
                "finish_reason": finish_reason,
            })
        elapsed = time.perf_counter() - started
        progress.set_postfix(tok_per_s=f"{generated_tokens / elapsed:.0f}")
        tracker.log({"data_gen/tokens": generated_tokens, "data_gen/tokens_per_s": generated_tokens / elapsed})
    if not records:
        raise RuntimeError(f"data_gen produced no records from {len(conversations)} conversations: {dict(skipped)}")
    records.sort(key=lambda record: record["order"])
    Dataset.from_list(records).save_to_disk(str(out_dir / "dataset"))
    elapsed = time.perf_counter() - started
    report = {
        "conversations_in": len(conversations), "records": len(records), "skipped": dict(skipped),
        "flagged": dict(flagged), "generated_tokens": generated_tokens, "seconds": round(elapsed, 2),
        "tokens_per_s": round(generated_tokens / elapsed, 1),
        "mean_response_tokens": round(generated_tokens / max(1, len(records) + skipped["empty response"]), 1),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report
