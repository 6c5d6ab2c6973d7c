"""Standalone drafters: small Llama-architecture causal LMs that share the target's tokenizer.

A drafter is built from `conf/drafter/*.yaml`. Its vocabulary always equals the target's; its embeddings can
start from the target's, projected onto their top principal directions when the widths differ, which gives
a freshly built drafter meaningful token geometry for free.
"""
from __future__ import annotations

import collections
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from transformers import (AutoConfig, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase,
                          PretrainedConfig)

from infra.rundir import writing
from infra.settings import at_least, between, check_fields, one_of, positive
from models.cache import RaggedKVCache, check_supported, forward_on_cache, head_logits, pad_rows
from models.draft import DraftDefaults
from models.loading import check_safetensors, load_causal_lm, load_tokenizer

INIT_CHOICES = ("random", "target_embeddings", "target_layers")


@dataclass(frozen=True)
class DrafterSpec:
    SECTION: ClassVar[str] = "drafter"
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
    draft_vocab_size: int | None = None  # LM head over only the N most frequent target tokens (untied)

    LIMITS: ClassVar[dict] = {"hidden_size": at_least(1), "num_layers": at_least(1), "num_heads": at_least(1),
                              "num_kv_heads": at_least(1), "intermediate_size": at_least(1),
                              "max_position_embeddings": at_least(2), "init": one_of(*INIT_CHOICES),
                              "draft_vocab_size": at_least(2, none_ok=True)}

    def __post_init__(self) -> None:
        check_fields(self)
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"drafter: hidden_size={self.hidden_size} must divide by num_heads={self.num_heads}, "
                             f"and num_heads by num_kv_heads={self.num_kv_heads}")


