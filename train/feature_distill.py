"""What a feature-level drafter (EAGLE, FSPAD) learns from, for the distill stage's one training loop
(`train/distill.py`, which gives it checkpoints and exact resume, DeepSpeed data parallel, LoRA, accumulation and
`select=proxy|decoder|last`, as for token drafters).

    python train/run.py +experiment=smoke stages=[data_gen,distill] drafter=fspad loss=fspad

One frozen target forward gives the features f (last hidden states) and, through its LM head, the teacher
distributions; the drafter reads (f_t, e(x_{t+1})) and predicts f̂_{t+1}; the target's head turns that into the
drafter's distribution over x_{t+2}. The loss (`losses.feature.FeatureLoss`) is taken where x_{t+2} is an answer
token. The acceptance proxy is Σ min(p, q) for the first drafted token on held-out answers. Settings this
objective cannot honour (an offline teacher, on-policy answers) are refused by key before anything is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from losses.feature import FeatureLoss
from losses.tvd import expected_acceptance
from models.feature_drafter import FeatureDraft
from train.rows import Row, collate

if TYPE_CHECKING:
    from train.distill import DistillSettings


def feature_batch(forward, target: PreTrainedModel, rows: list[Row], pad_id: int, max_seq_len: int,
                  noise: float = 0.0):
    """(predicted features, target features, drafter logits, teacher logits, mask, tokens read), each of the first
    five [B, T-1, ...]: index t holds the prediction of f_{t+1} and of the token x_{t+2}. `forward` is the
    drafter's forward (or the training engine's)."""
    input_ids, attention, positions, _ = collate(rows, pad_id, max_seq_len, target.device)
    with torch.no_grad():
        features = target.get_decoder()(input_ids=input_ids, attention_mask=attention).last_hidden_state
        embeddings = target.get_input_embeddings()(input_ids)
    inputs = features[:, :-1]
    if noise:
        inputs = inputs + (torch.rand_like(inputs) * 2 - 1) * noise
    predicted = forward(inputs, embeddings[:, 1:], attention[:, :-1] * attention[:, 1:])
    mask = positions[:, 1:]  # x_{t+2} is an answer token
    head = target.get_output_embeddings()
    with torch.no_grad():
        teacher_logits = head(features[:, 1:][mask]).unsqueeze(0)
    student_logits = head(predicted[mask]).unsqueeze(0)
    return predicted, features[:, 1:], student_logits, teacher_logits, mask, int(attention.sum())


class FeatureObjective:
    ahead = 2  # the prediction of f_{t+1} is scored on x_{t+2}

    def __init__(self, kind, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, loss: FeatureLoss,
                 settings: DistillSettings, data_dir: Path) -> None:
        if not isinstance(loss, FeatureLoss):
            raise ValueError(f"a {kind.name}-level drafter trains with a feature loss: choose loss=eagle or "
                             f"loss=fspad")
        self.kind, self.target, self.tokenizer, self.loss, self.settings = kind, target, tokenizer, loss, settings

    def refused(self) -> list[str]:
        """Every setting this objective cannot honour, as `key=value (what to use)`."""
        settings = self.settings
        return [f"distill.{key}={value!r} ({allowed})" for key, value, allowed, ok in (
            ("teacher", settings.teacher, "online: it learns from the target's features", settings.teacher == "online"),
            ("on_policy.ratio", settings.on_policy.ratio, "0: a feature drafter cannot answer prompts on its own",
             not settings.on_policy.ratio)) if not ok]

    def prepare(self, drafter: torch.nn.Module) -> None:
        pass  # it speaks the target's vocabulary through the target's own head

    def forward_module(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def micro_loss(self, engine, micro: list[Row], on_policy: bool):
        """(loss, its terms, positions it averages over, tokens read) for one micro-batch."""
        predicted, features, student, teacher, mask, read = feature_batch(
            engine.forward, self.target, micro, self.tokenizer.pad_token_id, self.settings.max_seq_len,
            self.loss.feature_noise)
        total, parts = self.loss(predicted, features, student, teacher, mask)
        return total, parts, int(mask.sum()), read

    @torch.no_grad()
    def proxy(self, model: torch.nn.Module, rows: list[Row], batch_size: int) -> float:
        total, count = 0.0, 0
        for start in range(0, len(rows), batch_size):
            _, _, student, teacher, mask, _ = feature_batch(model, self.target, rows[start: start + batch_size],
                                                            self.tokenizer.pad_token_id, self.settings.max_seq_len)
            n = int(mask.sum())
            total += float(expected_acceptance(student, teacher, torch.ones(1, n, dtype=torch.bool))) * n
            count += n
        return total / max(count, 1)

    def draft(self, model: torch.nn.Module):
        return FeatureDraft(model, self.target)

    def save(self, model: torch.nn.Module, folder: Path) -> None:
        self.kind.save(model, None, folder)

    def summary(self, model: torch.nn.Module) -> dict:
        return {"drafter_kind": self.kind.name, "feature_sampling": model.spec.feature_sampling,
                "aligned_fraction": self.loss.aligned_fraction, "loss_terms": ["feature", "token"],
                "teacher": "online"}
