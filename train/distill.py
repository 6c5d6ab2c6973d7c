"""Stage `distill`: fine-tune the drafter towards the frozen target on target-generated answers.

    python train/run.py +experiment=quickstart stages=[distill]

Each batch runs the frozen target (teacher) and the drafter (student) over prompt + response; the loss (forward
KL by default, any `losses/` function with the shared contract) is taken only where the next token belongs to
the target's answer.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from data_gen.shards import load_records
from models.drafter import check_same_vocabulary, save_drafter
from train.optim import OptimSettings, build_optimizer, optimizer_step
from train.tracking import Tracker

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DistillSettings:
    epochs: int = 1
    batch_size: int = 8
    max_seq_len: int = 512
    log_every: int = 5
    seed: int = 0
    init_from: str | None = None  # drafter checkpoint to start from (default: this run's pretrain output)
    optim: OptimSettings = field(default_factory=OptimSettings)


def collate(rows: list[dict], pad_id: int, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row: (input_ids, attention_mask, loss_positions) where loss_positions[b, t]
    marks the positions whose *next* token is a response token."""
    rows = [{"input_ids": r["input_ids"][:max_seq_len], "loss_mask": r["loss_mask"][:max_seq_len]} for r in rows]
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    loss_positions = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, row in enumerate(rows):
        length = len(row["input_ids"])
        input_ids[b, :length] = torch.tensor(row["input_ids"])
        attention[b, :length] = 1
        loss_positions[b, : length - 1] = torch.tensor(row["loss_mask"][1:], dtype=torch.bool)
    return input_ids, attention, loss_positions


def logits_at(model: PreTrainedModel, input_ids: torch.Tensor, attention: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
    """LM-head logits [1, N, V] at the N `positions` only: prompt positions never reach the vocabulary projection,
    which is most of a small drafter's cost and a fifth of the target's."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention).last_hidden_state
    logits = model.get_output_embeddings()(hidden[positions])
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.unsqueeze(0)


def length_grouped_batches(lengths: list[int], batch_size: int, shuffler: random.Random) -> list[list[int]]:
    """Batches of similar length (little padding), visited in random order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], shuffler.random()))
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    shuffler.shuffle(batches)
    return batches


def distill(drafter: PreTrainedModel, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data_dir: Path,
            loss_fn: LossFn, settings: DistillSettings, out_dir: Path, tracker: Tracker) -> dict:
    """Train `drafter` in place against `target`; save it as safetensors to `out_dir/model`."""
    check_same_vocabulary(drafter, target)
    torch.manual_seed(settings.seed)
    dataset = load_records(data_dir).select_columns(["input_ids", "loss_mask"])
    rows = list(dataset)
    steps_per_epoch = (len(rows) + settings.batch_size - 1) // settings.batch_size
    total_steps = settings.epochs * steps_per_epoch
    optimizer, scheduler = build_optimizer(drafter, settings.optim, total_steps)
    target.eval()
    drafter.train()
    shuffler = random.Random(settings.seed)
    tokens_seen, started, step, loss_value = 0, time.perf_counter(), 0, float("nan")
    progress = tqdm(total=total_steps, desc="distill", unit="step")
    lengths = [min(len(row["input_ids"]), settings.max_seq_len) for row in rows]
    for epoch in range(settings.epochs):
        for batch_indices in length_grouped_batches(lengths, settings.batch_size, shuffler):
            batch = [rows[i] for i in batch_indices]
            input_ids, attention, loss_positions = (tensor.to(drafter.device) for tensor in
                                                    collate(batch, tokenizer.pad_token_id, settings.max_seq_len))
            with torch.inference_mode():
                teacher_logits = logits_at(target, input_ids, attention, loss_positions)
            student_logits = logits_at(drafter, input_ids, attention, loss_positions)
            every_position = torch.ones(student_logits.shape[:2], dtype=torch.bool, device=drafter.device)
            loss = loss_fn(student_logits, teacher_logits.clone(), every_position)
            grad_norm = optimizer_step(loss, drafter, optimizer, scheduler, settings.optim.grad_clip,
                                       f"distill epoch {epoch} step {step} (data {data_dir})")
            tokens_seen += int(loss_positions.sum())
            loss_value = loss.item()
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.3f}")
            if step % settings.log_every == 0 or step == total_steps - 1:
                tracker.log({"distill/loss": loss_value, "distill/lr": scheduler.get_last_lr()[0],
                             "distill/grad_norm": grad_norm.item(), "distill/epoch": epoch,
                             "distill/tokens_per_s": tokens_seen / (time.perf_counter() - started)}, step=step)
            step += 1
    progress.close()
    drafter.eval()
    save_drafter(drafter, tokenizer, out_dir / "model")
    elapsed = time.perf_counter() - started
    return {"steps": total_steps, "epochs": settings.epochs, "records": len(rows), "final_loss": round(loss_value, 4),
            "loss_tokens": tokens_seen, "seconds": round(elapsed, 1),
            "loss_tokens_per_s": round(tokens_seen / elapsed)}
