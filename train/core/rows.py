"""The distill stage's training rows: data_gen records read back, a stable held-out split, length-grouped batches
and their padded tensors. Token-level and feature-level objectives (`train/distill.py`, `train/core/features.py`)
read the same rows.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from data_gen.chat import document_token_ids
from data_gen.shards import load_records
from data_gen.sources import PromptSourceSpec, load_conversations


@dataclass
class Row:
    """One training sequence: tokens, which next-tokens are answer tokens, and the stored top-k if any."""
    id: str
    input_ids: list[int]
    loss_mask: list[int]
    prompt_ids: list[int]
    topk_ids: list | None = None
    topk_logprobs: list | None = None

    def loss_positions(self, max_seq_len: int, ahead: int = 1, every_position: bool = False) -> int:
        """Positions t < max_seq_len whose token `ahead` places on is an answer token (1: the next token, what a
        token drafter predicts; 2: x_{t+2}, what a feature drafter's prediction of f_{t+1} is scored on), or with
        `every_position` any token (prompts too: `distill.train_on=all`)."""
        if every_position:
            return max(0, min(len(self.input_ids), max_seq_len) - ahead)
        return sum(self.loss_mask[ahead:max_seq_len])


def read_rows(data_dir: Path, teacher: str) -> list[Row]:
    dataset = load_records(data_dir)
    columns = ["id", "input_ids", "loss_mask", "prompt_ids"]
    if teacher == "offline":
        if "topk_ids" not in dataset.column_names:
            raise ValueError(f"distill.teacher=offline needs top-k log-probabilities in {data_dir}, which has none: "
                             f"regenerate with data_gen.top_k_logprobs=K (e.g. 20), or use distill.teacher=online")
        columns += ["topk_ids", "topk_logprobs"]
    return [Row(**row) for row in dataset.select_columns(columns)]


def split_heldout(rows: list[Row], count: int) -> tuple[list[Row], list[Row]]:
    """A fixed held-out set: the `count` rows whose id hashes lowest (stable across runs and data order)."""
    if count >= len(rows):
        raise ValueError(f"distill.heldout_records={count} leaves nothing to train on ({len(rows)} records)")
    ranked = sorted(rows, key=lambda row: hashlib.sha256(row.id.encode()).hexdigest())
    heldout_ids = {row.id for row in ranked[:count]}
    return [r for r in rows if r.id not in heldout_ids], [r for r in rows if r.id in heldout_ids]


def count_steps(train_rows: list[Row], batch_size: int, epochs: int, max_steps: int | None) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps) for `epochs`, capped by `max_steps`."""
    steps_per_epoch = len(train_rows) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_rows)} training records are fewer than distill.batch_size={batch_size}")
    total_steps = epochs * steps_per_epoch
    return steps_per_epoch, total_steps if max_steps is None else min(total_steps, max_steps)


def epoch_batches(rows: list[Row], batch_size: int, seed: int, epoch: int, max_seq_len: int) -> list[list[int]]:
    """Full batches of similar length in random order; the `len % batch_size` left-over rows (a different random
    few each epoch) wait for the next epoch, so every rank and micro-batch always gets work."""
    shuffler = random.Random(f"{seed}:epoch:{epoch}")
    order = list(range(len(rows)))
    shuffler.shuffle(order)
    order = order[: len(order) - len(order) % batch_size]
    order.sort(key=lambda i: min(len(rows[i].input_ids), max_seq_len))
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    shuffler.shuffle(batches)
    return batches


def collate(rows: list[Row], pad_id: int, max_seq_len: int, device: torch.device, every_position: bool = False):
    """Right-padded (input_ids, attention_mask, loss_positions, labels): loss_positions[b, t] marks the positions
    whose *next* token is an answer token (with `every_position`, any real token); labels[b, t] is that token."""
    width = max(min(len(r.input_ids), max_seq_len) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    loss_positions = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, row in enumerate(rows):
        ids, mask = row.input_ids[:max_seq_len], row.loss_mask[:max_seq_len]
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attention[b, : len(ids)] = 1
        loss_positions[b, : len(ids) - 1] = True if every_position else torch.tensor(mask[1:], dtype=torch.bool)
    labels = torch.roll(input_ids, -1, dims=1)
    return input_ids.to(device), attention.to(device), loss_positions.to(device), labels.to(device)


def offline_teacher_logits(rows: list[Row], max_seq_len: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    """Dense teacher log-probabilities [1, N, V] from stored top-k rows: the k stored values, and the rest of the
    mass (1 − Σ top-k) spread evenly over the other tokens, so every divergence stays finite."""
    per_row = []
    for row in rows:
        kept = row.loss_positions(max_seq_len)
        ids = torch.as_tensor(row.topk_ids[:kept], dtype=torch.long)
        values = torch.as_tensor(row.topk_logprobs[:kept], dtype=torch.float32)
        if ids.shape[0] != kept:
            raise ValueError(f"record {row.id}: {ids.shape[0]} top-k rows for {kept} answer positions; the data_gen "
                             f"output is inconsistent, regenerate it")
        tail = (1 - values.exp().sum(-1, keepdim=True)).clamp_min(1e-6) / (vocab_size - ids.shape[1])
        dense = tail.log().expand(kept, vocab_size).clone()
        per_row.append(dense.scatter_(-1, ids, values))
    return torch.cat(per_row).unsqueeze(0).to(device)


def distill_rows(data_dir: Path, teacher: str, heldout_records: int, extra_rows: list[Row]) -> tuple[list[Row],
                                                                                                   list[Row]]:
    """(training rows, held-out rows) of a distill run: the data_gen records less the held-out split, then the corpus
    rows (`extra_rows`), which only train; the held-out rows stay the target's own answers. The online stage's
    rehearsal draws on the same training rows through this function."""
    train_rows, heldout = split_heldout(read_rows(data_dir, teacher), heldout_records)
    return train_rows + extra_rows, heldout


def corpus_rows(tokenizer: PreTrainedTokenizerBase, corpus: PromptSourceSpec, cache_dir: Path, count: int,
                max_seq_len: int) -> tuple[list[Row], dict]:
    """`count` conversations of `corpus` in the chat template (plain text: text + end of sequence), cut at
    max_seq_len, every next token scored; and the source's report (what was read and skipped)."""
    conversations, report = load_conversations(corpus, cache_dir, "corpus")
    rows = conversation_rows(tokenizer, conversations[:count], max_seq_len)
    if len(rows) < count:
        print(f"[distill] corpus {corpus.name}: {len(rows)} conversations of the {count} asked for "
              f"(distill.corpus_records) are available", flush=True)
    return rows, report.as_dict()


def conversation_rows(tokenizer: PreTrainedTokenizerBase, conversations: list, max_seq_len: int) -> list[Row]:
    """Corpus conversations as rows (`corpus_rows`); the ones under 3 tokens left out."""
    rows = []
    for conversation in conversations:
        ids = document_token_ids(tokenizer, conversation.messages)[:max_seq_len]
        if len(ids) >= 3:
            rows.append(Row(id=f"corpus:{conversation.id}", input_ids=ids, loss_mask=[0] + [1] * (len(ids) - 1),
                            prompt_ids=ids[:1]))
    return rows
