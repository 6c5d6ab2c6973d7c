"""Feature-level drafters (EAGLE, FSPAD): causal, learn the target's features and first-token distribution on the
tiny target, save and load; the partial-alignment loss regresses only its share of the feature dimensions."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from infra.tracking import LoggerSettings, Tracker
from losses.feature import FeatureLoss, feature_regression
from models.feature_drafter import FeatureDrafterSpec, build_feature_drafter, load_feature_drafter
from train.distill import DistillSettings
from train.feature_distill import distill_features
from train.optim import OptimSettings


def test_feature_regression_full_partial_and_masked():
    predicted, target = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    expected = F.smooth_l1_loss(predicted[mask], target[mask])
    assert torch.allclose(feature_regression(predicted, target, mask), expected)
    changed = predicted.clone()
    changed[..., 4:] += 5.0          # dimensions outside the aligned half
    changed[~mask] = float("nan")   # masked positions
    assert torch.allclose(feature_regression(changed, target, mask, aligned_fraction=0.5),
                          feature_regression(predicted, target, mask, aligned_fraction=0.5))
    assert not torch.allclose(feature_regression(changed.nan_to_num(), target, mask),
                              feature_regression(predicted, target, mask))
    with pytest.raises(ValueError, match="aligned_fraction"):
        feature_regression(predicted, target, mask, aligned_fraction=0.0)


@pytest.mark.parametrize("sampling, loss", [(False, FeatureLoss(feature_noise=0.1)),
                                            (True, FeatureLoss(aligned_fraction=0.5, feature_noise=0.1))],
                         ids=["eagle", "fspad"])
def test_feature_drafter_learns_and_round_trips(tiny_target, records_dir, tmp_path, sampling, loss):
    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    drafter = build_feature_drafter(FeatureDrafterSpec(feature_sampling=sampling), model)
    settings = DistillSettings(epochs=8, batch_size=2, heldout_records=2, log_every=1,
                               optim=OptimSettings(lr=3e-3, warmup_steps=2))
    summary = distill_features(drafter, model, tokenizer, records_dir, loss, settings, tmp_path,
                               Tracker(LoggerSettings(backend="none", mode="disabled"), tmp_path, "distill", {}))
    curve = [json.loads(line) for line in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert sum(e["feature"] for e in curve[-4:]) < sum(e["feature"] for e in curve[:4])
    proxies = [entry["proxy"] for entry in summary["acceptance_proxy"]]
    assert proxies[-1] > proxies[0]
    reloaded = load_feature_drafter(tmp_path / "last", model)
    features, embeddings, attention = torch.randn(1, 5, 64), torch.randn(1, 5, 64), torch.ones(1, 5)
    with torch.no_grad():
        assert torch.equal(reloaded(features, embeddings, attention), drafter.eval()(features, embeddings, attention))
    assert reloaded.spec.feature_sampling is sampling


def test_settings_the_feature_loop_does_not_honour_are_refused_by_name(tiny_target, records_dir, tmp_path):
    from models.drafter import LoraSettings
    from train.distill import OnPolicySettings
    from train.engine import DeepSpeedSettings

    drafter = build_feature_drafter(FeatureDrafterSpec(), tiny_target.model)
    settings = DistillSettings(select="decoder", checkpoint_every=5, lora=LoraSettings(), accumulation=2,
                               batch_size=4, on_policy=OnPolicySettings(ratio=0.5), teacher="offline")
    with pytest.raises(ValueError) as refused:
        distill_features(drafter, tiny_target.model, tiny_target.tokenizer, records_dir, FeatureLoss(), settings,
                         tmp_path, None, DeepSpeedSettings(enabled=True, stage=2))
    for key in ("distill.select='decoder'", "distill.checkpoint_every=5", "distill.lora=", "distill.accumulation=2",
                "distill.on_policy.ratio=0.5", "distill.teacher='offline'", "deepspeed=zero2"):
        assert key in str(refused.value)
    assert not list(tmp_path.iterdir())  # refused before anything was written
