"""How each kind of drafter learns in the distill stage's one training loop: its loss on a micro-batch, its acceptance
proxy on held-out rows, the settings it refuses, how it is saved. `settings` is the stage's own
(`train.distill.DistillSettings`), read by field."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from losses.feature import FeatureLoss
from losses.mix import LossMix
from losses.tvd import expected_acceptance
from models.drafter import TokenDraft, check_same_vocabulary, draft_vocabulary, save_drafter, to_draft_vocabulary
from models.feature_drafter import FeatureDraft
from models.lookup import prompt_lookup_hits
from train.core.engine import LogitsAt, logits_at
from train.core.feature_cache import FeatureCache, build_or_load
from train.core.features import FeatureTraining, feature_batch, first_draft_acceptance
from train.core.rows import Row, collate, offline_teacher_logits


@torch.no_grad()
def acceptance_proxy(drafter: PreTrainedModel, target: PreTrainedModel, rows: list[Row], pad_id: int,
                     max_seq_len: int, batch_size: int) -> float:
    """Mean Σ_v min(p, q) over the held-out answer positions (every rank computes it whole, identically)."""
    was_training = drafter.training
    drafter.eval()
    total, count, d2t = 0.0, 0, draft_vocabulary(drafter)
    for start in range(0, len(rows), batch_size):
        input_ids, attention, positions, _ = collate(rows[start: start + batch_size], pad_id, max_seq_len,
                                                     target.device)
        teacher = logits_at(target, input_ids, attention, positions)
        student = logits_at(drafter, input_ids, attention, positions)
        n = int(positions.sum())
        total += float(expected_acceptance(student, teacher, torch.ones(1, n, dtype=torch.bool), d2t)) * n
        count += n
    drafter.train(was_training)
    return total / max(count, 1)


class TokenObjective:
    """What a token-level drafter learns from: its logits at answer positions against the frozen target's
    (`online`), data_gen's stored top-k (`offline`) or the labels alone, through a `LossMix`."""
    ahead = 1  # a position's loss is on its next token

    def __init__(self, kind, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, loss: LossMix,
                 settings, data_dir: Path) -> None:
        if not isinstance(loss, LossMix):
            raise ValueError(f"a {kind.name}-level drafter trains with a token loss (loss=fkl, tvdpp, ...), not "
                             f"{type(loss).__name__}")
        self.kind, self.target, self.tokenizer, self.loss = kind, target, tokenizer, loss
        self.settings, self.data_dir, self.d2t = settings, data_dir, None

    def refused(self) -> list[str]:
        refused = []
        if self.settings.teacher == "offline" and self.settings.train_on == "all":
            refused.append("distill.train_on='all' (answers: data_gen stores top-k log-probabilities for answer "
                           "tokens only; or distill.teacher=online)")
        if self.settings.feature_cache:
            refused.append("distill.feature_cache=True (false: a token drafter reads tokens, not the target's "
                           "features)")
        if self.settings.feature_cache_dir:
            refused.append(f"distill.feature_cache_dir={self.settings.feature_cache_dir!r} (null: a token drafter "
                           f"has no feature cache)")
        return refused

    def prepare_rows(self, rows: list[Row], out_dir: Path) -> None:
        pass  # the teacher runs in the loop (or comes from data_gen's top-k)

    def prepare(self, drafter: PreTrainedModel) -> None:
        check_same_vocabulary(drafter, self.target)
        self.d2t = draft_vocabulary(drafter)

    def forward_module(self, model: torch.nn.Module) -> torch.nn.Module:
        return LogitsAt(model)

    def micro_loss(self, engine, micro: list[Row], on_policy: bool):
        """(loss, its terms, positions it averages over, tokens read) for one micro-batch."""
        settings, device = self.settings, self.target.device
        input_ids, attention, positions, labels = collate(micro, self.tokenizer.pad_token_id, settings.max_seq_len,
                                                          device, settings.train_on == "all" and not on_policy)
        n = int(positions.sum())
        if self.loss.needs_teacher and settings.teacher == "offline" and not on_policy:
            teacher_logits = offline_teacher_logits(micro, settings.max_seq_len, self.target.config.vocab_size,
                                                    device)
        elif self.loss.needs_teacher:
            with torch.inference_mode():
                teacher_logits = logits_at(self.target, input_ids, attention, positions)
            teacher_logits = teacher_logits.clone()  # inference tensors cannot enter autograd
        else:
            teacher_logits = None
        student_logits = engine.forward(input_ids, attention, positions)
        targets, keep = labels[positions].unsqueeze(0), torch.ones(1, n, dtype=torch.bool, device=device)
        if self.d2t is not None:
            teacher_logits, targets, keep = to_draft_vocabulary(teacher_logits, targets, self.d2t,
                                                                self.target.config.vocab_size)
        total, parts = self.loss(student_logits, teacher_logits, keep, targets)
        return total, parts, int(keep.sum()), int(attention.sum())  # outside-vocabulary positions count as zero

    def proxy(self, model: torch.nn.Module, rows: list[Row], batch_size: int) -> float:
        return acceptance_proxy(model, self.target, rows, self.tokenizer.pad_token_id, self.settings.max_seq_len,
                                batch_size)

    def draft(self, model: torch.nn.Module):
        return TokenDraft(model)

    def save(self, model: torch.nn.Module, folder: Path) -> None:
        save_drafter(model, self.tokenizer, folder)

    def summary(self, model: torch.nn.Module) -> dict:
        return {"drafter_kind": self.kind.name, "loss_terms": sorted(self.loss.terms),
                "teacher": self.settings.teacher}


