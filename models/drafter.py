"""Standalone drafters: small Llama-architecture causal LMs that share the target's tokenizer.

A drafter is built from `conf/drafter/*.yaml`. Its vocabulary always equals the target's; its embeddings can
start from the target's, projected onto their top principal directions when the widths differ, which gives
a freshly built drafter meaningful token geometry for free.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from models.loading import load_causal_lm, load_tokenizer

INIT_CHOICES = ("random", "target_embeddings")


@dataclass(frozen=True)
class DrafterSpec:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    init: str = "random"
    seed: int = 0
    tie_embeddings: bool = True  # the LM head reuses the input embedding (fewer parameters)

    def __post_init__(self) -> None:
        if self.init not in INIT_CHOICES:
            raise ValueError(f"drafter.init={self.init!r} is not one of {INIT_CHOICES}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"drafter: hidden_size={self.hidden_size} must divide by num_heads={self.num_heads}, "
                             f"and num_heads by num_kv_heads={self.num_kv_heads}")


class VocabularyMismatchError(ValueError):
    pass


def check_same_vocabulary(drafter: PreTrainedModel, target: PreTrainedModel,
                          drafter_tokenizer: PreTrainedTokenizerBase | None = None,
                          target_tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """Speculative decoding compares token ids, so both models must speak the same vocabulary."""
    drafter_size, target_size = drafter.config.vocab_size, target.config.vocab_size
    if drafter_size != target_size:
        raise VocabularyMismatchError(
            f"drafter vocabulary has {drafter_size} entries but the target's has {target_size}: a drafter must share "
            f"the target's tokenizer. Rebuild the drafter from this target (stages pretrain/distill) instead.")
    if drafter_tokenizer is not None and target_tokenizer is not None:
        drafter_vocab, target_vocab = drafter_tokenizer.get_vocab(), target_tokenizer.get_vocab()
        if drafter_vocab != target_vocab:
            differing = sorted(set(drafter_vocab.items()) ^ set(target_vocab.items()))[:5]
            raise VocabularyMismatchError(
                f"drafter and target tokenizers both have {drafter_size} ids but map them differently "
                f"(e.g. {differing}); the drafter was trained for another tokenizer.")


def _principal_embeddings(target_embeddings: torch.Tensor, width: int, seed: int, std: float) -> torch.Tensor:
    """Project [vocab, d_target] embeddings onto their top-`width` principal directions, rescaled to `std`.

    The directions carry the target's token geometry; the scale is the drafter's own init scale, because the
    embedding is also the (tied) LM head: at the target's scale a fresh drafter starts with a loss of ~20 nats.
    """
    if width >= target_embeddings.shape[1]:
        padded = torch.zeros(target_embeddings.shape[0], width)
        padded[:, : target_embeddings.shape[1]] = target_embeddings
        return padded * (std / padded.std())
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    centered = target_embeddings - target_embeddings.mean(0, keepdim=True)
    _, _, basis = torch.pca_lowrank(centered, q=width, center=False, niter=4)
    torch.random.set_rng_state(generator_state)
    projected = centered @ basis[:, :width]
    return projected * (std / projected.std())


def build_drafter(spec: DrafterSpec, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A fresh drafter for `target`: same vocabulary and special tokens, sizes from `spec`."""
    config = LlamaConfig(
        vocab_size=target.config.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=spec.tie_embeddings,
        rope_theta=getattr(target.config, "rope_theta", 10000.0),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(spec.seed)
    drafter = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    if spec.init == "target_embeddings":
        with torch.no_grad():
            source = target.get_input_embeddings().weight.detach().float().cpu()
            drafter.get_input_embeddings().weight.copy_(_principal_embeddings(source, spec.hidden_size, spec.seed,
                                                                                    config.initializer_range))
    return drafter.to(target.device)


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass(frozen=True)
class LoraSettings:
    """PEFT LoRA adapters on the drafter's projections (`distill.lora`); merged into plain weights when saved."""
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def apply_lora(drafter: PreTrainedModel, settings: LoraSettings) -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(drafter, config)


def save_drafter(drafter: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> Path:
    """A plain HF folder (safetensors); LoRA adapters are merged into a copy first, so any engine loads it."""
    if hasattr(drafter, "merge_and_unload"):
        drafter = copy.deepcopy(drafter).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    drafter.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_drafter(path: Path, target: PreTrainedModel, target_tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Load a drafter checkpoint and prove it speaks the target's vocabulary."""
    drafter = load_causal_lm(Path(path)).to(target.device)
    drafter_tokenizer = load_tokenizer(Path(path)) if (Path(path) / "tokenizer_config.json").exists() else None
    check_same_vocabulary(drafter, target, drafter_tokenizer, target_tokenizer)
    return drafter
