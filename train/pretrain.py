"""Stage `pretrain` (FastDraft-style): next-token training of the drafter on chat text in the target's tokenizer.

    python train/run.py +experiment=quickstart stages=[pretrain]

Documents (whole ShareGPT conversations rendered with the target's chat template) are concatenated and cut
into fixed-length blocks; every block is a training sequence.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.drafter import save_drafter
from train.optim import OptimSettings, build_optimizer, optimizer_step
from train.tracking import Tracker


@dataclass(frozen=True)
class PretrainSettings:
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 256
    max_documents: int = 2000
    log_every: int = 10
    seed: int = 0
    optim: OptimSettings = field(default_factory=OptimSettings)


def pack_documents(documents: list[list[int]], seq_len: int) -> torch.Tensor:
    """Concatenate token lists and cut them into [num_blocks, seq_len]; the ragged tail is dropped."""
    stream = [token for document in documents for token in document]
    num_blocks = len(stream) // seq_len
    if num_blocks == 0:
        raise ValueError(f"pretraining corpus has {len(stream)} tokens, fewer than one block of seq_len={seq_len}")
    return torch.tensor(stream[: num_blocks * seq_len]).view(num_blocks, seq_len)


def next_token_loss(model: PreTrainedModel, block: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=block[:, :-1]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), block[:, 1:].flatten())


def pretrain(drafter: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, documents: list[list[int]],
             settings: PretrainSettings, out_dir: Path, tracker: Tracker) -> dict:
    """Train `drafter` in place for `settings.steps` steps; save it as safetensors to `out_dir/model`."""
    torch.manual_seed(settings.seed)
    blocks = pack_documents(documents, settings.seq_len)
    order = list(range(len(blocks)))
    random.Random(settings.seed).shuffle(order)
    optimizer, scheduler = build_optimizer(drafter, settings.optim, settings.steps)
    drafter.train()
    tokens_seen, started, loss_value = 0, time.perf_counter(), float("nan")
    progress = tqdm(range(settings.steps), desc="pretrain", unit="step")
    for step in progress:
        picks = [order[(step * settings.batch_size + i) % len(order)] for i in range(settings.batch_size)]
        batch = blocks[picks].to(drafter.device)
        loss = next_token_loss(drafter, batch)
        grad_norm = optimizer_step(loss, drafter, optimizer, scheduler, settings.optim.grad_clip,
                                   f"pretrain step {step}")
        tokens_seen += batch.numel()
        loss_value = loss.item()
        progress.set_postfix(loss=f"{loss_value:.3f}")
        if step % settings.log_every == 0 or step == settings.steps - 1:
            tracker.log({"pretrain/loss": loss_value, "pretrain/lr": scheduler.get_last_lr()[0],
                         "pretrain/grad_norm": grad_norm.item(),
                         "pretrain/tokens_per_s": tokens_seen / (time.perf_counter() - started)}, step=step)
    drafter.eval()
    save_drafter(drafter, tokenizer, out_dir / "model")
    elapsed = time.perf_counter() - started
    return {"steps": settings.steps, "final_loss": round(loss_value, 4), "blocks": len(blocks),
            "tokens_seen": tokens_seen, "seconds": round(elapsed, 1), "tokens_per_s": round(tokens_seen / elapsed)}
