"""Stage `pretrain` (FastDraft-style): next-token training of the drafter on text in the target's tokenizer.

    python train/run.py +experiment=standalone stages=[pretrain]
    python train/run.py +experiment=standalone stages=[pretrain] corpus=text corpus.location=/data/books/
    torchrun --nproc_per_node 2 train/run.py +experiment=standalone stages=[pretrain] deepspeed=zero2

Setup: documents (whole ShareGPT conversations in the target's chat template, or plain-text files) are packed
back to back into fixed-length blocks; attention stays inside each document (a block-diagonal causal mask, with
positions restarting at each document), and the token that starts a document is never a target of the one before.
Loop: AdamW with warmup + cosine through the same engines as distill (plain or DeepSpeed ZeRO), checkpoints every
`checkpoint_every` steps, `resume=auto` continues an interrupted run. Save: `model/` (safetensors), `curve.jsonl`.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from data_gen.chat import document_token_ids
from data_gen.sources import PromptSourceSpec, load_conversations
from infra import distributed, preemption
from infra.settings import at_least, check_fields
from infra.stage import StageRun
from infra.tracking import Tracker
from losses.ce import cross_entropy
from models.drafter import DrafterSpec, save_drafter
from models.feature_drafter import FeatureDrafterSpec
from models.kinds import kind_of_spec
from train.core import checkpoint
from train.core.engine import DeepSpeedSettings, build_engine, micro_batches, save_weights
from train.core.optim import OptimSettings


@dataclass(frozen=True)
class PretrainSettings:
    SECTION: ClassVar[str] = "pretrain"
    steps: int = 100
    batch_size: int = 8             # blocks per optimizer step, over all processes and accumulation steps
    accumulation: int = 1
    seq_len: int = 256
    max_documents: int = 2000
    document_mask: bool = True      # attention and targets stay inside each packed document
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    optim: OptimSettings = field(default_factory=OptimSettings)
    LIMITS: ClassVar[dict] = {"steps": at_least(1), "batch_size": at_least(1), "accumulation": at_least(1),
                              "seq_len": at_least(2), "max_documents": at_least(1), "log_every": at_least(1),
                              "checkpoint_every": at_least(0), "keep_checkpoints": at_least(1)}

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class PackedBlocks:
    """[num_blocks, seq_len] token ids and, per token, which document of its block it belongs to."""
    tokens: torch.Tensor
    documents: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]


def pack_documents(documents: list[list[int]], seq_len: int) -> PackedBlocks:
    """Concatenate documents and cut the stream into blocks of `seq_len`; the ragged tail is dropped. A document
    cut by a block boundary continues, as a new segment, in the next block."""
    stream = [token for document in documents for token in document]
    owner = [index for index, document in enumerate(documents) for _ in document]
    num_blocks = len(stream) // seq_len
    if num_blocks == 0:
        raise ValueError(f"pretraining corpus has {len(stream)} tokens, fewer than one block of seq_len={seq_len}")
    tokens = torch.tensor(stream[: num_blocks * seq_len]).view(num_blocks, seq_len)
    owners = torch.tensor(owner[: num_blocks * seq_len]).view(num_blocks, seq_len)
    return PackedBlocks(tokens=tokens, documents=owners - owners[:, :1])


def block_inputs(tokens: torch.Tensor, documents: torch.Tensor, document_mask: bool):
    """(attention, position_ids, loss_positions, labels) for a batch of packed blocks.

    attention: [B, 1, T, T] bool, causal and (with document_mask) block-diagonal over documents; positions restart
    at every document; loss_positions: predict t+1 from t only inside one document (and never from the last)."""
    batch, width = tokens.shape
    positions = target_positions(documents, document_mask)
    causal = torch.ones(width, width, dtype=torch.bool, device=tokens.device).tril()
    if not document_mask:
        documents = torch.zeros_like(documents)
    same_document = documents.unsqueeze(-1) == documents.unsqueeze(-2)
    attention = (same_document & causal).unsqueeze(1)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    index = torch.arange(width, device=tokens.device).expand(batch, width)
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    position_ids = index - start_index
    return attention, position_ids, positions, torch.roll(tokens, -1, dims=1)


def target_positions(documents: torch.Tensor, document_mask: bool) -> torch.Tensor:
    """[B, T] bool: position t predicts token t+1 (never the last; with document_mask only inside one document)."""
    positions = torch.zeros_like(documents, dtype=torch.bool)
    positions[:, :-1] = documents[:, 1:] == documents[:, :-1] if document_mask else True
    return positions


def pretrain(drafter: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, documents: list[list[int]],
             settings: PretrainSettings, out_dir: Path, tracker: Tracker,
             deepspeed: DeepSpeedSettings = DeepSpeedSettings(), resume: str = "auto",
             provenance: dict | None = None) -> dict:
    """Train `drafter` for `settings.steps` steps; save it as safetensors to `out_dir/model`. `provenance` goes
    into every checkpoint."""
    world = distributed.world_size()
    if settings.batch_size % (world * settings.accumulation):
        raise ValueError(f"pretrain.batch_size={settings.batch_size} must divide by processes ({world}) × "
                         f"accumulation ({settings.accumulation})")
    torch.manual_seed(settings.seed)
    blocks = pack_documents(documents, settings.seq_len)
    order = list(range(len(blocks)))
    random.Random(settings.seed).shuffle(order)
    engine = build_engine(drafter, settings.optim, settings.steps, deepspeed,
                          settings.batch_size // (world * settings.accumulation), settings.accumulation)
    model, device = engine.module, drafter.device
    model.train()

    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints, curve_path = out_dir / "checkpoints", out_dir / "curve.jsonl"
    start_step = checkpoint.resume_or_clear(engine, checkpoints, curve_path, resume, "pretrain",
                                            settings.steps).get("step", 0)

    tokens_seen, started, loss_value = 0, time.perf_counter(), float("nan")
    progress = tqdm(total=settings.steps, initial=start_step, desc="pretrain", unit="step",
                    disable=not distributed.is_main())
    for step in range(start_step, settings.steps):
        picks = [order[(step * settings.batch_size + i) % len(order)] for i in range(settings.batch_size)]
        step_positions = int(target_positions(blocks.documents[picks], settings.document_mask).sum())
        loss_sum = 0.0
        for micro in micro_batches(picks, settings.accumulation):
            tokens = blocks.tokens[micro].to(device)
            attention, position_ids, positions, labels = block_inputs(tokens, blocks.documents[micro].to(device),
                                                                      settings.document_mask)
            logits = engine.forward(tokens, attention, positions, position_ids)
            n = int(positions.sum())
            loss = cross_entropy(logits, None, torch.ones(1, n, dtype=torch.bool), labels[positions].unsqueeze(0))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"pretrain step {step}: loss is {loss.item()}; lower pretrain.optim.lr")
            share = n / max(step_positions, 1)
            engine.backward(loss * share)
            loss_sum += loss.item() * share
            tokens_seen += tokens.numel()
        grad_norm = engine.step()
        loss_value = distributed.all_sum([loss_sum])[0]
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.3f}")
        if distributed.is_main():
            with curve_path.open("a") as curve:
                curve.write(json.dumps({"step": step, "loss": loss_value, "grad_norm": grad_norm}) + "\n")
        if step % settings.log_every == 0 or step == settings.steps - 1:
            tracker.log({"pretrain/loss": loss_value, "pretrain/lr": engine.lr, "pretrain/grad_norm": grad_norm,
                         "pretrain/tokens_per_s": distributed.all_sum([tokens_seen])[0]
                         / (time.perf_counter() - started)}, step=step)
        done = step + 1
        stopping = done < settings.steps and preemption.requested()
        if stopping or (settings.checkpoint_every and done % settings.checkpoint_every == 0 and done < settings.steps):
            saved = checkpoint.save(engine, checkpoints, done,
                                    {"data_position": {"block_offset": done * settings.batch_size}},
                                    settings.keep_checkpoints, provenance)
        if stopping:
            raise preemption.Preempted(f"pretrain stopped after step {done} of {settings.steps} on the warning "
                                       f"signal; resumes from {saved}")
    progress.close()
    model.eval()
    save_weights(engine, out_dir / "model", lambda model, folder: save_drafter(model, tokenizer, folder))
    elapsed = time.perf_counter() - started
    summary = {"steps": settings.steps, "resumed_at": start_step, "final_loss": round(loss_value, 4),
               "blocks": len(blocks), "tokens_seen_this_run": tokens_seen * world, "seconds": round(elapsed, 1),
               "tokens_per_s": round(tokens_seen * world / max(elapsed, 1e-9)), "document_mask": settings.document_mask}
    engine.close()
    return summary


def corpus_documents(tokenizer: PreTrainedTokenizerBase, conversations, settings: PretrainSettings) -> list[list[int]]:
    """Token ids of the corpus' documents, each capped at 4 blocks (many short documents beat a few very long
    ones), tokenizing only what the step budget will read."""
    needed, documents, tokens = settings.steps * settings.batch_size * settings.seq_len, [], 0
    for conversation in conversations[: settings.max_documents]:
        ids = document_token_ids(tokenizer, conversation.messages)[: 4 * settings.seq_len]
        documents.append(ids)
        tokens += len(ids)
        if tokens >= needed:
            break
    return documents


def run_stage(run: StageRun, settings: PretrainSettings, drafter: DrafterSpec | FeatureDrafterSpec,
              corpus: PromptSourceSpec, deepspeed: DeepSpeedSettings) -> dict:
    """Stage `pretrain`: a fresh drafter for the target, trained on `corpus`, into `run.out_dir`."""
    kind = kind_of_spec(drafter)
    if not kind.pretrainable:
        raise ValueError(f"drafter={drafter.name} is a {kind.name}-level drafter, which has no pretraining stage: "
                         f"run stages=[data_gen,distill]")
    target = run.target()
    conversations, corpus_report = load_conversations(corpus, run.cache_dir, "corpus")
    documents = corpus_documents(target.tokenizer, conversations, settings)
    model = kind.build(drafter, target, token_lists=documents)
    summary = pretrain(model, target.tokenizer, documents, settings, run.out_dir, run.tracker, deepspeed=deepspeed,
                       resume=run.resume, provenance=run.provenance)
    return summary | {"documents": len(documents), "corpus": corpus_report.as_dict()}
