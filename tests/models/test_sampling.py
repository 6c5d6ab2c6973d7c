"""models/sampling.py: one SamplingSettings and one sampler for data_gen, distill's on-policy answers and the
decoder; the sampler draws in proportion to unnormalised weights; old flat reports still read."""
from __future__ import annotations

import pytest
import torch

from data_gen.generate import GenerationSettings
from eval.decoder import DecodeSettings
from eval.settings import EvalSettings
from models.sampling import SamplingSettings, as_sampling, choose_tokens, draw, make_generator
from tests.conftest import chi_square_p_value
from train.distill import OnPolicySettings


def test_draw_follows_unnormalised_weights():
    weights = torch.tensor([[0.0, 1.0, 2.0, 5.0]])  # sums to 8: the decoder's residuals are not normalised
    generator = make_generator(0)
    counts = torch.bincount(torch.cat([draw(weights, [generator]) for _ in range(8000)]), minlength=4)
    assert counts[0] == 0  # zero weight is never drawn
    assert chi_square_p_value(counts.double(), (weights[0] / weights.sum()).double()) > 1e-3


def test_every_stage_samples_through_the_same_draw():
    logits, settings = torch.randn(3, 50), SamplingSettings(temperature=0.7, top_k=10)
    seeds = [11, 12, 13]
    chosen = choose_tokens(logits, settings, [make_generator(s) for s in seeds])
    from models.sampling import warp_logits
    direct = draw(torch.softmax(warp_logits(logits, settings), -1), [make_generator(s) for s in seeds])
    assert torch.equal(chosen, direct)
    assert torch.equal(choose_tokens(logits, SamplingSettings(), None), logits.argmax(-1))


def test_sampling_is_nested_the_same_way_everywhere():
    block = {"temperature": 0.5, "top_p": 0.9}
    expected = SamplingSettings(temperature=0.5, top_p=0.9)
    assert GenerationSettings(sampling=block).sampling == expected
    assert EvalSettings(decode={"sampling": block}).decode.sampling == expected
    assert DecodeSettings(sampling=block).sampling == expected
    assert OnPolicySettings(sampling=block).sampling == expected
    assert OnPolicySettings().sampling.temperature == 1.0 and EvalSettings().decode.sampling.greedy
    with pytest.raises(ValueError, match=r"sampling has no keys \['temprature'\]"):
        as_sampling({"temprature": 1.0})
    with pytest.raises(ValueError, match="sampling.top_p=0"):
        SamplingSettings(top_p=0)