def objective_for(kind, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, loss, settings,
                  data_dir: Path):
    """How a drafter of `kind` learns (one objective per kind that trains; the loop below is shared)."""
    if kind.training not in OBJECTIVES:
        raise ValueError(f"a {kind.name} drafter has no distill objective (its kind trains as {kind.training!r}; "
                         f"objectives: {sorted(OBJECTIVES)})")
    return OBJECTIVES[kind.training](kind, target, tokenizer, loss, settings, data_dir)


class FeatureObjective:
    ahead = 2  # the prediction of f_{t+1} is scored on x_{t+2}

    def __init__(self, kind, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, loss: FeatureLoss,
                 settings, data_dir: Path) -> None:
        if not isinstance(loss, FeatureLoss):
            raise ValueError(f"a {kind.name}-level drafter trains with a feature loss: choose loss=eagle or "
                             f"loss=fspad")
        self.kind, self.target, self.tokenizer, self.loss, self.settings = kind, target, tokenizer, loss, settings
        self.cache: FeatureCache | None = None
        self.lookup_hits: dict[str, list[bool]] | None = None

    def refused(self) -> list[str]:
        """Every setting this objective cannot honour, as `key=value (what to use)`."""
        settings = self.settings
        return [f"distill.{key}={value!r} ({allowed})" for key, value, allowed, ok in (
            ("teacher", settings.teacher, "online: it learns from the target's features", settings.teacher == "online"),
            ("on_policy.ratio", settings.on_policy.ratio, "0: a feature drafter cannot answer prompts on its own",
             not settings.on_policy.ratio),
            ("feature_cache_dir", settings.feature_cache_dir, "null, or set distill.feature_cache=true to use it",
             settings.feature_cache or not settings.feature_cache_dir)) if not ok]

    def prepare(self, drafter: torch.nn.Module) -> None:
        self.feature_layers = drafter.feature_layers

    def prepare_rows(self, rows: list[Row], out_dir: Path) -> None:
        """With `distill.feature_cache`, the target's features for `rows` (training and held-out), once; with
        `loss.lookup_hit_weight` < 1, where prompt lookup guesses each row's tokens from the row itself."""
        self.out_dir = out_dir
        if self.loss.lookup_hit_weight < 1:
            self.lookup_hits = {row.id: prompt_lookup_hits(row.input_ids[: self.settings.max_seq_len]) for row in rows}
            scored = [hit for row in rows for hit in self.lookup_hits[row.id][2:]]
            print(f"[distill] lookup-aware: prompt lookup guesses {sum(scored) / max(len(scored), 1):.1%} of the "
                  f"{len(scored)} training tokens from their own rows; those are scored with probability "
                  f"{self.loss.lookup_hit_weight}", flush=True)
        if self.settings.feature_cache:
            shared = self.settings.feature_cache_dir
            self.cache = build_or_load(self.target, rows, self.feature_layers, self.settings.max_seq_len,
                                       self.tokenizer.pad_token_id, out_dir / "features",
                                       shared=Path(shared).expanduser() if shared else None)

    def forward_module(self, model: torch.nn.Module) -> torch.nn.Module:
        return FeatureTraining(model, self.loss.unroll)

    def micro_loss(self, engine, micro: list[Row], on_policy: bool):
        """(loss, its terms, positions it averages over, tokens read) for one micro-batch: the step losses of the
        unrolled drafter, weighted `unroll_decay`^j and normalised by their sum; positions are step 0's."""
        model = engine.module.drafter if hasattr(engine.module, "drafter") else engine.module
        steps, read = feature_batch(engine.forward, self.target, model, micro, self.tokenizer.pad_token_id,
                                    self.settings.max_seq_len, self.loss.feature_noise, self.loss.unroll,
                                    self.settings.train_on == "all", cache=self.cache,
                                    lookup_hits=self.lookup_hits, hit_weight=self.loss.lookup_hit_weight)
        total, parts = self.loss.unrolled(steps)
        return total, parts, int(steps[0][-1].sum()), read

    @torch.no_grad()
    def proxy(self, model: torch.nn.Module, rows: list[Row], batch_size: int) -> float:
        """Σ min(p, q) of the first draft on held-out answers, p and q over the target's whole vocabulary (q is 0
        outside a draft vocabulary), as the decoder sees them."""
        return first_draft_acceptance(model, self.target, rows, self.tokenizer.pad_token_id,
                                      self.settings.max_seq_len, batch_size, self.cache)

    def draft(self, model: torch.nn.Module):
        return FeatureDraft(model, self.target)

    def save(self, model: torch.nn.Module, folder: Path) -> None:
        self.kind.save(model, None, folder)

    def summary(self, model: torch.nn.Module) -> dict:
        return {"drafter_kind": self.kind.name, "feature_sampling": model.spec.feature_sampling,
                "feature_layers": list(model.spec.feature_layers or []) or "last",
                "draft_vocab_size": model.spec.draft_vocab_size, "unroll": self.loss.unroll,
                "aligned_fraction": self.loss.aligned_fraction, "loss_terms": sorted(self.loss.terms),
                "lookup_hit_weight": self.loss.lookup_hit_weight,
                "teacher": "online", "train_on": self.settings.train_on,
                "feature_cache": self.settings.feature_cache,
                "feature_cache_folder": self.cache_folder()}

    def cache_folder(self) -> str | None:
        """Where the cache lives, for the online stage's rehearsal: relative to the stage's folder when inside it
        (written into `distill.partial/`, which is renamed when the stage is done), else a shared folder's path."""
        if self.cache is None:
            return None
        inside = self.cache.folder.is_relative_to(self.out_dir)
        return str(self.cache.folder.relative_to(self.out_dir) if inside else self.cache.folder)


OBJECTIVES = {"tokens": TokenObjective, "features": FeatureObjective}  # by DrafterKind.training
