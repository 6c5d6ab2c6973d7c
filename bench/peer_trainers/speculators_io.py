"""speculators 0.9.0 (vLLM's EAGLE-3 trainer) fed our training rows, run on the CPU, its checkpoints read back.

What `speculators train` reads, written from draftsmith's rows and target (`write_inputs`):
- `data/`: a `datasets` folder (save_to_disk, torch format) with `input_ids`, `loss_mask`, `seq_len` per row, the
  training rows first and the held-out rows last (`--train-data-ratio` splits them in stored order);
- `data/hidden_states/hs_<i>.safetensors`: `hidden_states` [T, n_aux + 1, d] (the residual stream entering each
  aux layer id, vLLM's numbering: our feature layer L is id L + 1; then the last decoder layer's output before the
  final norm, which speculators turns into the teacher with the target's own norm and head) and `token_ids` [T];
  stored in fp16, the rounding our feature cache stores, so both trainers learn from the same numbers;
- `d2t.npy` / `t2d.npy`: our drafter's draft vocabulary (offsets; a mask over the target's vocabulary).

The run (`command`) goes through `bench/peer_trainers/speculators_cpu.py` inside the peer's own environment, which
makes the smallest run-time changes its trainer needs without an accelerator (listed in CPU_CHANGES) and nothing
else: its loss, optimizer, packing and data path are its own.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from train.core.rows import Row

PEER = "speculators==0.9.0"
WRAPPER = Path(__file__).with_name("speculators_cpu.py")
CPU_CHANGES = (
    "torch.accelerator.synchronize() is a no-op without an accelerator (its step timer calls it: trainer.py:80,92)",
    "the trainer's device is the CPU instead of LOCAL_RANK 0 (model.to / batch.to: trainer.py:348,533,643)",
    "checkpoints resume onto the CPU instead of cuda:0 (checkpointer.py:306,323)",
    "flags: --draft-attn-impl sdpa (flex attention has no CPU backward), --loss-implementation eager (the fused "
    "loss is a Triton kernel), --num-workers 0, --on-missing raise (no vLLM server to generate hidden states)",
    "no bf16 autocast: speculators asks for CUDA autocast, which is off on a CPU, so it trains in fp32 as ours does",
)


def speculators_layer_ids(feature_layers: tuple[int, ...]) -> list[int]:
    """Our feature layers (decoder-layer outputs, 0-based) in speculators'/vLLM's numbering, ascending."""
    return sorted(layer + 1 for layer in feature_layers)


def _hidden_states(target, ids: list[int], layers: list[int]) -> torch.Tensor:
    """[T, len(layers) + 1, d]: the residual stream entering each layer id, then the last layer's pre-norm output."""
    decoder = target.get_decoder()
    captured: dict[int, torch.Tensor] = {}
    hooks = [decoder.layers[i - 1].register_forward_hook(
        lambda module, inputs, output, i=i: captured.__setitem__(i, output[0] if isinstance(output, tuple) else output))
        for i in sorted(set(layers) | {len(decoder.layers)})]
    try:
        with torch.no_grad():
            decoder(input_ids=torch.tensor([ids], device=target.device))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([captured[i][0] for i in layers] + [captured[len(decoder.layers)][0]], 1)


