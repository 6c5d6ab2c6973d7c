"""Sharded, crash-safe storage for data_gen records.

Each shard is one Arrow IPC file written to a temporary name, fsynced and renamed, so a shard file either is
complete or does not exist: kill -9 at any moment loses at most the shard being written, and a rerun redoes
exactly the missing ones. The shard's own accounting (skips, flags, tokens, seconds) travels inside the file's
schema metadata. `manifest.json` lists every shard with its record count and sha256 once all are present.
Readers memory-map the shards, so a large dataset costs no RAM to open.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset

from infra.settings import SettingsError

SHARDS = "shards"
MANIFEST = "manifest.json"


def shard_path(out_dir: Path, index: int) -> Path:
    return out_dir / SHARDS / f"shard-{index:05d}.arrow"


def record_schema(top_k: int) -> pa.Schema:
    fields = [
        ("id", pa.string()), ("source", pa.string()), ("conversation_id", pa.string()), ("category", pa.string()),
        ("sample", pa.int32()), ("order", pa.int64()), ("generator", pa.string()), ("turns", pa.int32()),
        ("prompt_ids", pa.list_(pa.int32())), ("response_ids", pa.list_(pa.int32())),
        ("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.int8())),
        ("finish_reason", pa.string()), ("flags", pa.list_(pa.string())),
        ("sampling", pa.struct([("temperature", pa.float32()), ("top_p", pa.float32()), ("top_k", pa.int32()),
                                ("max_new_tokens", pa.int32()), ("seed", pa.int64())])),
    ]
    if top_k:
        fields += [("topk_ids", pa.list_(pa.list_(pa.int32(), top_k))),
                   ("topk_logprobs", pa.list_(pa.list_(pa.float16(), top_k)))]
    return pa.schema(fields)


def _nested(rows: list[np.ndarray], dtype, width: int) -> pa.Array:
    """[n_i, width] arrays -> list<fixed_size_list<dtype, width>> (pyarrow cannot build float16 from Python)."""
    lengths = np.array([len(r) for r in rows], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    flat = np.concatenate([r.reshape(-1) for r in rows]) if rows else np.zeros(0)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.astype(dtype)), width)
    return pa.ListArray.from_arrays(offsets, inner)


def write_shard(path: Path, records: list[dict], top_k: int, stats: dict, provenance: dict | None = None) -> None:
    """Write `records` atomically; top-k columns come as numpy arrays [n_masked, k] per record. `provenance`
    (resolved config, git commit, target identity) is stored in the file's metadata beside the shard's stats."""
    schema = record_schema(top_k)
    plain = [name for name in schema.names if not name.startswith("topk_")]
    columns = {name: pa.array([r[name] for r in records], type=schema.field(name).type) for name in plain}
    if top_k:
        columns["topk_ids"] = _nested([r["topk_ids"] for r in records], np.int32, top_k)
        columns["topk_logprobs"] = _nested([r["topk_logprobs"] for r in records], np.float16, top_k)
    metadata = {"draftsmith": json.dumps(stats), "draftsmith_provenance": json.dumps(provenance, default=str)}
    table = pa.table(columns, schema=schema.with_metadata(metadata))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_shard(path: Path) -> tuple[pa.Table, dict]:
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_file(source).read_all()
    return table, json.loads(table.schema.metadata[b"draftsmith"])


def shard_provenance(path: Path) -> dict | None:
    """How a shard was made: {"config", "git_commit", "target"} (None for a shard written without it)."""
    with pa.memory_map(str(path)) as source:
        metadata = pa.ipc.open_file(source).schema.metadata
    return json.loads(metadata.get(b"draftsmith_provenance", b"null"))


def complete_shards(out_dir: Path, num_shards: int) -> set[int]:
    return {i for i in range(num_shards) if shard_path(out_dir, i).exists()}


def load_records(data_dir: Path) -> Dataset:
    """The records of a data_gen output (its manifest's shards, in order) as one memory-mapped Dataset."""
    manifest_path = data_dir / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"{data_dir} has no {MANIFEST}: not a finished data_gen output")
    manifest = json.loads(manifest_path.read_text())
    tables = []
    for shard in manifest["shards"]:
        table, _ = read_shard(data_dir / shard["file"])
        if table.num_rows != shard["records"]:
            raise ValueError(f"{data_dir / shard['file']}: {table.num_rows} records, manifest says {shard['records']}")
        tables.append(table.replace_schema_metadata(None))
    return Dataset(pa.concat_tables(tables))


def check_held_out(conversations, data_gen_dir: Path | None, what: str = "eval prompts",
                   key: str = "eval_data.offset") -> None:
    """An eval prompt seen in training inflates acceptance: refuse eval prompts that are in this run's data."""
    if data_gen_dir is None:
        return
    records = load_records(data_gen_dir).select_columns(["source", "conversation_id"])
    seen = set(zip(records["source"], records["conversation_id"]))
    overlap = sorted(c.id for c in conversations if (c.source, c.id) in seen)
    if overlap:
        raise SettingsError(f"{len(overlap)} {what} are in this run's training data ({overlap[:5]}); "
                         f"choose another slice ({key}) so results stay held out")
