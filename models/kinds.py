"""One interface for every kind of drafter; the stages and the decoder see drafters only through it.

A kind says how to build a drafter from its spec (the dataclass its `conf/drafter/*.yaml` names), save and load
it, how it drafts for the speculative decoder given the target (a `models.draft.Draft`), how many parameters one
drafted token reads (MBSU's c), whether it has a pretraining stage, how it trains (`training`: the key of its
distill objective, `train/core/objectives.py`, and of its online learner, `train/online/learners.py`; None for a
training-free kind), what it is checked against the target's vocabulary with, and the export formats that hold it.
Kinds today: token-level (`models/drafter.py`, a small causal LM over the target's vocabulary), feature-level
(`models/feature_drafter.py`, EAGLE/FSPAD) and training-free lookup (`models/lookup.py`: prompt lookup, corpus
n-grams). Adding one: a module with its spec, its `Draft` and a `DrafterKind` subclass, an entry in `KINDS` and a
conf file in `conf/drafter/`; `tests/models/test_kinds.py` lists what each kind must provide and checks it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from transformers import PreTrainedModel

from models.drafter import (DrafterSpec, TokenDraft, build_drafter, count_parameters, load_drafter, merged,
                            save_drafter)
from models.feature_drafter import (CONFIG_FILE, FeatureDraft, FeatureDrafter, FeatureDrafterSpec,
                                    build_feature_drafter, load_feature_drafter)
from models import eagle3_export, lookup


class DrafterKind(ABC):
    name: str
    spec_type: type
    model_type: type          # the class of a built or loaded drafter
    pretrainable: bool        # has a pretrain stage (FastDraft) of its own
    trainable: bool = True    # distill can train it (False: training-free, built from data alone)
    training: str | None      # how it trains: "tokens" (its logits against the target's) or "features" (it reads the
                              # target's hidden states); the key of train/core/objectives.OBJECTIVES and
                              # train/online/learners.LEARNERS. None: training-free
    lora_task: str | None     # peft task type for distill.lora (None: a plain module keeping its forward)
    export_formats: tuple[str, ...] = ()  # what models/export.py can write it as, the first `auto`'s choice

    @abstractmethod
    def build(self, spec, target, token_lists=None, masks=None) -> torch.nn.Module:
        """A fresh drafter for `target` (models.loading.LoadedModel); `token_lists`: training data, for kinds
        whose construction looks at it (a reduced draft vocabulary, a corpus n-gram table); `masks`: per list,
        1 where a token is an answer token (kinds that count continuations count only those)."""

    @abstractmethod
    def saved_in(self, folder: Path) -> bool:
        """Whether `folder` holds a drafter of this kind."""

    @abstractmethod
    def load(self, folder: Path, target) -> torch.nn.Module:
        ...

    @abstractmethod
    def save(self, drafter: torch.nn.Module, target, folder: Path) -> Path:
        ...

    @abstractmethod
    def draft(self, drafter: torch.nn.Module, target_model):
        """What the decoder drives (`start`, `catch_up`, `extend`, `commit`, `keep_rows`, `needs_features`)."""

    def parameters_per_token(self, drafter: torch.nn.Module, target_model) -> int:
        """Parameters read per drafted token: the drafter's own."""
        return count_parameters(drafter)

    def vocabulary_of(self, drafter: torch.nn.Module):
        """What must share the target's vocabulary (`models.drafter.check_same_vocabulary`): the drafter itself."""
        return drafter


class TokenKind(DrafterKind):
    name, spec_type, model_type = "token", DrafterSpec, PreTrainedModel
    pretrainable, training, lora_task, export_formats = True, "tokens", "CAUSAL_LM", ("hf",)

    def build(self, spec, target, token_lists=None, masks=None):
        return build_drafter(spec, target.model, target.tokenizer, token_lists=token_lists)

    def saved_in(self, folder: Path) -> bool:
        return ((Path(folder) / "config.json").exists() and not (Path(folder) / CONFIG_FILE).exists()
                and not eagle3_export.is_engine_folder(folder))

    def load(self, folder: Path, target):
        return load_drafter(folder, target.model, target.tokenizer)

    def save(self, drafter, target, folder: Path) -> Path:
        return save_drafter(drafter, target.tokenizer, folder)

    def draft(self, drafter, target_model):
        return TokenDraft(drafter)