def write_inputs(target, train_rows: list[Row], heldout: list[Row], feature_layers: tuple[int, ...],
                 d2t: torch.Tensor, max_seq_len: int, out_dir: Path, every_position: bool = False) -> dict:
    """Everything `speculators train` reads, in `out_dir`; returns what the run needs (paths, ids, ratio) and the
    positions it will score per epoch. `every_position` (distill.train_on=all): every next token is scored, prompts
    too, as our trainer then scores them."""
    from datasets import Dataset

    rows = train_rows + heldout
    if not heldout:
        raise ValueError("speculators needs a non-empty validation split: give it the held-out rows")
    for row in rows:
        if len(row.input_ids) < 3:
            raise ValueError(f"record {row.id}: {len(row.input_ids)} tokens; speculators' shift needs at least 3")
    data = out_dir / "data"
    ids = [row.input_ids[:max_seq_len] for row in rows]
    masks = [[0] + [1] * (len(i) - 1) if every_position else [int(m) for m in row.loss_mask[:max_seq_len]]
             for row, i in zip(rows, ids)]
    Dataset.from_dict({"input_ids": ids, "loss_mask": masks, "seq_len": [len(i) for i in ids]}) \
        .with_format("torch").save_to_disk(str(data))
    layers = speculators_layer_ids(feature_layers)
    states = data / "hidden_states"
    states.mkdir(parents=True, exist_ok=True)
    for index, tokens in enumerate(tqdm(ids, desc="speculators inputs (target prefill)", unit="row")):
        hidden = _hidden_states(target, tokens, layers).half().cpu().contiguous()
        save_file({"hidden_states": hidden, "token_ids": torch.tensor(tokens, dtype=torch.long)},
                  str(states / f"hs_{index}.safetensors"))
    d2t = d2t.long().cpu()
    offsets = (d2t - torch.arange(len(d2t))).numpy().astype(np.int64)
    t2d = np.zeros(target.config.vocab_size, dtype=bool)
    t2d[d2t.numpy()] = True
    np.save(out_dir / "d2t.npy", offsets)
    np.save(out_dir / "t2d.npy", t2d)
    inputs = {"data": str(data), "d2t": str(out_dir / "d2t.npy"), "t2d": str(out_dir / "t2d.npy"),
              "layer_ids": layers, "train_rows": len(train_rows), "heldout_rows": len(heldout),
              # int(N * ratio) must land exactly on the split (speculators' data.py cuts there)
              "train_data_ratio": (len(train_rows) + 0.5) / len(rows),
              # what its loss scores at the first TTT step: position t against the teacher at t + 1, where
              # loss_mask[t + 1] is 1
              "scored_per_epoch": sum(sum(mask[1:]) for mask in masks[:len(train_rows)]),
              "draft_vocab_size": len(d2t)}
    (out_dir / "inputs.json").write_text(json.dumps(inputs, indent=2))
    return inputs


def command(python: Path, target_dir: Path, inputs: dict, save_path: Path, epochs: int, lr: float,
            total_seq_len: int, optimizer: str | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """`speculators train` over `inputs`, `epochs` epochs, a checkpoint at every epoch's end; its own optimizer
    (Muon over the weight matrices, AdamW over the rest, muon_lr = lr) unless `optimizer` names another."""
    return [str(python), str(WRAPPER), "train", "--verifier-name-or-path", str(target_dir),
            "--data-path", inputs["data"], "--save-path", str(save_path), "--log-dir", str(save_path / "logs"),
            "--target-layer-ids", *map(str, inputs["layer_ids"]), "--d2t-path", inputs["d2t"],
            "--t2d-path", inputs["t2d"], "--draft-vocab-size", str(inputs["draft_vocab_size"]),
            "--train-data-ratio", f"{inputs['train_data_ratio']:.8f}", "--total-seq-len", str(total_seq_len),
            "--hidden-states-dtype", "float32", "--draft-attn-impl", "sdpa", "--loss-implementation", "eager",
            *(("--optimizer", optimizer) if optimizer else ()), "--lr", str(lr), "--num-workers", "0",
            "--on-missing", "raise",
            "--epochs", str(epochs), "--checkpoint-freq", "1", "--no-resume-from-checkpoint", *extra]


def epoch_checkpoints(save_path: Path) -> list[Path]:
    """The per-epoch checkpoint folders a run left (`<save>/<epoch>/`), in epoch order."""
    found = [p for p in save_path.iterdir() if p.is_dir() and p.name.isdigit() and (p / "config.json").exists()]
    return sorted(found, key=lambda p: int(p.name))


def read_metrics(path: Path) -> list[dict]:
    """The dicts the trainer logged (the wrapper's SPEC_METRICS_JSONL), one per logged step or validation."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
