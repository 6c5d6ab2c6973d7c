"""How the `online` stage replays, trains and scores each kind of drafter (`learner_for`).

- `TokenLearner`, standalone token drafters: the drafter reads the served tokens; the loss is any token loss of the
  family (`loss=fkl|rkl|jsd|tvd|tvdpp|...`) against the target's top-k stored at verification.
- `FeatureLearner`, feature drafters (EAGLE, EAGLE-3, FSPAD): the drafter also reads the target's hidden states
  along the served sequence. They are what the verification forwards computed along the served path; in replay
  mode (the only mode for these drafters so far: the verification recorder keeps top-k, not hidden states) that
  path is the target's own greedy answer, so one prefill of the target over each request of the trace gives them,
  fp32, kept in memory (`trace_features`). The loss is the feature loss the drafter was distilled with
  (`loss=eagle3`: the training-time test unrolled `loss.unroll` times, scored at every step), its teacher the
  target's head applied to the stored last hidden state (the full distribution, restricted to a draft vocabulary
  as in distill) at the row's positions.

Rehearsal (`online.buffer.rehearsal_share`): a share of every training batch comes from the rows the drafter was
distilled on, against forgetting what it knew. `rehearse` gives them their teacher side once, at the start: a
token drafter's rows get the target's top-k at their scored positions (one target forward per row), a feature
drafter's rows their target features, read from the distill stage's feature cache where it holds them, else computed.

Greedy replay (exact under greedy verification, ANCHORS.md §10) needs, for every generated position a and draft
depth j, the drafter's argmax for answer[a] as the (j+1)-th draft of a chain step that started at a - j on the
target's own prefix (`guesses[j][a]`). A token drafter's guess does not depend on j (the accepted drafts are the
target's tokens). A feature drafter's does: its deeper drafts read its own predicted features. Pass j of
`FeatureDrafter.unrolled` at pair position t is, by construction, the (j+1)-th draft of a chain whose last true
feature is f_{t-j}, predicting x_{t+2}, so one unrolled forward over prompt + answer gives every step's drafts.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from infra.integrity import DamagedFilesError
from losses.feature import FeatureLoss
from losses.mix import LossMix
from losses.tvd import expected_acceptance
from models.drafter import draft_vocabulary, to_draft_vocabulary
from models.kinds import kind_of
from train.core.engine import logits_at
from train.core.feature_cache import MANIFEST, FeatureCache, load_cache, target_features
from train.core.feature_cache import verify as verify_cache
from train.core.features import FeatureTraining, feature_batch, first_draft_acceptance
from train.core.rows import Row, collate, offline_teacher_logits

Item = tuple[str, list[int], list[int]]  # (request key, prompt, answer)


def answer_rows(items: list[Item], max_seq_len: int) -> list[Row]:
    rows = [Row(id=key, input_ids=p + a, loss_mask=[0] * len(p) + [1] * len(a), prompt_ids=p) for key, p, a in items]
    if any(len(r.input_ids) > max_seq_len for r in rows):
        raise ValueError(f"a request of {max(len(r.input_ids) for r in rows)} tokens is longer than "
                         f"online.max_seq_len={max_seq_len}; raise it")
    return rows


@torch.no_grad()
def answer_logits(model: torch.nn.Module, items: list[Item], max_seq_len: int, pad_id: int) -> list[torch.Tensor]:
    """Per (key, prompt, answer): a token model's logits [len(answer), V] at the positions that predict the answer."""
    rows = answer_rows(items, max_seq_len)
    input_ids, attention, positions, _ = collate(rows, pad_id, max_seq_len, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    logits = logits_at(model, input_ids, attention, positions)[0]
    model.train(was_training)
    return list(logits.split([len(a) for _, _, a in items]))


class TokenLearner:
    """A standalone token drafter online."""
    modes = ("serve", "replay")  # online.mode values it learns in

    def __init__(self, target: torch.nn.Module, gamma: int, max_seq_len: int, pad_id: int) -> None:
        self.target, self.gamma, self.max_seq_len, self.pad_id = target, gamma, max_seq_len, pad_id

    @classmethod
    def for_drafter(cls, drafter: torch.nn.Module, target: torch.nn.Module, gamma: int, max_seq_len: int,
                    pad_id: int, items: list[Item] | None) -> "TokenLearner":
        return cls(target, gamma, max_seq_len, pad_id)

    @torch.no_grad()
    def rehearse(self, rows: list[Row], top_k: int, cache_folder: Path | None = None) -> None:
        """Each row's teacher: the target's top-k log-probabilities at its scored positions, as data_gen stores them."""
        for start in tqdm(range(0, len(rows), 8), desc="online: target top-k of the rehearsal rows", unit="batch"):
            chunk = rows[start: start + 8]
            device = next(self.target.parameters()).device
            input_ids, attention, positions, _ = collate(chunk, self.pad_id, self.max_seq_len, device)
            logits = logits_at(self.target, input_ids, attention, positions)[0]
            top = torch.log_softmax(logits.float(), -1).topk(top_k, -1)
            sizes = [row.loss_positions(self.max_seq_len) for row in chunk]
            for row, ids, values in zip(chunk, top.indices.split(sizes), top.values.split(sizes)):
                row.topk_ids, row.topk_logprobs = ids.tolist(), values.tolist()

    def osd_loss(self, fkl: LossMix) -> LossMix:
        return fkl

    def guesses(self, model: torch.nn.Module, items: list[Item]) -> list[list[list[int]]]:
        out = []
        d2t = draft_vocabulary(model)
        for values in answer_logits(model, items, self.max_seq_len, self.pad_id):
            top = values.argmax(-1)
            out.append([(top if d2t is None else d2t[top]).tolist()] * self.gamma)
        return out

    def loss(self, trainer: torch.nn.Module, rows: list[Row], loss: LossMix) -> torch.Tensor:
        device = next(trainer.parameters()).device
        vocab = self.target.config.vocab_size
        input_ids, attention, positions, labels = collate(rows, self.pad_id, self.max_seq_len, device)
        teacher = offline_teacher_logits(rows, self.max_seq_len, vocab, device)
        student = logits_at(trainer, input_ids, attention, positions)
        targets = labels[positions].unsqueeze(0)
        keep = torch.ones_like(targets, dtype=torch.bool)
        d2t = draft_vocabulary(trainer)
        if d2t is not None:
            teacher, targets, keep = to_draft_vocabulary(teacher, targets, d2t, vocab)
        return loss(student, teacher, keep, targets)[0]

    def alpha(self, model: torch.nn.Module, items: list[Item], rows: list[Row]) -> float:
        """Mean Σ min(p, q) over every generated position, p from the stored top-k (the rest spread evenly)."""
        student = torch.cat(answer_logits(model, items, self.max_seq_len, self.pad_id)).unsqueeze(0)
        teacher = offline_teacher_logits(rows, self.max_seq_len, self.target.config.vocab_size, student.device)
        return float(expected_acceptance(student, teacher, torch.ones(student.shape[:2], dtype=torch.bool),
                                         draft_vocabulary(model)))


class FeatureLearner:
    """A feature drafter online (module docstring); `features` holds the target's side of every request."""
    modes = ("replay",)  # the verification recorder keeps the target's top-k, not the hidden states it trains on

    def __init__(self, target: torch.nn.Module, gamma: int, max_seq_len: int, pad_id: int,
                 features: FeatureCache, layers: tuple[int, ...] | None) -> None:
        self.target, self.gamma, self.max_seq_len, self.pad_id = target, gamma, max_seq_len, pad_id
        self.features, self.layers = features, layers

    @classmethod
    def for_drafter(cls, drafter: torch.nn.Module, target: torch.nn.Module, gamma: int, max_seq_len: int,
                    pad_id: int, items: list[Item] | None) -> "FeatureLearner":
        """The target's features along every traced request (`items`, replay mode's trace)."""
        if items is None:
            raise ValueError("a feature drafter learns online in online.mode=replay only: the verification recorder "
                             "keeps the target's top-k, not its hidden states, which this drafter trains on")
        return cls(target, gamma, max_seq_len, pad_id, trace_features(target, drafter, items, max_seq_len, pad_id),
                   drafter.feature_layers)

    def rehearse(self, rows: list[Row], top_k: int, cache_folder: Path | None = None) -> None:
        """Each row's target features: from the distill stage's cache (`cache_folder`) where it holds the row, at
        its length and with this drafter's layers; the others computed (one prefill)."""
        found = {}
        manifest = None if cache_folder is None else cache_folder / MANIFEST
        if manifest is not None and manifest.exists() and (
                json.loads(manifest.read_text())["layers"] == list(self.layers or [])):
            try:
                verify_cache(cache_folder)
                stored = load_cache(cache_folder).entries
            except DamagedFilesError as error:  # distill's to rebuild; here every row's features are computed
                print(f"[online] rehearsal features: distill's feature cache is damaged ({error}); computing them "
                      f"all", flush=True)
                stored = {}
            found = {row.id: stored[row.id] for row in rows
                     if row.id in stored and len(stored[row.id][1]) == min(len(row.input_ids), self.max_seq_len)}
        missing = [row for row in rows if row.id not in found]
        print(f"[online] rehearsal features: {len(found)} rows from {cache_folder}, {len(missing)} computed",
              flush=True)
        for row, fused, last, top1 in target_features(self.target, missing, self.layers, self.max_seq_len,
                                                      self.pad_id, desc="online: target features of rehearsal rows"):
            found[row.id] = (fused.clone(), last.clone(), top1.clone())
        self.features.entries.update(found)

    def osd_loss(self, fkl: LossMix) -> FeatureLoss:
        """OSD's objective for a feature drafter: forward KL of its next-token distribution, no unrolling."""
        return FeatureLoss(feature_weight=0.0, token_weight=1.0, unroll=1, token=fkl)

    @torch.no_grad()
    def guesses(self, model: torch.nn.Module, items: list[Item]) -> list[list[list[int]]]:
        rows = answer_rows(items, self.max_seq_len)
        device = next(model.parameters()).device
        input_ids, attention, _, _ = collate(rows, self.pad_id, self.max_seq_len, device)
        fused, _, _ = self.features.batch(rows, self.max_seq_len, device)
        embeddings = model.input_embeddings(self.target)(input_ids)
        was_training = model.training
        model.eval()
        outputs = model.unrolled(fused[:, :-1], embeddings[:, 1:], attention[:, :-1] * attention[:, 1:], self.gamma)
        model.train(was_training)
        out = []
        for b, (_, prompt, answer) in enumerate(items):
            at = torch.arange(len(answer), device=device) + len(prompt) - 2  # pair position predicting answer[a]
            out.append([model.logits(output[b, at], self.target).argmax(-1).tolist() for output in outputs])
        return out

    def loss(self, trainer: torch.nn.Module, rows: list[Row], loss: FeatureLoss) -> torch.Tensor:
        module = FeatureTraining(trainer, loss.unroll)
        steps, _ = feature_batch(module, self.target, trainer, rows, self.pad_id, self.max_seq_len,
                                 loss.feature_noise, loss.unroll, cache=self.features)
        return loss.unrolled(steps)[0]

    def alpha(self, model: torch.nn.Module, items: list[Item], rows: list[Row]) -> float:
        """Mean Σ min(p, q) of the first draft over every generated position, p the target's full distribution."""
        was_training = model.training
        model.eval()
        value = first_draft_acceptance(model, self.target, answer_rows(items, self.max_seq_len), self.pad_id,
                                       self.max_seq_len, len(items), self.features)
        model.train(was_training)
        return value


def trace_features(target: torch.nn.Module, drafter: torch.nn.Module, items: list[Item], max_seq_len: int,
                   pad_id: int) -> FeatureCache:
    """The target's hidden states over every (key, prompt, answer) of the trace, as a feature drafter reads them."""
    rows = answer_rows(items, max_seq_len)
    return FeatureCache({row.id: (fused.clone(), last.clone(), top1.clone()) for row, fused, last, top1 in
                         target_features(target, rows, drafter.feature_layers, max_seq_len, pad_id,
                                         desc="online: target features of the trace")})


def learner_for(drafter: torch.nn.Module, target: torch.nn.Module, gamma: int, max_seq_len: int, pad_id: int,
                items: list[Item] | None = None):
    """The learner of `drafter`'s kind; a feature drafter needs the trace's `items` (replay mode)."""
    training = kind_of(drafter).training
    if training not in LEARNERS:
        raise ValueError(f"a {kind_of(drafter).name} drafter has no online learner (learners: {sorted(LEARNERS)})")
    return LEARNERS[training].for_drafter(drafter, target, gamma, max_seq_len, pad_id, items)


LEARNERS = {"tokens": TokenLearner, "features": FeatureLearner}  # by DrafterKind.training
