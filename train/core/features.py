"""Feature-level drafters' (EAGLE, FSPAD) training pieces, shared by the distill stage's `FeatureObjective`
(`train/core/objectives.py`) and the online stage's `FeatureLearner` (`train/online/learners.py`).

One frozen target forward (or the feature cache) gives the features f and, through its LM head, the teacher
distributions; the drafter reads (f_t, e(x_{t+1})) and predicts f̂_{t+1}; the target's head turns that into the
drafter's distribution over x_{t+2}. The loss (`losses.feature.FeatureLoss`) is taken where x_{t+2} is an answer
token. The acceptance proxy is Σ min(p, q) for the first drafted token on held-out answers.
"""
from __future__ import annotations

import torch
from transformers import PreTrainedModel

from losses.tvd import expected_acceptance
from models.cache import captured_layers
from models.drafter import to_draft_vocabulary
from train.core.feature_cache import FeatureCache
from train.core.rows import Row, collate


class FeatureTraining(torch.nn.Module):
    """The module the training engine wraps: the drafter unrolled `steps` times (training-time test, EAGLE-3) and,
    when it has its own head (a draft vocabulary), its compact logits at each step's scored positions, so every
    trained weight is used inside the engine's forward (ZeRO-3 gathers them there)."""

    def __init__(self, drafter: torch.nn.Module, steps: int, compact: bool = True) -> None:
        super().__init__()
        self.drafter, self.steps, self.compact = drafter, steps, compact

    def forward(self, features: torch.Tensor, next_embeddings: torch.Tensor, attention: torch.Tensor,
                masks: list[torch.Tensor]):
        outputs = self.drafter.unrolled(features, next_embeddings, attention, self.steps)
        if self.drafter.head is None:
            return outputs, None
        return outputs, [self.drafter.logits(output[mask], None, compact=self.compact).unsqueeze(0)
                         for output, mask in zip(outputs, masks)]


def step_masks(scored: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Scored positions [B, T] per unrolled step: step j at t needs a true feature at t - j ≥ 0."""
    index = torch.arange(scored.shape[1], device=scored.device)[None, :]
    return [scored & (index >= j) for j in range(steps)]


def feature_batch(forward, target: PreTrainedModel, drafter: torch.nn.Module, rows: list[Row], pad_id: int,
                  max_seq_len: int, noise: float = 0.0, steps: int = 1, every_position: bool = False,
                  compact: bool = True, cache: FeatureCache | None = None,
                  lookup_hits: dict[str, list[bool]] | None = None, hit_weight: float = 1.0):
    """Per unrolled step j: (predicted features, target features, drafter logits, teacher logits, draft labels,
    mask, keep), the first two [B, T-1, d], the mask [B, T-1] and keep [1, N] (the positions the token term
    scores): index t holds the (j+1)-th draft's prediction of the
    token x_{t+2} (step 0: of f_{t+1}); and the tokens read. `forward` is the training module's forward (or the
    engine's); logits are [1, N, V'] over the mask's N positions, V' the draft vocabulary where the drafter has
    one and `compact` (the teacher restricted to it, positions whose label or teacher choice falls outside it
    left out), else the full vocabulary (`forward` must then give full logits: `FeatureTraining(compact=False)`).
    With a `cache` (train/core/feature_cache.py) the target's side is read from it instead of computed. With
    `lookup_hits` (row id -> whether prompt lookup guesses each token, `models.lookup.prompt_lookup_hits`), a
    position whose label the lookup guesses stays in `keep` with probability `hit_weight` (lookup-aware
    distillation), drawn from torch's generator."""
    input_ids, attention, positions, _ = collate(rows, pad_id, max_seq_len, target.device, every_position)
    top1 = None
    with torch.no_grad(), captured_layers(target, None if cache else drafter.feature_layers) as captured:
        if cache is not None:
            fused, features, top1 = cache.batch(rows, max_seq_len, target.device)
        else:
            features = target.get_decoder()(input_ids=input_ids, attention_mask=attention).last_hidden_state
            fused = features if captured[0] is None else captured[0]
        embeddings = drafter.input_embeddings(target)(input_ids)
    inputs = fused[:, :-1]
    if noise:
        inputs = inputs + (torch.rand_like(inputs) * 2 - 1) * noise
    masks = step_masks(positions[:, 1:], steps)  # x_{t+2} is a scored token
    predicted, own_logits = forward(inputs, embeddings[:, 1:], attention[:, :-1] * attention[:, 1:], masks)
    head = target.get_output_embeddings()
    labels = torch.roll(input_ids, -2, dims=1)[:, :-1]
    d2t = drafter.head.d2t if drafter.head is not None and compact else None
    vocab_size = target.config.vocab_size
    if d2t is not None and top1 is not None:  # the cache knows the teacher's top-1: its head over d2t suffices
        restricted = head.weight[d2t].detach()
    # every step scores a subset of step 0's positions with the same teacher: its logits are computed once
    first = masks[0]
    with torch.no_grad():
        if d2t is not None and top1 is not None:
            teacher_logits = torch.nn.functional.linear(features[:, 1:][first], restricted).float().unsqueeze(0)
        else:
            teacher_logits = head(features[:, 1:][first]).unsqueeze(0)
    draft_labels = labels[first].unsqueeze(0)
    keep = torch.ones(1, int(first.sum()), dtype=torch.bool, device=first.device)
    if d2t is not None:
        teacher_logits, draft_labels, keep = to_draft_vocabulary(
            teacher_logits, draft_labels, d2t, vocab_size, None if top1 is None else top1[:, 1:][first].unsqueeze(0))
    if lookup_hits is not None and hit_weight < 1:
        width = labels.shape[1]  # index t holds the label x_{t+2}
        hit = torch.tensor([(lookup_hits[row.id][2: 2 + width] + [False] * width)[:width] for row in rows],
                           device=first.device)[first].unsqueeze(0)
        keep = keep & ~(hit & (torch.rand(hit.shape, device=hit.device) >= hit_weight))
    parts = []
    for j, (output, mask) in enumerate(zip(predicted, masks)):
        student_logits = head(output[mask]).unsqueeze(0) if own_logits is None else own_logits[j]
        subset = mask[first]  # step j's positions among step 0's, in the same order
        parts.append((output, features[:, 1:], student_logits, teacher_logits[:, subset], draft_labels[:, subset],
                      mask, keep[:, subset]))
    return parts, int(attention.sum())


@torch.no_grad()
def first_draft_acceptance(model: torch.nn.Module, target: PreTrainedModel, rows: list[Row], pad_id: int,
                           max_seq_len: int, batch_size: int, cache: FeatureCache | None = None) -> float:
    """Σ min(p, q) of the drafter's first draft at the rows' scored positions (mean over them), p and q over the
    target's whole vocabulary (q is 0 outside a draft vocabulary), as the decoder sees them."""
    total, count = 0.0, 0
    module = FeatureTraining(model, 1, compact=False)
    for start in range(0, len(rows), batch_size):
        steps, _ = feature_batch(module, target, model, rows[start: start + batch_size], pad_id, max_seq_len,
                                 compact=False, cache=cache)
        _, _, student, teacher, _, mask, _ = steps[0]
        n = int(mask.sum())
        total += float(expected_acceptance(student, teacher, torch.ones(1, n, dtype=torch.bool))) * n
        count += n
    return total / max(count, 1)


