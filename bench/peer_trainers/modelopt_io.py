"""NVIDIA ModelOpt 0.47.0's EAGLE-3 trainer (offline: target features from files) fed our training rows, run on the
CPU, its per-epoch exports read back.

What its offline path reads, written from draftsmith's rows and target (`write_inputs`):
- `train/NNNNN.pt` and `heldout/NNNNN.pt`, one per row, in the layout of ModelOpt's
  `collect_hidden_states/compute_hidden_states_hf.py`: `input_ids` [T]; `aux_hidden_states` [T, k·d], the outputs
  of the aux decoder layers concatenated (ModelOpt numbers a layer by its output, so its ids are our feature
  layers themselves; vLLM numbers by input, one more); `hidden_states` [T, d], the last layer after the target's
  final norm (transformers' last hidden state, the teacher ModelOpt puts through the target's head); `loss_mask`
  [T] where our loss scores only some positions (`answer_only_loss`). fp16-rounded as our feature cache stores
  them, kept in fp32 (its draft module runs in the target's dtype);
- `d2t.pt`: our draft vocabulary as ModelOpt's `d2t` buffer (offsets: draft id i is target id i + d2t[i]).

The run (`command`) goes through `bench/peer_trainers/modelopt_cpu.py` in the peer's own environment: the wheel's
recipe, model conversion, dataset, collator and `transformers.Trainer`, with the run-time changes listed in
CPU_CHANGES and the budget's settings (epochs, batch, learning rate, warm-up) set as recipe overrides.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench.peer_trainers.speculators_io import _hidden_states, speculators_layer_ids
from bench.peer_trainers.speculators_io import epoch_checkpoints as epoch_exports  # `<save>/<epoch>/` folders too
from train.core.rows import Row

PEER = "nvidia-modelopt[hf]==0.47.0"
WRAPPER = Path(__file__).with_name("modelopt_cpu.py")
CPU_CHANGES = (
    "driver: bench/peer_trainers/modelopt_cpu.py makes main.py's offline-path calls into the wheel (main.py lives in "
    "the GitHub repository's examples/, not the wheel); its TrainingArguments dataclass is defined at module level "
    "so checkpoints pickle on Python 3.11",
    "training.use_cpu=true, training.bf16=false, training.tf32=false (no GPU: fp32, as ours trains)",
    "eagle.eagle_use_torch_compile=false (its compiled path targets CUDA graphs)",
)
# What its export gets wrong for a server, left as it is (bench/peers.py shows each as served against trained):
EXPORT_DEFECTS = (
    "config.json names the aux layers by output (ModelOpt's numbering) where vLLM reads ids as layer inputs: "
    "vLLM serves features one layer early (our decoder reads the export with the layers it trained on)",
    "config.json carries rope_scaling YaRN (factor 32, eagle_export_rope_scaling) that training did not use: "
    "vLLM serves it (our decoder reads the rope it trained with)",
    "its first layer trains on hidden_norm(input_layernorm(h)) (the pre-attention hook re-norms the already normed "
    "input); vLLM and our decoder compute hidden_norm(h)",
)


def write_inputs(target, target_dir: Path, train_rows: list[Row], heldout: list[Row],
                 feature_layers: tuple[int, ...], d2t: torch.Tensor, max_seq_len: int, out_dir: Path,
                 every_position: bool = False) -> dict:
    """Everything ModelOpt's offline training reads, in `out_dir`; returns what the run needs (paths, layer ids,
    sequence length) and the positions its loss scores per epoch. `every_position` (distill.train_on=all): every
    next token is scored, prompts too, as ModelOpt does without answer_only_loss."""
    layers = speculators_layer_ids(feature_layers)  # inputs of these layers = outputs of our feature layers
    norm = target.get_decoder().norm
    lengths = []
    for split, rows in (("train", train_rows), ("heldout", heldout)):
        folder = out_dir / split
        folder.mkdir(parents=True, exist_ok=True)
        for index, row in enumerate(tqdm(rows, desc=f"modelopt {split} inputs (target prefill)", unit="row")):
            ids = row.input_ids[:max_seq_len]
            if len(ids) < 3:
                raise ValueError(f"record {row.id}: {len(ids)} tokens; ModelOpt's shifted loss needs at least 3")
            stacked = _hidden_states(target, ids, layers)
            with torch.no_grad():
                last = norm(stacked[:, -1:].transpose(0, 1))[0]
            record = {"input_ids": torch.tensor(ids, dtype=torch.long),
                      "aux_hidden_states": stacked[:, :-1].reshape(len(ids), -1).half().float().contiguous(),
                      "hidden_states": last.half().float().contiguous()}
            if not every_position:
                record["loss_mask"] = torch.tensor([int(m) for m in row.loss_mask[:max_seq_len]], dtype=torch.long)
            torch.save(record, folder / f"{index:05d}.pt")
            if split == "train":
                lengths.append(len(ids))
    offsets = d2t.long().cpu() - torch.arange(len(d2t))
    torch.save(offsets, out_dir / "d2t.pt")
    masks = [[1] * len(row.input_ids[:max_seq_len]) if every_position else row.loss_mask[:max_seq_len]
             for row in train_rows]
    inputs = {"target": str(target_dir), "train": str(out_dir / "train"), "heldout": str(out_dir / "heldout"),
              "d2t": str(out_dir / "d2t.pt"), "layer_ids": sorted(feature_layers),
              "draft_vocab_size": len(d2t), "train_rows": len(train_rows), "heldout_rows": len(heldout),
              "training_seq_len": max(lengths), "answer_only_loss": not every_position,
              # what its loss scores at the first TTT step: position t against the teacher at t + 1 where
              # loss_mask[t + 1] is 1 (its collator pads every row to training_seq_len with a zero mask)
              "scored_per_epoch": sum(sum(int(m) for m in mask[1:]) for mask in masks)}
    (out_dir / "inputs.json").write_text(json.dumps(inputs, indent=2))
    return inputs


def command(python: Path, inputs_json: Path, save_path: Path, epochs: int, lr: float, batch_size: int,
            warmup_steps: int, drafter_shape: dict, seed: int = 0) -> list[str]:
    """modelopt_cpu.py over `inputs_json`: `epochs` epochs, our batch, learning rate and warm-up, the draft layer
    in our drafter's shape (`drafter_shape`: intermediate_size, num_attention_heads, num_key_value_heads,
    head_dim), an export at every epoch's end."""
    inputs = json.loads(Path(inputs_json).read_text())
    arch = {"eagle_aux_hidden_state_layer_ids": inputs["layer_ids"], "draft_vocab_size": inputs["draft_vocab_size"],
            **drafter_shape}
    return [str(python), str(WRAPPER), str(inputs_json), str(save_path),
            f"training.num_train_epochs={epochs}", f"training.per_device_train_batch_size={batch_size}",
            f"training.learning_rate={lr}", f"training.warmup_steps={warmup_steps}",
            f"training.training_seq_len={inputs['training_seq_len']}",
            f"training.answer_only_loss={str(inputs['answer_only_loss']).lower()}",
            'training.save_strategy="no"', "training.logging_steps=20", "training.report_to=none",
            f"training.seed={seed}", "training.use_cpu=true", "training.bf16=false", "training.tf32=false",
            "training.dataloader_num_workers=0", "eagle.eagle_use_torch_compile=false",
            *(f"eagle.eagle_architecture_config.{key}={json.dumps(value, separators=(',', ':'))}"
              for key, value in arch.items())]