class FeatureKind(DrafterKind):
    name, spec_type, model_type = "feature", FeatureDrafterSpec, FeatureDrafter
    pretrainable, training, lora_task, export_formats = False, "features", None, eagle3_export.FORMATS

    def build(self, spec, target, token_lists=None, masks=None):
        return build_feature_drafter(spec, target.model, token_lists)

    def saved_in(self, folder: Path) -> bool:
        """Ours (feature_drafter.json), or an EAGLE-3 / speculators folder of any trainer's."""
        return (Path(folder) / CONFIG_FILE).exists() or eagle3_export.is_engine_folder(folder)

    def load(self, folder: Path, target):
        if (Path(folder) / CONFIG_FILE).exists():
            return load_feature_drafter(folder, target.model)
        return eagle3_export.read_folder(folder, target.model)

    def save(self, drafter, target, folder: Path) -> Path:
        return merged(drafter).save(folder)

    def draft(self, drafter, target_model):
        return FeatureDraft(drafter, target_model)

    def vocabulary_of(self, drafter):
        """Its decoder layer's config, which names the target's vocabulary size."""
        return drafter.layer_config

    def parameters_per_token(self, drafter, target_model) -> int:
        """Its own weights plus, without a draft vocabulary of its own, the target's LM head, which turns each
        predicted feature into a token; an embedding of its own is a lookup of one row, not counted (nor is the
        target's, which the others read)."""
        own_head = getattr(drafter, "head", None) is not None
        embedding = drafter.embed_tokens.weight.numel() if drafter.embed_tokens is not None else 0
        return (count_parameters(drafter) - embedding
                + (0 if own_head else target_model.get_output_embeddings().weight.numel()))


class LookupKind(DrafterKind):
    name, spec_type, model_type = "lookup", lookup.LookupSpec, lookup.LookupDrafter
    pretrainable, trainable, training, lora_task = False, False, None, None

    def build(self, spec, target, token_lists=None, masks=None):
        return lookup.build_lookup_drafter(spec, target.model.config.vocab_size, token_lists, masks)

    def saved_in(self, folder: Path) -> bool:
        return (Path(folder) / lookup.CONFIG_FILE).exists()

    def load(self, folder: Path, target):
        drafter = lookup.load_lookup_drafter(folder)
        if drafter.vocab_size != target.model.config.vocab_size:
            raise ValueError(f"{folder}: a lookup drafter for a vocabulary of {drafter.vocab_size} tokens, the "
                             f"target has {target.model.config.vocab_size}")
        return drafter

    def save(self, drafter, target, folder: Path) -> Path:
        return drafter.save(folder)

    def draft(self, drafter, target_model):
        return lookup.LookupDraft(drafter, target_model.device)

    def parameters_per_token(self, drafter, target_model) -> int:
        return 0  # table lookups, no weights


KINDS: tuple[DrafterKind, ...] = (TokenKind(), FeatureKind(), LookupKind())


def kind_of_spec(spec) -> DrafterKind:
    for kind in KINDS:
        if isinstance(spec, kind.spec_type):
            return kind
    raise TypeError(f"{type(spec).__name__} is not the spec of a drafter kind ({[k.name for k in KINDS]})")


def kind_of_folder(folder: Path) -> DrafterKind:
    for kind in KINDS:
        if kind.saved_in(folder):
            return kind
    raise FileNotFoundError(f"{folder} holds no saved drafter (no config.json, {CONFIG_FILE} or "
                            f"{lookup.CONFIG_FILE})")


def kind_of(drafter: torch.nn.Module) -> DrafterKind:
    for kind in KINDS:
        if isinstance(drafter, kind.model_type):
            return kind
    raise TypeError(f"{type(drafter).__name__} is not a drafter of a known kind ({[k.name for k in KINDS]})")


def load_any(folder: Path, target) -> torch.nn.Module:
    """A saved drafter of any kind."""
    return kind_of_folder(Path(folder)).load(Path(folder), target)


def draft_for(drafter: torch.nn.Module, target_model):
    """The decoder's view of a built or loaded drafter of any kind."""
    return kind_of(drafter).draft(drafter, target_model)
