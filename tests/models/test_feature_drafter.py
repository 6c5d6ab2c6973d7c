"""Feature-level drafters (models/feature_drafter.py): causal over the sequence."""
from __future__ import annotations

import pytest
import torch

from models.feature_drafter import FeatureDrafterSpec, build_feature_drafter


def test_feature_drafter_is_causal(tiny_target):
    drafter = build_feature_drafter(FeatureDrafterSpec(feature_sampling=True), tiny_target.model).eval()
    features, embeddings = torch.randn(1, 6, 64), torch.randn(1, 6, 64)
    attention = torch.ones(1, 6, dtype=torch.long)
    later = features.clone()
    later[:, 4:] = torch.randn(1, 2, 64)
    with torch.no_grad():
        assert torch.allclose(drafter(features, embeddings, attention)[:, :4],
                              drafter(later, embeddings, attention)[:, :4], atol=1e-6)


def test_auto_feature_layers_take_a_low_a_middle_and_a_high_layer_of_any_depth(family_target):
    """drafter.feature_layers=auto (conf/drafter/eagle3.yaml): SmolLM2's 30 layers give the 2, 15, 27 the quickstart
    always used; shallow targets get distinct layers inside their depth; anything else is refused by key."""
    from infra.settings import SettingsError
    from models.feature_drafter import auto_feature_layers

    assert auto_feature_layers(30) == (2, 15, 27) and auto_feature_layers(24) == (2, 12, 21)
    assert auto_feature_layers(18) == (2, 9, 15) and auto_feature_layers(2) == (0, 1)
    model = family_target.model
    built = build_feature_drafter(FeatureDrafterSpec(feature_layers="auto", layout="eagle3", draft_vocab_size=32),
                                  model, [list(range(5, 100))])
    assert built.spec.feature_layers == auto_feature_layers(model.config.num_hidden_layers)
    assert all(0 <= layer < model.config.num_hidden_layers for layer in built.feature_layers)
    with pytest.raises(SettingsError, match="drafter.feature_layers='middle'"):
        FeatureDrafterSpec(feature_layers="middle")
