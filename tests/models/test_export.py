"""Export (models/export.py): what engines cannot load is refused."""
from __future__ import annotations

import pytest

from models.drafter import DrafterSpec, build_drafter

SPEC = DrafterSpec(name="d", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)


def test_export_refuses_a_reduced_vocabulary_drafter(tiny_target, tmp_path):
    from dataclasses import replace

    from models.drafter import save_drafter
    from models.export import export_drafter

    drafter = build_drafter(replace(SPEC, draft_vocab_size=40), tiny_target.model, tiny_target.tokenizer,
                            token_lists=[[1, 2, 3]])
    save_drafter(drafter, tiny_target.tokenizer, tmp_path / "d")
    with pytest.raises(ValueError, match="reduced draft vocabulary"):
        export_drafter(tmp_path / "d", tmp_path / "out", "card")
