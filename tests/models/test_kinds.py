"""Every drafter kind answers the same interface: built from its spec, saved, found and loaded again from its
folder, drafting for the decoder, its per-token cost; the stages dispatch on nothing else."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from models.draft import Draft
from models.drafter import DrafterSpec, TokenDraft
from models.eagle3_export import FORMATS
from models.feature_drafter import FeatureDraft, FeatureDrafterSpec
from models.kinds import KINDS, draft_for, kind_of, kind_of_folder, kind_of_spec, load_any
from models.lookup import LookupSpec
from tests.conftest import REPO_ROOT
from train.core.objectives import OBJECTIVES
from train.online.learners import LEARNERS

SPECS = {"token": DrafterSpec(name="d", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                              intermediate_size=64),
         "feature": FeatureDrafterSpec(feature_sampling=True)}
DRAFTS = {"token": TokenDraft, "feature": FeatureDraft}


@pytest.mark.parametrize("name", list(SPECS))
def test_a_kind_builds_saves_finds_loads_and_drafts(tiny_target, tmp_path, name):
    spec = SPECS[name]
    kind = kind_of_spec(spec)
    assert kind.name == name and kind.pretrainable == (name == "token")
    assert kind.training == {"token": "tokens", "feature": "features"}[name]
    drafter = kind.build(spec, tiny_target).eval()
    assert kind_of(drafter) is kind
    folder = kind.save(drafter, tiny_target, tmp_path / name)
    assert kind_of_folder(folder) is kind and [k.name for k in KINDS if k.saved_in(folder)] == [name]
    loaded = load_any(folder, tiny_target)
    probe = torch.randint(0, tiny_target.model.config.vocab_size, (1, 6))
    with torch.no_grad():
        if name == "token":
            assert torch.equal(loaded(probe).logits, drafter(probe).logits)
        else:
            features = tiny_target.model.get_decoder()(input_ids=probe).last_hidden_state
            embeddings = tiny_target.model.get_input_embeddings()(probe)
            attention = torch.ones(1, 6)
            assert torch.equal(loaded(features, embeddings, attention), drafter(features, embeddings, attention))
    assert isinstance(draft_for(loaded, tiny_target.model), DRAFTS[name])
    own = sum(p.numel() for p in drafter.parameters())
    head = tiny_target.model.get_output_embeddings().weight.numel()
    assert kind.parameters_per_token(drafter, tiny_target.model) == own + (head if name == "feature" else 0)


def test_what_is_no_drafter_is_refused(tmp_path):
    with pytest.raises(TypeError, match="not the spec of a drafter kind"):
        kind_of_spec(object())
    with pytest.raises(FileNotFoundError, match="holds no saved drafter"):
        kind_of_folder(tmp_path)
    with pytest.raises(TypeError, match="not a drafter of a known kind"):
        kind_of(torch.nn.Linear(2, 2))


def test_every_kind_provides_what_a_kind_must(tiny_target, tmp_path):
    """The checklist of a drafter kind (models/kinds.py): a spec, a conf file for a trainable kind, build / save /
    find / load, a `Draft` with every member the decoder uses, its per-token cost, and for a trainable kind a distill
    objective, an online learner and the export formats that hold it."""
    specs = SPECS | {"lookup": LookupSpec()}
    conf_targets = {OmegaConf.load(path)._target_ for path in (REPO_ROOT / "conf" / "drafter").glob("*.yaml")}
    names = [kind.name for kind in KINDS]
    assert len(set(names)) == len(names) and set(names) == set(specs), "a test spec for every kind in KINDS"
    for kind in KINDS:
        spec_path = f"{kind.spec_type.__module__}.{kind.spec_type.__qualname__}"
        assert dataclasses.is_dataclass(kind.spec_type) and kind_of_spec(specs[kind.name]) is kind
        assert (spec_path in conf_targets) == kind.trainable, f"{kind.name}: a conf/drafter/*.yaml naming {spec_path}"
        drafter = kind.build(specs[kind.name], tiny_target, token_lists=[[1, 2, 3, 1, 2]])
        assert isinstance(drafter, kind.model_type) and kind_of(drafter) is kind
        folder = kind.save(drafter, tiny_target, tmp_path / kind.name)
        assert kind_of_folder(folder) is kind and isinstance(kind.load(folder, tiny_target), kind.model_type)
        draft = kind.draft(drafter, tiny_target.model)
        assert isinstance(draft, Draft), f"{kind.name}'s draft lacks a member of models.draft.Draft"
        assert kind.parameters_per_token(drafter, tiny_target.model) >= 0
        if kind.trainable:
            assert kind.training in OBJECTIVES and kind.training in LEARNERS, kind.name
            assert kind.export_formats and set(kind.export_formats) <= {"hf", *FORMATS}, kind.name
            assert kind.vocabulary_of(drafter) is not None
        else:
            assert kind.training is None and kind.export_formats == () and not kind.pretrainable