def read_steps(save_path: Path) -> dict:
    """Training seconds (the optimizer steps alone) and scored positions, from the driver's steps.jsonl."""
    steps = [json.loads(line) for line in (save_path / "steps.jsonl").read_text().splitlines() if line.strip()]
    return {"steps": len(steps), "train_seconds": round(sum(s["seconds"] for s in steps), 1),
            "scored_tokens": sum(s["scored"] for s in steps)}


def as_trained(export: Path) -> Path:
    """A copy of ModelOpt's export `export` that describes what it trained: the aux layers in vLLM's numbering
    (ModelOpt's output ids + 1) and the rope without the YaRN its exporter injects; weights unchanged. Written
    beside it as `<export>-as-trained/` (the hidden_norm-over-input_layernorm difference cannot be described in a
    config, so both copies carry it)."""
    config = json.loads((export / "config.json").read_text())
    eagle = config["eagle_config"]
    eagle["eagle_aux_hidden_state_layer_ids"] = [i + 1 for i in eagle["eagle_aux_hidden_state_layer_ids"]]
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_theta"]}
    fixed = export.with_name(f"{export.name}-as-trained")
    fixed.mkdir(exist_ok=True)
    shutil.copyfile(export / "model.safetensors", fixed / "model.safetensors")
    (fixed / "config.json").write_text(json.dumps(config, indent=2))
    return fixed
