"""Stage pretrain on the tiny target: it learns and saves safetensors; drafters refuse another vocabulary."""
from __future__ import annotations

import pytest
import torch

from models.drafter import DrafterSpec, build_drafter, load_drafter
from tests.conftest import quiet_tracker
from train.core.optim import OptimSettings
from train.pretrain import PretrainSettings, block_inputs, pack_documents, pretrain

SPEC = DrafterSpec(name="d", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)


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
    from train.core.engine import logits_at

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
