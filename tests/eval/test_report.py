"""An eval report read back (eval/report.py): the settings the eval ran with, as the class it made them from, or a
refusal that names the file. The export stage reads its γ and shape from there (no default of its own)."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from eval.decoder import DecodeSettings
from eval.report import EvalReport
from eval.settings import EvalSettings


def report_dict(settings: EvalSettings, drafter_path: str = "/nowhere") -> dict:
    return {"settings": asdict(settings), "drafters": {"distilled": {"lossless_check": "greedy fp32: 2 of 2 equal"}},
            "best": "distilled", "drafter_paths": {"distilled": drafter_path}, "baselines": [], "hybrids": [],
            "num_prompts": 1, "num_turns": 2, "dtype": "float32", "table_markdown": "| the table |"}


def test_a_report_reads_back_as_the_settings_it_was_made_with(tmp_path):
    settings = EvalSettings(decode=DecodeSettings(gamma=5, tree=(2, 1), max_new_tokens=7), turns=1,
                            merged=("prompt_lookup+ngram",))
    (tmp_path / "report.json").write_text(json.dumps(report_dict(settings)))
    for path in (tmp_path, tmp_path / "report.json"):  # the stage folder or the file
        read = EvalReport.read(path)
        assert read.settings == settings and read.best == "distilled" and read.num_turns == 2
        assert read.lossless_check == "greedy fp32: 2 of 2 equal"


@pytest.mark.parametrize("damage, message", [
    (lambda d: d["settings"].update(gamma=3), r"report\.json: written with eval settings .*\['gamma'\].*eval\.decode"),
    (lambda d: d.pop("best"), r"report\.json: not an eval report \(no \['best'\]\)"),
    (lambda d: d["settings"]["decode"].update(gamma=0), r"report\.json: its recorded settings do not build "
                                                         r"\(gamma=0: must be ≥ 1\)"),
])
def test_a_report_that_does_not_fit_is_refused_with_its_path(tmp_path, damage, message):
    data = report_dict(EvalSettings())
    damage(data)
    (tmp_path / "report.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        EvalReport.read(tmp_path)


def test_an_unreadable_or_missing_report_is_named(tmp_path):
    (tmp_path / "report.json").write_text('{"settings": ')
    with pytest.raises(ValueError, match=r"report\.json: not a readable eval report"):
        EvalReport.read(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"elsewhere/report\.json: no eval report there"):
        EvalReport.read(tmp_path / "elsewhere" / "report.json")