def _pca_basis(embeddings: torch.Tensor, width: int, seed: int) -> torch.Tensor:
    """[d_target, width] orthonormal columns: the top principal directions of the target's embeddings."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    centered = embeddings - embeddings.mean(0, keepdim=True)
    _, _, basis = torch.pca_lowrank(centered, q=width, center=False, niter=4)
    torch.random.set_rng_state(generator_state)
    return basis[:, :width]


@torch.no_grad()
def copy_target_layers(drafter: LlamaForCausalLM, target: PreTrainedModel, seed: int = 0) -> list[int]:
    """Start the drafter as a thinner, shallower target: its embeddings, final norm and head, and evenly spaced
    decoder layers, with the hidden dimension projected onto the embeddings' top principal directions when the
    drafter is narrower (exact copies when the widths match). Returns the copied layer indices."""
    source = {name: tensor.detach().float().cpu() for name, tensor in target.state_dict().items()}
    width, target_width = drafter.config.hidden_size, target.config.hidden_size
    if width > target_width:
        raise ValueError(f"drafter.init=target_layers: hidden_size={width} is wider than the target's {target_width}")
    embeddings = source["model.embed_tokens.weight"]
    basis = torch.eye(target_width) if width == target_width else _pca_basis(embeddings, width, seed)

    def norm(weight):  # diagonal of the projected scaling Bᵀ·diag(w)·B
        return (basis ** 2 * weight.unsqueeze(1)).sum(0)

    target_layers = target.config.num_hidden_layers
    picks = torch.linspace(0, target_layers - 1, drafter.config.num_hidden_layers).round().long().tolist()
    state = {"model.embed_tokens.weight": embeddings @ basis, "model.norm.weight": norm(source["model.norm.weight"])}
    head = source.get("lm_head.weight", embeddings)
    if not drafter.config.tie_word_embeddings:
        state["lm_head.weight"] = head @ basis
    for mine, theirs in enumerate(picks):
        prefix, their_prefix = f"model.layers.{mine}.", f"model.layers.{theirs}."
        for name, tensor in source.items():
            if not name.startswith(their_prefix):
                continue
            key = prefix + name[len(their_prefix):]
            if name.endswith("layernorm.weight"):
                state[key] = norm(tensor)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                state[key] = basis.T @ tensor          # writes back into the hidden dimension
            elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight",
                                "up_proj.weight")):
                state[key] = tensor @ basis            # reads from the hidden dimension
            else:
                state[key] = tensor
    missing, unexpected = drafter.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and drafter.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"drafter.init=target_layers: the target's layers do not fit this drafter (missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}); heads, kv heads and intermediate_size must "
                         f"equal the target's")
    return picks


class ReducedVocabHead(torch.nn.Module):
    """An LM head over a draft vocabulary of N target tokens (`d2t[i]` = target id of draft token i).

    `forward` gives full-vocabulary logits with -inf outside the draft vocabulary, so decoders and HF generation use
    the drafter unchanged; `compact` gives the [.., N] logits training uses, which is where the saving is: the head's
    matmul, the largest cost of a small drafter, shrinks by V/N. (EAGLE-3's draft vocabulary, METHODS.md §8.)
    """

    def __init__(self, hidden_size: int, d2t: torch.Tensor, vocab_size: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(len(d2t), hidden_size))
        self.register_buffer("d2t", d2t.long().clone())
        self.vocab_size = vocab_size

    FEW_ROW_METHOD = "compact"  # hidden -> hidden Wᵀ: the decoder's few-row kernel reaches it as it reaches nn.Linear
                                # layers (models/kernels.py; 1 row of 576 × 8,192: 0.97 vs 2.23 ms here)

    def compact(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        small = self.compact(hidden)
        full = small.new_full((*small.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.d2t, small)


def frequent_tokens(token_lists, size: int, always: list[int]) -> tuple[torch.Tensor, float]:
    """The draft vocabulary: `always` (special tokens) plus the most frequent ids, `size` in all, sorted by id;
    and the share of all counted tokens it covers."""
    counts = collections.Counter(token for tokens in token_lists for token in tokens)
    chosen = list(dict.fromkeys(always))[:size]
    for token, _ in counts.most_common():
        if len(chosen) >= size:
            break
        if token not in chosen:
            chosen.append(token)
    total = sum(counts.values())
    coverage = sum(counts[t] for t in chosen) / total if total else 0.0
    return torch.tensor(sorted(chosen)), coverage


def use_draft_vocabulary(drafter: LlamaForCausalLM, d2t: torch.Tensor, seed: int = 0) -> LlamaForCausalLM:
    """Replace the drafter's head by a `ReducedVocabHead` over `d2t` (started from the full head's rows)."""
    full = drafter.get_output_embeddings().weight.detach()
    head = ReducedVocabHead(full.shape[1], d2t, drafter.config.vocab_size).to(full.device)
    with torch.no_grad():
        head.weight.copy_(full[d2t.to(full.device)])
    drafter.config.tie_word_embeddings = False
    drafter.config.draft_vocab_size = len(d2t)
    drafter.lm_head = head
    return drafter


def to_draft_vocabulary(teacher_logits: torch.Tensor | None, labels: torch.Tensor, d2t: torch.Tensor,
                        vocab_size: int, teacher_top1: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Restrict the teacher to the draft vocabulary (the losses' softmax renormalises it), map labels to draft
    ids, and keep only positions whose label and whose teacher argmax are both in it (EAGLE-3, METHODS.md §8).
    With `teacher_top1` (the argmax, known beforehand) the logits given are already over the draft vocabulary."""
    t2d = torch.full((vocab_size,), -1, dtype=torch.long, device=labels.device)
    t2d[d2t] = torch.arange(len(d2t), device=labels.device)
    draft_labels = t2d[labels]
    keep = draft_labels >= 0
    if teacher_top1 is not None:
        keep &= t2d[teacher_top1] >= 0
    elif teacher_logits is not None:
        keep &= t2d[teacher_logits.argmax(-1)] >= 0
        teacher_logits = teacher_logits[..., d2t]
    return teacher_logits, draft_labels.clamp_min(0), keep


