"""Stage pretrain on the tiny target: it learns and saves safetensors; drafters refuse another vocabulary."""
from __future__ import annotations

import pytest
import torch

from models.drafter import DrafterSpec, VocabularyMismatchError, build_drafter, check_same_vocabulary, load_drafter
from train.optim import OptimSettings
from train.pretrain import PretrainSettings, pack_documents, pretrain
from train.tracking import LoggerSettings, Tracker

SPEC = DrafterSpec(name="d", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)


def quiet_tracker(tmp_path, stage):
    return Tracker(LoggerSettings(backend="none", mode="disabled"), tmp_path, stage, {})


def test_pack_documents_cuts_fixed_blocks():
    blocks = pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4)
    assert blocks.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_documents([[1, 2]], seq_len=4)


def test_pretrain_learns_and_saves_safetensors(tiny_target, tmp_path):
    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    text = "the quick brown fox jumps over the lazy dog. " * 40
    documents = [tokenizer(text)["input_ids"]] * 4
    drafter = build_drafter(SPEC, model, tokenizer)
    settings = PretrainSettings(steps=30, batch_size=4, seq_len=64, log_every=1,
                                optim=OptimSettings(lr=1e-2, warmup_steps=2))
    tracker = quiet_tracker(tmp_path, "pretrain")
    summary = pretrain(drafter, tokenizer, documents, settings, tmp_path, tracker)
    losses = [entry["pretrain/loss"] for entry in tracker.history]
    assert losses[-1] < 0.5 * losses[0]
    assert (tmp_path / "model" / "model.safetensors").exists() and summary["steps"] == 30
    reloaded = load_drafter(tmp_path / "model", model, tokenizer)
    probe = torch.tensor([documents[0][:32]])
    assert torch.allclose(reloaded(probe).logits, drafter(probe).logits, atol=1e-5)


def test_vocabulary_mismatch_names_both_sizes(tiny_target):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(VocabularyMismatchError, match="has 300 entries but the target's has 259"):
        check_same_vocabulary(other, tiny_target.model)
