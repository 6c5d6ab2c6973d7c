"""The target's features for a feature drafter's training, computed once and stored (`distill.feature_cache=true`).

    python train/run.py +experiment=standalone drafter=eagle3 loss=eagle3 distill.feature_cache=true

A feature drafter learns from the frozen target's hidden states. With the cache, one batched prefill (inference
mode, length-sorted batches) runs the target over every training and held-out record once and keeps, per token,
what the drafter's training reads: the fused input features (the drafter's `feature_layers`, or the last hidden
state), the last hidden state (the teacher distribution is the target's head applied to it) and the teacher's
top-1 token (which positions a draft vocabulary can score), in 16-bit/int32 safetensors shards under
`distill/features/`. Every epoch then reads them instead of running the target, so epochs cost only the drafter.
The disk needed is printed, and checked against free space, before the prefill starts; a run killed while
writing leaves `features.partial/`, which the next run discards; a finished cache whose fingerprint (records,
layers, lengths, target) matches is reused once every shard's size and sha256 match what its manifest recorded
when it was written; a damaged one is named, moved aside to `<folder>.damaged/` and rebuilt. With `distill.feature_cache_dir=DIR` the cache lives in
`DIR/<fingerprint>/` instead, made once (under a lock) and reused by every run over the same records and target,
such as the points of a loss sweep. 16-bit rounding of the stored features (fp16, or bf16 for a row whose values
exceed fp16's range: `compact`) is the only difference from the online teacher.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from infra import distributed
from infra.integrity import DamagedFilesError, digests, files_in, move_aside, read_record, verify_files
from infra.rundir import exclusive, human_bytes, writing
from models.cache import captured_layers
from train.core.rows import Row, collate

SHARD_ROWS = 256
MANIFEST = "manifest.json"


def bytes_needed(rows: list[Row], max_seq_len: int, hidden: int, layers: int) -> int:
    tokens = sum(min(len(row.input_ids), max_seq_len) for row in rows)
    return tokens * (2 * hidden * (layers + 1 if layers else 1) + 4)


class FeatureCache:
    """Per record id: fused features [T, k·d] and last hidden states [T, d] in 16 bits, teacher top-1 [T] int32."""

    def __init__(self, entries: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 folder: Path | None = None) -> None:
        self.entries, self.folder = entries, folder  # folder: where the shards were read from, if anywhere

    def batch(self, rows: list[Row], max_seq_len: int, device: torch.device):
        """(fused, last, top1) right-padded to the batch's width, as `train.core.rows.collate` pads the tokens."""
        width = max(min(len(row.input_ids), max_seq_len) for row in rows)
        first = self.entries[rows[0].id]
        fused = torch.zeros(len(rows), width, first[0].shape[-1])
        last = torch.zeros(len(rows), width, first[1].shape[-1])
        top1 = torch.zeros(len(rows), width, dtype=torch.long)
        for b, row in enumerate(rows):
            f, h, a = self.entries[row.id]
            fused[b, : len(f)], last[b, : len(h)], top1[b, : len(a)] = f.float(), h.float(), a.long()
        return fused.to(device), last.to(device), top1.to(device)


