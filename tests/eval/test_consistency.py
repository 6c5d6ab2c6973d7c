"""What the eval measures and what distill optimises cannot drift apart: on the target's own greedy answers,
1. the decoder's acceptance of each step's first draft equals the drafter's teacher-forced top-1 agreement with
   the target at the same answer positions, computed by the training code's forward (`train.core.engine.logits_at`
   for a token-level drafter, `train.core.features.feature_batch` for a feature-level one);
2. distill's acceptance proxy (what `select=proxy` picks checkpoints by) equals the mean Σ min(p, q) over the
   answer tokens with q taken from the decoder's own view of the drafter (its `catch_up` on each prefix).
An off-by-one or a template mismatch on either side breaks the equality. The drafters are trained a little first on
the rows decoded here, so agreement is neither 0 nor 1. In every family (`family_target`: Llama, Qwen2, Gemma 3).
"""
from __future__ import annotations

import pytest
import torch

from eval.decoder import DecodeSettings, plain_generate, speculative_generate
from losses.feature import FeatureLoss
from losses.kl import forward_kl
from losses.mix import LossMix
from models.cache import captured_layers
from models.drafter import DrafterSpec, build_drafter
from models.feature_drafter import FeatureDrafterSpec, build_feature_drafter
from models.kinds import draft_for
from tests.conftest import quiet_tracker
from train.core.engine import logits_at
from train.core.features import FeatureTraining, feature_batch
from train.core.objectives import FeatureObjective, acceptance_proxy
from train.core.optim import OptimSettings
from train.core.rows import Row, collate, read_rows, split_heldout
from train.distill import DistillSettings, distill

KINDS = ("token", "feature", "eagle3")  # eagle3: fused target layers, a draft vocabulary, a training-time test


@pytest.fixture(scope="module")
def trained(family_target, family_records, tmp_path_factory):
    """{kind: drafter trained for a few steps}, and the held-out prompts with the target's greedy answers."""
    model, tokenizer = family_target.model, family_target.tokenizer
    settings = DistillSettings(epochs=6, batch_size=2, heldout_records=4, optim=OptimSettings(lr=1e-2, warmup_steps=2))
    token = build_drafter(DrafterSpec(name="d", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                                      intermediate_size=64), model, tokenizer)
    feature = build_feature_drafter(FeatureDrafterSpec(), model)
    answers = [row.input_ids[len(row.prompt_ids):] for row in read_rows(family_records, "online")]
    eagle3 = build_feature_drafter(FeatureDrafterSpec(feature_layers=(0, 1), draft_vocab_size=96, layout="eagle3"),
                                    model, answers)
    for drafter, loss in ((token, LossMix({"fkl": {"fn": forward_kl}})), (feature, FeatureLoss()),
                          (eagle3, FeatureLoss(feature_weight=0.0, token_weight=1.0, unroll=2))):
        out = tmp_path_factory.mktemp("consistency")
        distill(drafter, model, tokenizer, family_records, loss, settings, out, quiet_tracker(out))
    trained_on, _ = split_heldout(read_rows(family_records, "online"), 4)  # rows it learnt: agreement is not ~0
    prompts = [row.prompt_ids for row in trained_on[:4]]
    answers = plain_generate(model, prompts, DecodeSettings(max_new_tokens=24), stop_ids=[])
    rows = [Row(id=str(i), input_ids=p + a, loss_mask=[0] * len(p) + [1] * len(a), prompt_ids=p)
            for i, (p, a) in enumerate(zip(prompts, answers))]
    return {"token": token.eval(), "feature": feature.eval(), "eagle3": eagle3.eval()}, rows


def teacher_forced_predictions(kind: str, drafter, target, row: Row) -> list[int]:
    """The drafter's top-1 for every answer token of `row`, as the training code computes it."""
    with torch.no_grad():
        if kind == "token":
            input_ids, attention, positions, _ = collate([row], 0, 4096, target.device)
            logits = logits_at(drafter, input_ids, attention, positions)
        else:
            steps, _ = feature_batch(FeatureTraining(drafter, 1, compact=False), target, drafter, [row], 0, 4096,
                                     compact=False)
            logits = steps[0][2]
    return logits[0].argmax(-1).tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_first_draft_acceptance_equals_teacher_forced_agreement(family_target, trained, kind):
    drafters, rows = trained
    target, drafter = family_target.model, drafters[kind]
    decoded, forced = [], []
    for row in rows:
        generation = speculative_generate(target, draft_for(drafter, target), [row.prompt_ids],
                                          DecodeSettings(gamma=3, max_new_tokens=24), stop_ids=[])[0]
        answer = row.input_ids[len(row.prompt_ids):]
        assert generation.tokens == answer  # greedy: lossless, so the steps walk the same answer
        predictions, offset = teacher_forced_predictions(kind, drafter, target, row), 0
        assert len(predictions) == len(answer)
        for accepted in generation.stats.accepted_per_step:
            if offset + 1 < len(answer):  # the step drafted (the last token of a budget is never drafted)
                decoded.append(accepted >= 1)
                forced.append(predictions[offset] == answer[offset])
            offset += accepted + 1
    assert decoded == forced
    assert 0 < sum(forced) < len(forced), "the drafter must agree sometimes, not always"


@pytest.mark.parametrize("kind", KINDS)
def test_the_acceptance_proxy_is_the_decoders_expected_acceptance(family_target, trained, kind):
    drafters, rows = trained
    target, drafter = family_target.model, drafters[kind]
    if kind == "token":
        proxy = acceptance_proxy(drafter, target, rows, 0, 4096, 2)
    else:
        objective = FeatureObjective(None, target, family_target.tokenizer, FeatureLoss(),
                                     DistillSettings(max_seq_len=4096), None)
        proxy = objective.proxy(drafter, rows, 2)
    overlaps = []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row.input_ids])
            p = torch.softmax(target(ids).logits[0].float(), -1)
            with captured_layers(target, getattr(drafter, "feature_layers", None)) as captured:
                features = target.get_decoder()(input_ids=ids).last_hidden_state
            features = features if captured[0] is None else captured[0]  # what the decoder keeps
            for t in range(len(row.prompt_ids), len(row.input_ids)):  # answer token t
                draft = draft_for(drafter, target)
                draft.start(1, len(row.input_ids) + 4)
                q = torch.softmax(draft.catch_up([row.input_ids[:t]], features).float(), -1)[0]
                overlaps.append(float(torch.minimum(p[t - 1], q).sum()))
    assert proxy == pytest.approx(sum(overlaps) / len(overlaps), abs=1e-5)
