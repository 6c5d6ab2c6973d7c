"""Export (models/export.py, export/stage.py): what engines cannot load, or what would not speak the target's vocabulary, is refused;
eval refuses drafters it could only rank by accident (NaN weights)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from infra.settings import SettingsError
from models.drafter import DrafterSpec, VocabularyMismatchError, build_drafter, save_drafter
from export.stage import ExportSettings
from models.export import export_drafter, formats_for
from models.kinds import KINDS
from models.loading import DamagedWeightsError, check_finite, load_causal_lm

SPEC = DrafterSpec(name="d", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)


def saved_drafter(tiny_target, folder, spec=SPEC, token_lists=None):
    drafter = build_drafter(spec, tiny_target.model, tiny_target.tokenizer, token_lists=token_lists)
    save_drafter(drafter, tiny_target.tokenizer, folder)
    return folder


def test_export_refuses_a_reduced_vocabulary_drafter(tiny_target, tmp_path):
    folder = saved_drafter(tiny_target, tmp_path / "d", replace(SPEC, draft_vocab_size=40), token_lists=[[1, 2, 3]])
    with pytest.raises(ValueError, match="reduced draft vocabulary"):
        export_drafter(folder, tmp_path / "out", "card", tiny_target.path)


def test_export_ships_a_good_drafter_with_its_card(tiny_target, tmp_path):
    out = export_drafter(saved_drafter(tiny_target, tmp_path / "d"), tmp_path / "out", "the card", tiny_target.path)
    assert (out / "README.md").read_text() == "the card"
    assert load_causal_lm(out).config.vocab_size == tiny_target.model.config.vocab_size


def test_export_refuses_another_vocabulary_size(tiny_target, tmp_path):
    folder = saved_drafter(tiny_target, tmp_path / "d")
    config = json.loads((folder / "config.json").read_text())
    drafter = build_drafter(SPEC, tiny_target.model, tiny_target.tokenizer)
    drafter.resize_token_embeddings(config["vocab_size"] + 8)
    drafter.save_pretrained(folder)  # the same tokenizer files, a head of 8 more entries
    with pytest.raises(VocabularyMismatchError, match="vocabulary has"):
        export_drafter(folder, tmp_path / "out", "card", tiny_target.path)
    assert not (tmp_path / "out" / "README.md").exists()  # no card claims a shared tokenizer


def test_export_refuses_a_tokenizer_with_two_ids_swapped(tiny_target, tmp_path):
    folder = saved_drafter(tiny_target, tmp_path / "d")
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(VocabularyMismatchError, match="map them differently"):
        export_drafter(folder, tmp_path / "out", "card", tiny_target.path)


def test_export_and_eval_refuse_a_drafter_with_nan_weights(tiny_target, tmp_path):
    drafter = build_drafter(SPEC, tiny_target.model, tiny_target.tokenizer)
    with torch.no_grad():
        for parameter in drafter.parameters():
            parameter.fill_(float("nan"))
    save_drafter(drafter, tiny_target.tokenizer, tmp_path / "d")
    with pytest.raises(DamagedWeightsError, match="NaN or inf"):
        export_drafter(tmp_path / "d", tmp_path / "out", "card", tiny_target.path)
    with pytest.raises(DamagedWeightsError, match="drafter 'distilled'.*NaN or inf"):
        check_finite(load_causal_lm(tmp_path / "d"), "drafter 'distilled'")  # what eval calls on every drafter


def test_a_truncated_weights_file_is_named(tiny_target, tmp_path):
    folder = saved_drafter(tiny_target, tmp_path / "d")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(DamagedWeightsError, match=f"{weights}.*truncated"):
        load_causal_lm(folder)
    weights.write_bytes(b"\x05")
    with pytest.raises(DamagedWeightsError, match=f"{weights} is not a readable safetensors file"):
        load_causal_lm(folder)


def test_each_kind_gets_the_formats_that_hold_it_and_a_mismatch_is_refused_by_name():
    KIND = {kind.name: kind for kind in KINDS}
    assert formats_for(KIND["token"], ("auto",)) == ("hf",)
    assert formats_for(KIND["feature"], ("auto",)) == ("eagle3", "speculators")
    assert formats_for(KIND["feature"], ("speculators",)) == ("speculators",)
    with pytest.raises(SettingsError, match="standalone .token. drafter exports as hf only"):
        formats_for(KIND["token"], ("hf", "eagle3"))
    with pytest.raises(SettingsError, match="hf holds standalone drafters"):
        formats_for(KIND["feature"], ("hf",))
    with pytest.raises(SettingsError, match="training-free"):
        formats_for(KIND["lookup"], ("auto",))
    with pytest.raises(SettingsError, match="name distinct formats"):
        ExportSettings(formats=["hf", "onnx"])


def test_the_card_says_where_each_measured_row_can_be_served():
    """serving_lines: per row of the eval, the engine and settings that serve that way of drafting (the eval's own
    γ or tree), and "draftsmith's decoder only" where no engine does."""
    from eval.report import EvalReport
    from eval.settings import EvalSettings
    from export.stage import serving_lines
    from models.export import eagle_choices

    assert eagle_choices([2, 1]) == [[0], [1], [0, 0], [1, 0]]
    assert eagle_choices([1, 1, 1]) == [[0], [0, 0], [0, 0, 0]]
    rows = ["distilled", "prompt_lookup", "prompt_lookup+ngram", "token_recycling", "distilled+prompt_lookup",
            "distilled&prompt_lookup+ngram"]
    def report(tree: list[int]) -> EvalReport:
        settings = EvalSettings(decode={"gamma": 3, "tree": tree})
        return EvalReport(Path("report.json"), settings, dict.fromkeys(rows, {}), rows[0], {}, tuple(rows[1:4]),
                          tuple(rows[4:]), 1, 1, "float32", "", {})

    lines = dict(line.split(": ", 1) for line in serving_lines(report([])) if line.startswith("- "))
    assert "num_speculative_tokens: 3" in lines["- `distilled`"]
    assert "method: ngram" in lines["- `prompt_lookup`"]
    assert all("decoder only" in lines[f"- `{row}`"] for row in rows[2:])
    tree_line = next(line for line in serving_lines(report([2, 1, 1])) if line.startswith("- `distilled`"))
    assert "eagle_choices=[[0], [1], [0, 0], [1, 0], [0, 0, 0], [1, 0, 0]]" in tree_line
    assert "--speculative-eagle-topk 2" in tree_line and "--speculative-num-draft-tokens 7" in tree_line



def test_the_export_stage_takes_gamma_and_the_table_from_the_eval_report(tiny_target, tmp_path):
    """The card gives the γ the eval measured with (5 here, not the decoder's default of 4) and its table, read
    through the typed report; a report whose settings do not fit is refused with its path, never read with a
    default."""
    from eval.decoder import DecodeSettings
    from eval.settings import EvalSettings
    from export.stage import ExportSettings, run_stage
    from infra.stage import StageRun
    from tests.conftest import TINY_TARGET, quiet_tracker
    from tests.eval.test_report import report_dict

    drafter = saved_drafter(tiny_target, tmp_path / "d")
    run_dir = tmp_path / "run"
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / "meta.json").write_text("{}")
    report = report_dict(EvalSettings(decode=DecodeSettings(gamma=5)), str(drafter))
    (run_dir / "eval" / "report.json").write_text(json.dumps(report))

    def export(name: str) -> dict:
        out = run_dir / f"{name}.partial"
        out.mkdir()
        stage = StageRun(stage="export", out_dir=out, run_dir=run_dir, cache_dir=tiny_target.path.parent.parent,
                         tracker=quiet_tracker(tmp_path, "export"), config={"experiment": "x", "run_name": "y"},
                         target_identity={}, load_target=lambda: tiny_target)
        return run_stage(stage, ExportSettings(name=name), TINY_TARGET)

    summary = export("a")
    card = (run_dir / "a.partial" / "a" / "README.md").read_text()
    assert summary["drafter"] == "distilled" and '"num_speculative_tokens": 5' in card and "γ=5" in card
    assert "| the table |" in card and "greedy fp32: 2 of 2 equal" in card
    report["settings"]["gamma"] = 5  # as reports were written before eval.decode
    (run_dir / "eval" / "report.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match=r"eval/report\.json: written with eval settings .*\['gamma'\]"):
        export("b")
