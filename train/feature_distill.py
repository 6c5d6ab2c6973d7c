"""Stage `distill` for feature-level drafters (EAGLE, FSPAD): what `train/distill.py` does for token drafters.

    python train/run.py +experiment=smoke stages=[data_gen,distill] drafter=fspad loss=fspad

Setup: the same records, held-out split and length-grouped batches as token distillation. Loop: one frozen
target forward gives the features f (last hidden states) and, through its LM head, the teacher distributions;
the drafter reads (f_t, e(x_{t+1})) and predicts f̂_{t+1}; the target's head turns that into the drafter's
distribution over x_{t+2}. The loss (`losses.feature.FeatureLoss`) is taken where x_{t+2} is an answer token.
The acceptance proxy is Σ min(p, q) for the first drafted token on held-out answers. Save: `model/` (the best
proxy, or the last), `curve.jsonl`. Plain PyTorch on one process; checkpoints, DeepSpeed, LoRA, select=decoder
and several processes are token-drafter features for now, and asking for them here is an error naming the key.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from infra import distributed
from infra.tracking import Tracker
from losses.feature import FeatureLoss
from losses.tvd import expected_acceptance
from models.feature_drafter import FeatureDrafter
from train.distill import DistillSettings, Row, collate, count_steps, epoch_batches, read_rows, split_heldout
from train.engine import DeepSpeedSettings
from train.optim import build_optimizer


def feature_batch(drafter: FeatureDrafter, target: PreTrainedModel, rows: list[Row], pad_id: int, max_seq_len: int,
                  noise: float = 0.0):
    """(predicted features, target features, drafter logits, teacher logits, mask), each [B, T-1, ...]:
    index t holds the prediction of f_{t+1} and of the token x_{t+2}."""
    input_ids, attention, positions, _ = collate(rows, pad_id, max_seq_len, target.device)
    with torch.no_grad():
        features = target.get_decoder()(input_ids=input_ids, attention_mask=attention).last_hidden_state
        embeddings = target.get_input_embeddings()(input_ids)
    inputs = features[:, :-1]
    if noise:
        inputs = inputs + (torch.rand_like(inputs) * 2 - 1) * noise
    predicted = drafter(inputs, embeddings[:, 1:], attention[:, :-1] * attention[:, 1:])
    mask = positions[:, 1:]  # x_{t+2} is an answer token
    head = target.get_output_embeddings()
    with torch.no_grad():
        teacher_logits = head(features[:, 1:][mask]).unsqueeze(0)
    student_logits = head(predicted[mask]).unsqueeze(0)
    return predicted, features[:, 1:], student_logits, teacher_logits, mask


@torch.no_grad()
def feature_proxy(drafter: FeatureDrafter, target: PreTrainedModel, rows: list[Row], pad_id: int, max_seq_len: int,
                  batch_size: int) -> float:
    drafter.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        _, _, student, teacher, mask = feature_batch(drafter, target, rows[start: start + batch_size], pad_id,
                                                     max_seq_len)
        n = int(mask.sum())
        total += float(expected_acceptance(student, teacher, torch.ones(1, n, dtype=torch.bool))) * n
        count += n
    drafter.train()
    return total / max(count, 1)


def unsupported_settings(settings: DistillSettings, deepspeed: DeepSpeedSettings) -> list[str]:
    """Every setting this loop would not honour, as `key=value (what to use)`: refused, never silently ignored."""
    problems = [f"distill.{key}={value!r} ({allowed})" for key, value, allowed, ok in (
        ("teacher", settings.teacher, "online: the loop needs the target's features", settings.teacher == "online"),
        ("on_policy.ratio", settings.on_policy.ratio, "0", not settings.on_policy.ratio),
        ("lora", settings.lora, "null", settings.lora is None),
        ("accumulation", settings.accumulation, "1", settings.accumulation == 1),
        ("select", settings.select, "proxy or last", settings.select in ("proxy", "last")),
        ("checkpoint_every", settings.checkpoint_every, "0: no resumable checkpoints yet",
         not settings.checkpoint_every)) if not ok]
    if deepspeed.enabled:
        problems.append(f"deepspeed=zero{deepspeed.stage} (deepspeed=none)")
    if distributed.world_size() > 1:
        problems.append(f"{distributed.world_size()} processes (run it without torchrun)")
    return problems


def distill_features(drafter: FeatureDrafter, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     data_dir: Path, loss: FeatureLoss, settings: DistillSettings, out_dir: Path,
                     tracker: Tracker, deepspeed: DeepSpeedSettings = DeepSpeedSettings()) -> dict:
    unsupported = unsupported_settings(settings, deepspeed)
    if unsupported:
        raise ValueError("feature-level drafters do not support yet: " + "; ".join(unsupported)
                         + ". Change these keys, or train a token-level drafter")
    torch.manual_seed(settings.seed)
    target.eval()
    target.requires_grad_(False)
    train_rows, heldout = split_heldout(read_rows(data_dir, "online"), settings.heldout_records)
    steps_per_epoch, total_steps = count_steps(train_rows, settings)
    optimizer, scheduler = build_optimizer(drafter, settings.optim, total_steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    curve_path = out_dir / "curve.jsonl"
    curve_path.write_text("")
    pad_id, history, best = tokenizer.pad_token_id, [], {"proxy": float("-inf"), "step": None}
    drafter.train()

    def evaluate_proxy(step: int) -> None:
        proxy = feature_proxy(drafter, target, heldout, pad_id, settings.max_seq_len, settings.batch_size)
        history.append({"step": step, "proxy": round(proxy, 6)})
        tracker.log({"distill/acceptance_proxy": proxy}, step=step)
        if proxy > best["proxy"]:
            best.update(proxy=proxy, step=step)
            if settings.select == "proxy":
                drafter.save(out_dir / "best")

    evaluate_proxy(0)
    started, loss_tokens, parts = time.perf_counter(), 0, {}
    batches: dict[int, list[list[int]]] = {}
    for step in tqdm(range(total_steps), desc="distill (features)", unit="step"):
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in batches:
            batches = {epoch: epoch_batches(train_rows, settings.batch_size, settings.seed, epoch,
                                            settings.max_seq_len)}
        rows = [train_rows[i] for i in batches[epoch][index]]
        predicted, features, student, teacher, mask = feature_batch(drafter, target, rows, pad_id,
                                                                    settings.max_seq_len, loss.feature_noise)
        total, parts = loss(predicted, features, student, teacher, mask)
        if not torch.isfinite(total):
            raise FloatingPointError(f"distill step {step} (epoch {epoch}): loss is {total.item()}")
        total.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(drafter.parameters(), settings.optim.grad_clip))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_tokens += int(mask.sum())
        values = {"loss": total.item(), **{k: v.item() for k, v in parts.items()}}
        with curve_path.open("a") as curve:
            curve.write(json.dumps({"step": step, "grad_norm": grad_norm, **values}) + "\n")
        if step % settings.log_every == 0 or step == total_steps - 1:
            tracker.log({f"distill/{k if k == 'loss' else 'loss_' + k}": v for k, v in values.items()}
                        | {"distill/lr": scheduler.get_last_lr()[0], "distill/grad_norm": grad_norm,
                           "distill/loss_tokens_per_s": loss_tokens / (time.perf_counter() - started)}, step=step)
        if step + 1 == total_steps or (settings.eval_every and (step + 1) % settings.eval_every == 0):
            evaluate_proxy(step + 1)
    drafter.eval()
    drafter.save(out_dir / "last")
    shutil.rmtree(out_dir / "model", ignore_errors=True)
    shutil.copytree(out_dir / ("best" if settings.select == "proxy" else "last"), out_dir / "model")
    elapsed = time.perf_counter() - started
    return {"steps": total_steps, "records": len(train_rows), "heldout_records": len(heldout),
            "drafter_kind": "feature", "feature_sampling": drafter.spec.feature_sampling,
            "aligned_fraction": loss.aligned_fraction, "best_step": best["step"],
            "best_acceptance_proxy": round(best["proxy"], 4), "acceptance_proxy": history,
            "seconds": round(elapsed, 1), "loss_tokens_per_s": round(loss_tokens / max(elapsed, 1e-9))}