class VocabularyMismatchError(ValueError):
    pass


def check_same_vocabulary(drafter: PreTrainedModel | PretrainedConfig, target: PreTrainedModel | PretrainedConfig,
                          drafter_tokenizer: PreTrainedTokenizerBase | None = None,
                          target_tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """Speculative decoding compares token ids, so both models (or their configs) must speak the same vocabulary."""
    drafter_size, target_size = (getattr(m, "config", m).vocab_size for m in (drafter, target))
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
    centered = target_embeddings - target_embeddings.mean(0, keepdim=True)
    projected = centered @ _pca_basis(target_embeddings, width, seed)
    return projected * (std / projected.std())


def build_drafter(spec: DrafterSpec, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                  token_lists=None) -> LlamaForCausalLM:
    """A fresh drafter for `target`: same vocabulary and special tokens, sizes from `spec`. With
    `spec.draft_vocab_size`, its head covers the most frequent tokens of `token_lists` (the training data)."""
    copying = spec.init == "target_layers"
    if copying:
        needed = {"num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
                  "intermediate_size": "intermediate_size"}
        wrong = {mine: (getattr(spec, mine), getattr(target.config, theirs)) for mine, theirs in needed.items()
                 if getattr(spec, mine) != getattr(target.config, theirs)}
        if wrong:
            raise ValueError("drafter.init=target_layers copies the target's layers, so these must equal the "
                             "target's: " + ", ".join(f"drafter.{k}={v[0]} (target {v[1]})" for k, v in wrong.items()))
    head_dim = getattr(target.config, "head_dim", None) if copying else None
    config = LlamaConfig(
        head_dim=head_dim or spec.hidden_size // spec.num_heads,
        vocab_size=target.config.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_embeddings and not spec.draft_vocab_size,
        rope_theta=getattr(target.config, "rope_theta", 10000.0),
        rms_norm_eps=getattr(target.config, "rms_norm_eps", 1e-6),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(spec.seed)
    drafter = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    if copying:
        drafter.config.copied_target_layers = copy_target_layers(drafter, target, spec.seed)
    elif spec.init == "target_embeddings":
        with torch.no_grad():
            source = target.get_input_embeddings().weight.detach().float().cpu()
            drafter.get_input_embeddings().weight.copy_(_principal_embeddings(source, spec.hidden_size, spec.seed,
                                                                                    config.initializer_range))
            if not config.tie_word_embeddings:
                drafter.get_output_embeddings().weight.copy_(drafter.get_input_embeddings().weight)
    if spec.draft_vocab_size:
        if token_lists is None:
            raise ValueError("drafter.draft_vocab_size needs the training tokens to count; build it in a stage")
        special = [t for t in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id,
                               *tokenizer.all_special_ids) if t is not None]
        d2t, coverage = frequent_tokens(token_lists, spec.draft_vocab_size, special)
        use_draft_vocabulary(drafter, d2t)
        drafter.config.draft_vocab_coverage = round(coverage, 6)
    return drafter.to(target.device)


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass(frozen=True)
class LoraSettings:
    """PEFT LoRA adapters on the drafter's projections (`distill.lora`); merged into plain weights when saved."""
    SECTION: ClassVar[str] = "distill.lora"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    LIMITS: ClassVar[dict] = {"r": at_least(1), "alpha": positive, "dropout": between(0, 1)}

    def __post_init__(self) -> None:
        check_fields(self)


def apply_lora(drafter: torch.nn.Module, settings: LoraSettings, task_type: str | None = "CAUSAL_LM"):
    """`drafter` with LoRA adapters on the projections named in `settings`, everything else frozen; `task_type`
    None wraps a plain module (a feature drafter), whose forward keeps its own signature."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), task_type=task_type)
    return get_peft_model(drafter, config)


def merged(drafter: torch.nn.Module) -> torch.nn.Module:
    """`drafter` itself, or a copy with its LoRA adapters merged into plain weights."""
    return copy.deepcopy(drafter).merge_and_unload() if hasattr(drafter, "merge_and_unload") else drafter


def save_drafter(drafter: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> Path:
    """A plain HF folder (safetensors); LoRA adapters are merged into a copy first, so any engine loads it."""
    drafter = merged(drafter)
    out_dir.mkdir(parents=True, exist_ok=True)
    with writing(out_dir):
        drafter.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    return out_dir


def load_drafter(path: Path, target: PreTrainedModel, target_tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Load a drafter checkpoint and prove it speaks the target's vocabulary."""
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "draft_vocab_size", None):  # a reduced head: rebuild it, then load the weights into it
        from safetensors.torch import load_file

        check_safetensors(Path(path) / "model.safetensors")
        weights = load_file(str(Path(path) / "model.safetensors"))
        drafter = use_draft_vocabulary(LlamaForCausalLM(config), weights["lm_head.d2t"])
        missing, unexpected = drafter.load_state_dict(weights, strict=False)
        if unexpected or [m for m in missing if m != "lm_head.d2t"]:
            raise ValueError(f"{path}: weights do not fit the drafter (missing {missing}, unexpected {unexpected})")
        drafter = drafter.eval().to(target.device)
    else:
        drafter = load_causal_lm(Path(path)).to(target.device)
    drafter_tokenizer = load_tokenizer(Path(path)) if (Path(path) / "tokenizer_config.json").exists() else None
    check_same_vocabulary(drafter, target, drafter_tokenizer, target_tokenizer)
    return drafter


