"""Stages pretrain and distill on the tiny target: they learn, save safetensors, and fail loudly on NaN."""
from __future__ import annotations

import pytest
import torch

from losses.kl import forward_kl
from models.drafter import DrafterSpec, VocabularyMismatchError, build_drafter, check_same_vocabulary, load_drafter
from train.distill import DistillSettings, collate, distill
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


def distill_dataset(tiny_target, tmp_path):
    """A real data_gen output (sharded records + manifest) from the tiny target."""
    from data_gen.generate import GenerationSettings, generate
    from data_gen.sources import Conversation

    conversations = [Conversation(id=str(i), source="test", messages=[{"role": "user", "content": text}])
                     for i, text in enumerate(["hi", "tell me a story", "what is up", "count to ten"])]
    out = tmp_path / "data_gen"
    out.mkdir()
    tracker = Tracker(LoggerSettings(backend="none", mode="disabled"), tmp_path, "data_gen", {})
    generate(tiny_target.model, tiny_target.tokenizer, conversations, GenerationSettings(max_new_tokens=24),
             out, tracker)
    return out


def test_collate_marks_positions_whose_next_token_is_response():
    input_ids, attention, positions = collate([{"input_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1]},
                                               {"input_ids": [9, 10], "loss_mask": [0, 1]}], pad_id=0, max_seq_len=16)
    assert input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert attention.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert positions.tolist() == [[False, True, True, False], [True, False, False, False]]


def test_distill_reduces_forward_kl_to_the_target(tiny_target, tmp_path):
    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    dataset_dir = distill_dataset(tiny_target, tmp_path)
    drafter = build_drafter(SPEC, model, tokenizer)
    settings = DistillSettings(epochs=15, batch_size=2, log_every=1, optim=OptimSettings(lr=1e-2, warmup_steps=2))
    tracker = quiet_tracker(tmp_path, "distill")
    distill(drafter, model, tokenizer, dataset_dir, forward_kl, settings, tmp_path / "out", tracker)
    losses = [entry["distill/loss"] for entry in tracker.history]
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()


def test_nan_loss_is_a_clear_error(tiny_target, tmp_path):
    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    dataset_dir = distill_dataset(tiny_target, tmp_path)
    drafter = build_drafter(SPEC, model, tokenizer)

    def broken_loss(student, teacher, mask):
        return forward_kl(student, teacher, mask) * float("nan")

    before = {name: p.detach().clone() for name, p in drafter.named_parameters()}
    with pytest.raises(FloatingPointError, match=r"distill epoch 0 step 0 \(data .*data_gen\): loss is nan"):
        distill(drafter, model, tokenizer, dataset_dir, broken_loss, DistillSettings(), tmp_path / "o",
                quiet_tracker(tmp_path, "distill"))
    assert all(torch.equal(before[name], p) for name, p in drafter.named_parameters())  # nothing was applied


def test_vocabulary_mismatch_names_both_sizes(tiny_target):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(VocabularyMismatchError, match="has 300 entries but the target's has 259"):
        check_same_vocabulary(other, tiny_target.model)
