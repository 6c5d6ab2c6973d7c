"""A tiny, deterministic random Llama plus a byte-level ChatML tokenizer, built locally with no download.

It serves the tests and `+experiment=smoke`: real code paths (chat template, generation, KV caches,
safetensors) at a size that runs in seconds on a laptop CPU.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# The same ChatML layout SmolLM2 uses, without its default system prompt (that would cost ~70 byte tokens).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_chatml_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens + 3 specials; lossless on any UTF-8 text and identical on every machine."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={char: index for index, char in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def spread_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Default init (std 0.02) gives near-uniform logits; a wider spread makes greedy decoding of a random model
    decisive, so tests see long, repeatable, non-trivial continuations instead of near-ties."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.25)
    return model


def build_tiny_random(out_dir: Path, hidden_size: int, num_layers: int, num_heads: int,
                      intermediate_size: int, seed: int) -> Path:
    """Write a random Llama (safetensors) and its tokenizer to `out_dir`; same seed, same bytes."""
    tokenizer = byte_chatml_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = spread_weights(LlamaForCausalLM(config))
    torch.random.set_rng_state(generator_state)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