def fingerprint(rows: list[Row], layers: tuple[int, ...] | None, max_seq_len: int, target: PreTrainedModel) -> str:
    digest = hashlib.sha256()
    for row in sorted(rows, key=lambda r: r.id):
        digest.update(row.id.encode())
        digest.update(str(row.input_ids[:max_seq_len]).encode())
    digest.update(json.dumps([list(layers or []), max_seq_len, target.config.to_diff_dict(), FORMAT], sort_keys=True,
                             default=str).encode())
    parameters = list(target.parameters())
    for weight in (parameters[0], parameters[len(parameters) // 2], parameters[-1]):  # a sample of the weights:
        digest.update(weight.detach().flatten()[:4096].float().cpu().numpy().tobytes())  # same config != same model
    return digest.hexdigest()


def build_or_load(target: PreTrainedModel, rows: list[Row], layers: tuple[int, ...] | None, max_seq_len: int,
                  pad_id: int, folder: Path, batch_size: int = 8, headroom: float = 0.05,
                  shared: Path | None = None) -> FeatureCache:
    """The cache for `rows` in `folder`, or in `shared/<fingerprint>` when a folder shared between runs is given
    (made by the main process; the others wait, then read it)."""
    expected = fingerprint(rows, layers, max_seq_len, target)
    if shared is not None:
        folder = shared / expected[:16]
    if distributed.is_main():
        # another run sharing the folder may be making this very cache: wait for it, then reuse what it made
        lock = exclusive(shared / ".locks" / f"{folder.name}.lock", str(folder), wait=True) if shared else nullcontext()
        with lock:
            if _reusable(folder, expected):
                print(f"[distill] feature cache: reusing {folder} (every shard's size and sha256 checked)", flush=True)
            else:
                _prefill(target, rows, layers, max_seq_len, pad_id, folder, batch_size, headroom, expected)
    distributed.barrier()
    return load_cache(folder)


def _reusable(folder: Path, expected: str) -> bool:
    """Whether `folder` holds the finished cache of fingerprint `expected` with every shard as written; a damaged
    one is named and moved aside to `<folder>.damaged/` (then rebuilt by the caller)."""
    manifest = folder / MANIFEST
    try:
        recorded = json.loads(manifest.read_text())
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError, ValueError) as error:
        recorded = {"fingerprint": expected, "unreadable": str(error)}
    if recorded.get("fingerprint") != expected:
        return False
    try:
        verify(folder, recorded)
    except DamagedFilesError as error:
        aside = move_aside(folder)
        print(f"[distill] feature cache: {error}; moved aside to {aside}, rebuilding", flush=True)
        return False
    return True


def verify(folder: Path, recorded: dict | None = None) -> None:
    """Raise `DamagedFilesError` naming the first shard of the cache in `folder` that is not as written (size and
    sha256, as its manifest records them), or the manifest itself when it cannot be read."""
    recorded = read_record(folder / MANIFEST) if recorded is None else recorded
    if not isinstance(recorded.get("files"), dict):
        raise DamagedFilesError(f"{folder / MANIFEST}: unreadable or records no shards "
                                f"({recorded.get('unreadable', 'no files entry')})")
    verify_files(folder, recorded["files"], "this feature cache", leave_out=(MANIFEST,))


def _prefill(target, rows, layers, max_seq_len, pad_id, folder, batch_size, headroom, expected) -> None:
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    partial.mkdir(parents=True)
    hidden = target.config.hidden_size
    needed = bytes_needed(rows, max_seq_len, hidden, len(layers or ()))
    free = shutil.disk_usage(partial).free
    line = (f"feature cache: {len(rows)} records, estimated disk use {human_bytes(needed)} (16-bit features of "
            f"{len(layers) if layers else 'the last'} layer(s) + last hidden state); free on {partial}: "
            f"{human_bytes(free)}")
    if needed > free * (1 - headroom):
        raise OSError(f"{line}. Not enough space: free some, lower distill.max_seq_len or the number of records, "
                      f"or set distill.feature_cache=false (the target then runs in the loop)")
    print(f"[distill] {line}", flush=True)
    started, shard, shard_index, tokens = time.perf_counter(), {}, 0, 0
    for row, fused, last, top1 in target_features(target, rows, layers, max_seq_len, pad_id, batch_size,
                                                  "feature cache (target prefill)"):
        key = str(len(shard))
        if layers:  # else the fused features are the last hidden state: stored once
            shard[f"{key}.fused"] = compact(fused)
        shard[f"{key}.last"] = compact(last)
        shard[f"{key}.top1"] = top1.int().contiguous()
        shard[f"{key}.id"] = torch.tensor(list(row.id.encode()), dtype=torch.uint8)
        tokens += len(last)
        if len(shard) // (4 if layers else 3) == SHARD_ROWS:
            _save_shard(shard, partial / f"shard-{shard_index:05d}.safetensors")
            shard, shard_index = {}, shard_index + 1
    if shard:
        _save_shard(shard, partial / f"shard-{shard_index:05d}.safetensors")
    seconds = time.perf_counter() - started
    (partial / MANIFEST).write_text(json.dumps({"fingerprint": expected, "records": len(rows), "tokens": tokens,
                                                "layers": list(layers or []), "seconds": round(seconds, 1),
                                                "tokens_per_s": round(tokens / max(seconds, 1e-9)),
                                                "files": digests(partial, files_in(partial, (MANIFEST,)))},
                                               indent=2))
    partial.rename(folder)
    print(f"[distill] feature cache: {tokens:,} tokens in {seconds:.0f} s ({tokens / max(seconds, 1e-9):.0f} "
          f"tokens/s) -> {folder}", flush=True)


def _save_shard(tensors: dict, path: Path) -> None:
    with writing(path):
        save_file(tensors, str(path))


FP16_MAX = float(torch.finfo(torch.float16).max)
FORMAT = 3  # in the fingerprint, so a cache of an older format is rebuilt: 3 records every shard's size and sha256


def compact(features: torch.Tensor) -> torch.Tensor:
    """A row's features in 16 bits: fp16 (finer) where every value fits in its range, else bf16. Gemma 3's middle
    layers reach 1e5, past fp16's 65,504: in fp16 they would be inf, and training NaN at its first step."""
    fits = bool(features.abs().max() <= FP16_MAX) if features.numel() else True
    return (features.half() if fits else features.bfloat16()).contiguous()


def target_features(target: PreTrainedModel, rows: list[Row], layers: tuple[int, ...] | None, max_seq_len: int,
                    pad_id: int, batch_size: int = 8, desc: str = "target prefill"):
    """Per row (length-sorted batches): (row, fused features [T, k·d], last hidden states [T, d], the teacher's
    top-1 [T]) on the CPU, in the target's dtype; fused is the last hidden state itself without `layers`. Yields
    outside the no-grad block, so the caller's own work between rows is not affected by it."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    head = target.get_output_embeddings()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        chunk = [rows[i] for i in order[start: start + batch_size]]
        with torch.no_grad(), captured_layers(target, layers) as captured:
            input_ids, attention, _, _ = collate(chunk, pad_id, max_seq_len, target.device)
            last = target.get_decoder()(input_ids=input_ids, attention_mask=attention).last_hidden_state
            fused = last if captured[0] is None else captured[0]
            top1 = head(last).argmax(-1)
        for b, row in enumerate(chunk):
            n = int(attention[b].sum())
            yield row, fused[b, :n].cpu(), last[b, :n].cpu(), top1[b, :n].cpu()


def load_cache(folder: Path) -> FeatureCache:
    entries = {}
    for path in sorted(folder.glob("shard-*.safetensors")):
        shard = load_file(str(path))
        for key in {name.split(".")[0] for name in shard}:
            row_id = bytes(shard[f"{key}.id"].tolist()).decode()
            last = shard[f"{key}.last"]
            entries[row_id] = (shard.get(f"{key}.fused", last), last, shard[f"{key}.top1"])
    return FeatureCache(entries, folder)
