"""Data-generation throughput: draftsmith's batched `data_gen` vs a naive one-prompt-at-a-time `generate` loop.

    .venv/bin/python bench/data_gen_throughput.py --prompts 32 --max-new-tokens 64

Both run in this process on the same ShareGPT prompts with the real SmolLM2-135M target, greedy. Prints tokens/s of
each, the ratio, and how many responses are token-for-token identical (left padding changes matrix shapes, so fp32
rounding can flip a near-tied argmax; every difference is counted, none hidden).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from data_gen.chat import cut_at_end_of_turn, end_of_turn_ids, prompt_token_ids
from data_gen.generate import GenerationSettings, generate
from data_gen.shards import load_records
from data_gen.sources import load_conversations
from infra.tracking import LoggerSettings, Tracker
from models.loading import load_target


def from_conf(group: str, option: str):
    """The spec that `conf/<group>/<option>.yaml` describes, so names and checksums live in one place."""
    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return instantiate(compose("config", overrides=[f"{group}={option}"])[group], _convert_="all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-tokens", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "draftsmith")
    args = parser.parse_args()

    target = load_target(from_conf("target", "smollm2_135m"), args.cache_dir)
    model, tokenizer = target.model, target.tokenizer
    sharegpt = dataclasses.replace(from_conf("data", "sharegpt"), limit=None)
    conversations, _ = load_conversations(sharegpt, args.cache_dir)
    chosen = [c for c in conversations
              if len(prompt_token_ids(tokenizer, c.first_turn_prompt())) <= args.max_prompt_tokens][: args.prompts]
    stop_ids = end_of_turn_ids(tokenizer, model.generation_config)

    naive, naive_tokens, started = {}, 0, time.perf_counter()
    with torch.inference_mode():
        for conversation in chosen:
            prompt = prompt_token_ids(tokenizer, conversation.first_turn_prompt())
            output = model.generate(torch.tensor([prompt]), max_new_tokens=args.max_new_tokens, do_sample=False,
                                    eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
            response, _ = cut_at_end_of_turn(output[0, len(prompt):].tolist(), stop_ids)
            naive[conversation.id] = response
            naive_tokens += len(response)
    naive_seconds = time.perf_counter() - started

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                                  batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as out_dir:
        tracker = Tracker(LoggerSettings(backend="none", mode="disabled"), Path(out_dir), "bench", {})
        started = time.perf_counter()
        report = generate(model, tokenizer, chosen, settings, Path(out_dir), tracker)
        batched_seconds = time.perf_counter() - started
        rows = {row["conversation_id"]: row["response_ids"] for row in load_records(Path(out_dir))}
    batched_tokens = report["generated_tokens"]
    identical = sum(rows.get(key) == value for key, value in naive.items())
    naive_rate, batched_rate = naive_tokens / naive_seconds, batched_tokens / batched_seconds
    print(f"prompts: {len(chosen)}, max_new_tokens: {args.max_new_tokens}, threads: {torch.get_num_threads()}")
    print(f"naive one-at-a-time generate: {naive_tokens} tokens in {naive_seconds:.1f} s = {naive_rate:.1f} tok/s")
    print(f"draftsmith data_gen (batch {args.batch_size}): {batched_tokens} tokens in {batched_seconds:.1f} s "
          f"= {batched_rate:.1f} tok/s")
    print(f"ratio: {batched_rate / naive_rate:.2f}x   identical responses: {identical}/{len(naive)}")


if __name__ == "__main__":
    main()