class TokenDraft(DraftDefaults):
    """A standalone drafter: a causal LM over the target's vocabulary (a reduced draft vocabulary gives -inf
    outside it, which the rules above handle as q = 0)."""

    needs_features = False

    def __init__(self, model: PreTrainedModel) -> None:
        check_supported(model)
        self.model = model
        self.networks = (model,)  # what the decoder's few-row kernels apply to (models.kernels)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def start(self, rows: int, capacity: int) -> None:
        self.cache = RaggedKVCache.for_model(self.model, rows, capacity)
        self.lengths = [0] * rows

    def catch_up(self, sequences: list[list[int]], features: torch.Tensor | None) -> torch.Tensor:
        """Feed what each row committed since the last step; logits [rows, V] for the next token."""
        feeds = [sequence[length:] for sequence, length in zip(sequences, self.lengths)]
        tokens = pad_rows(feeds, self.cache.device)
        width = tokens.shape[1]
        hidden = forward_on_cache(self.model, self.cache, tokens, self.lengths, torch.ones(width, width).tril().bool(),
                          torch.arange(width))
        last = torch.tensor([len(feed) - 1 for feed in feeds], device=hidden.device)
        self.lengths = [len(sequence) for sequence in sequences]
        return head_logits(self.model, hidden[torch.arange(len(feeds), device=hidden.device), last])

    def extend(self, tokens: torch.Tensor, parents: list[int], local: torch.Tensor, relative: torch.Tensor,
               offset: int) -> torch.Tensor:
        """Draft tokens [rows, w] after the committed prefix (block columns offset..offset+w-1); logits [rows, w, V]."""
        return head_logits(self.model, forward_on_cache(self.model, self.cache, tokens, self.lengths, local, relative, offset))

    def commit(self, accepted: list[int], fed_drafts: int) -> None:
        """Keep the committed prefix plus the drafts that were fed and accepted (their columns are in place)."""
        self.lengths = [length + min(n, fed_drafts) for length, n in zip(self.lengths, accepted)]

    def keep_rows(self, rows: list[int]) -> None:
        self.cache.keep_rows(rows)
        self.lengths = [self.lengths[row] for row in rows]


def draft_vocabulary(model: PreTrainedModel) -> torch.Tensor | None:
    """d2t (draft id -> target id) of a drafter with a reduced vocabulary, else None."""
    return getattr(model.get_output_embeddings(), "d2t", None)
