"""Stage pretrain on the tiny target: it learns and saves safetensors; drafters refuse another vocabulary."""
from __future__ import annotations

import pytest
import torch

from models.drafter import DrafterSpec, VocabularyMismatchError, build_drafter, check_same_vocabulary, load_drafter
from train.optim import OptimSettings
from train.pretrain import PretrainSettings, block_inputs, pack_documents, pretrain
from train.tracking import LoggerSettings, Tracker

SPEC = DrafterSpec(name="d", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)


def quiet_tracker(tmp_path, stage):
    return Tracker(LoggerSettings(backend="none", mode="disabled"), tmp_path, stage, {})


def test_pack_documents_cuts_fixed_blocks_and_tracks_documents():
    blocks = pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4)
    assert blocks.tokens.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert blocks.documents.tolist() == [[0, 0, 0, 1], [0, 1, 1, 1]]  # a cut document continues as a new segment
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_documents([[1, 2]], seq_len=4)


def test_block_inputs_keep_attention_positions_and_targets_inside_documents():
    blocks = pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=9)
    attention, position_ids, positions, labels = block_inputs(blocks.tokens, blocks.documents, document_mask=True)
    assert position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert positions.tolist() == [[True, True, False, True, False, True, True, True, False]]
    assert labels[positions].tolist() == [2, 3, 5, 7, 8, 9]
    assert attention[0, 0, 4].tolist() == [False, False, False, True, True, False, False, False, False]
    _, flat_positions, flat_targets, _ = block_inputs(blocks.tokens, blocks.documents, document_mask=False)
    assert flat_positions.tolist() == [list(range(9))] and flat_targets[0, :-1].all()


def test_packed_forward_equals_each_document_alone(tiny_target):
    from train.engine import logits_at

    drafter = build_drafter(SPEC, tiny_target.model, tiny_target.tokenizer).eval()
    documents = [[5, 9, 13, 2, 7], [11, 3, 8], [4, 6, 10, 12]]
    blocks = pack_documents(documents, seq_len=12)
    attention, position_ids, positions, _ = block_inputs(blocks.tokens, blocks.documents, document_mask=True)
    every = torch.ones_like(positions)
    with torch.no_grad():
        packed = logits_at(drafter, blocks.tokens, attention, every, position_ids)[0]
        alone = torch.cat([drafter(torch.tensor([d])).logits[0] for d in documents])
    assert torch.allclose(packed, alone, atol=1e-5)


def test_text_corpus_reads_txt_jsonl_and_folders(tmp_path):
    from data_gen.sources import SourceFormatError, SourceReport, text_documents

    (tmp_path / "a.txt").write_text("first document\n")
    (tmp_path / "b.jsonl").write_text('{"text": "second"}\n{"text": ""}\n{"text": "third"}\n')
    report = SourceReport(path=str(tmp_path))
    assert list(text_documents(tmp_path, report)) == ["first document\n", "second", "third"]
    assert report.kept == 3 and report.skipped["empty document"] == 1
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(SourceFormatError, match=r"c.jsonl:2: expected an object with a \"text\" string"):
        list(text_documents(tmp_path, SourceReport(path="")))
    skipping = SourceReport(path="")
    assert list(text_documents(tmp_path, skipping, bad_records="skip"))[-1] == "ok"
    assert skipping.bad_locations == [f"{tmp_path / 'c.jsonl'}:2"]


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
    curve = (tmp_path / "curve.jsonl").read_text().splitlines()
    assert len(curve) == 30
    reloaded = load_drafter(tmp_path / "model", model, tokenizer)
    probe = torch.tensor([documents[0][:32]])
    assert torch.allclose(reloaded(probe).logits, drafter(probe).logits, atol=1e-5)


def test_pretrain_resumes_from_its_newest_checkpoint_exactly(tiny_target, tmp_path):
    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    documents = [tokenizer(f"document {i}: " + "lorem ipsum dolor sit amet " * (i + 2))["input_ids"] for i in range(30)]
    settings = PretrainSettings(steps=10, batch_size=4, seq_len=32, log_every=1, checkpoint_every=4,
                                optim=OptimSettings(lr=1e-2, warmup_steps=2))
    pretrain(build_drafter(SPEC, model, tokenizer), tokenizer, documents, settings, tmp_path, quiet_tracker(tmp_path,
             "pretrain"))
    uninterrupted = (tmp_path / "curve.jsonl").read_text()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000004", "step-0000008"]
    # a second call finds step 8 and redoes steps 8-9 from it: they must come out identical
    summary = pretrain(build_drafter(SPEC, model, tokenizer), tokenizer, documents, settings, tmp_path,
                       quiet_tracker(tmp_path, "pretrain"))
    assert summary["resumed_at"] == 8
    assert (tmp_path / "curve.jsonl").read_text() == uninterrupted


def test_vocabulary_mismatch_names_both_sizes(tiny_target):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(VocabularyMismatchError, match="has 300 entries but the target's has 259"):
        check_same_vocabulary(other, tiny_target.model)


def test_target_layers_init_copies_the_target_exactly_at_full_size_and_projects_when_narrower(tiny_target):
    from dataclasses import replace

    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    config = model.config
    full = DrafterSpec(name="copy", hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
                       num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                       intermediate_size=config.intermediate_size, init="target_layers",
                       tie_embeddings=config.tie_word_embeddings)
    probe = torch.tensor([[3, 17, 42, 99, 7, 250]])
    with torch.no_grad():
        copy = build_drafter(full, model, tokenizer)
        assert torch.allclose(copy(probe).logits, model(probe).logits, atol=1e-5)
        assert build_drafter(replace(full, num_layers=1), model, tokenizer).config.copied_target_layers == [0]
        narrow = build_drafter(replace(full, hidden_size=32, num_layers=1), model, tokenizer)
        assert torch.isfinite(narrow(probe).logits).all()
    # the narrow copy lives in a 32-dimensional orthonormal projection of the target's hidden space
    embeddings, projected = model.get_input_embeddings().weight, narrow.get_input_embeddings().weight
    basis = torch.linalg.lstsq(embeddings, projected).solution  # [64, 32]
    assert torch.allclose(embeddings @ basis, projected, atol=1e-4)
    assert torch.allclose(basis.T @ basis, torch.eye(32), atol=1e-3)
    layer, their_layer = narrow.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(layer, their_layer @ basis, atol=1e-4)
    with pytest.raises(ValueError, match=r"drafter.num_heads=2 \(target 4\)"):
        build_drafter(replace(full, num_heads=2, num_kv_heads=2), model, tokenizer)
