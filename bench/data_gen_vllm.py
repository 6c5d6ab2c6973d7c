"""data_gen backends side by side: vLLM vs our hf decode loop, same prompts, same target, greedy, one process.

    .ci/setup-vllm && .venv-vllm/bin/python bench/data_gen_vllm.py --prompts 64 --max-new-tokens 64
    # on a GPU: add --device cuda --dtype bfloat16 (or float16)

Prints tokens/s of each backend (vLLM's engine start-up is timed separately and not counted), the ratio, and how
many responses are token-for-token identical.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    from bench.data_gen_throughput import from_conf
    from data_gen.backends import HFBackend, Request, VLLMBackend
    from data_gen.chat import end_of_turn_ids, prompt_token_ids
    from data_gen.sources import load_conversations
    from models.loading import load_target, resolve_model_dir
    from models.sampling import SamplingSettings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-tokens", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32, help="hf backend batch size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get(
        "DRAFTSMITH_CACHE", Path.home() / ".cache" / "draftsmith")))
    args = parser.parse_args()

    spec = from_conf("target", "smollm2_135m")
    target = load_target(spec, args.cache_dir, device=args.device)
    model, tokenizer = target.model.to(getattr(torch, args.dtype)), target.tokenizer
    model_dir, _ = resolve_model_dir(spec, args.cache_dir)
    conversations, _ = load_conversations(dataclasses.replace(from_conf("data", "sharegpt"), limit=None),
                                          args.cache_dir)
    prompts = [ids for ids in (prompt_token_ids(tokenizer, c.first_turn_prompt()) for c in conversations)
               if len(ids) <= args.max_prompt_tokens][: args.prompts]
    requests = [Request(str(i), ids, i) for i, ids in enumerate(prompts)]
    stop_ids = end_of_turn_ids(tokenizer, model.generation_config)
    sampling = SamplingSettings()  # greedy

    hf = HFBackend(model, tokenizer.pad_token_id, stop_ids, sampling, args.max_new_tokens, args.batch_size)
    started = time.perf_counter()
    hf_out = hf.generate(requests)
    hf_seconds = time.perf_counter() - started
    del model, target, hf
    if args.device == "cuda":
        torch.cuda.empty_cache()

    started = time.perf_counter()
    engine = {"enforce_eager": True, "max_num_seqs": args.batch_size} if args.device == "cpu" else {}
    vllm = VLLMBackend(model_dir, stop_ids, sampling, args.max_new_tokens, dtype=args.dtype,
                       max_model_len=args.max_prompt_tokens + args.max_new_tokens + 8, engine_args=engine)
    startup = time.perf_counter() - started
    started = time.perf_counter()
    vllm_out = vllm.generate(requests)
    vllm_seconds = time.perf_counter() - started

    hf_tokens, vllm_tokens = sum(len(c.token_ids) for c in hf_out), sum(len(c.token_ids) for c in vllm_out)
    identical = sum(a.token_ids == b.token_ids for a, b in zip(hf_out, vllm_out))
    print(f"prompts: {len(requests)}, max_new_tokens: {args.max_new_tokens}, device: {args.device}, dtype: {args.dtype}")
    print(f"hf backend (batch {args.batch_size}): {hf_tokens} tokens in {hf_seconds:.1f} s = "
          f"{hf_tokens / hf_seconds:.1f} tok/s")
    print(f"vllm backend: {vllm_tokens} tokens in {vllm_seconds:.1f} s = {vllm_tokens / vllm_seconds:.1f} tok/s "
          f"(engine start-up {startup:.0f} s, not counted)")
    print(f"ratio vllm/hf: {(vllm_tokens / vllm_seconds) / (hf_tokens / hf_seconds):.2f}x   "
          f"identical responses: {identical}/{len(requests)}")


if __name__ == "__main__":  # vLLM starts worker processes with spawn
    main()
