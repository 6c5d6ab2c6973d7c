"""Feature-level drafters (models/feature_drafter.py): causal over the sequence."""
from __future__ import annotations

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
