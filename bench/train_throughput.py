"""Distillation training throughput: our distill stage against a plain Hugging Face `Trainer` loop, side by side.

    python bench/train_throughput.py --records runs/quickstart/default/data_gen --steps 20

Same drafter (built from the real SmolLM2 target with conf/drafter/smollm2_draft_11m.yaml, same seed), same
records (a data_gen output), same optimizer step count, batch size and learning rate, the same loss (cross-entropy
on the target's answer tokens: SeqKD, which the Trainer supports natively through `labels` with the prompt
masked to -100). The Trainer is used as its users would: `DataCollatorForSeq2Seq` padding, defaults otherwise.
Ours: length-grouped batches and the LM head evaluated only at answer positions. Each side runs twice
alternately, the better time counts. Prints tokens/s (all input tokens, padding excluded) and the ratio.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from data_gen.shards import load_records
from infra.tracking import LoggerSettings, Tracker
from losses.ce import cross_entropy
from losses.mix import LossMix
from models.drafter import DrafterSpec, build_drafter
from models.loading import configured_target, load_target
from train.distill import DistillSettings, distill
from train.core.optim import OptimSettings

DRAFTER = DrafterSpec(name="smollm2-draft-11m", hidden_size=192, num_layers=4, num_heads=3, num_kv_heads=1,
                      intermediate_size=512, init="target_embeddings")


def trainer_run(drafter, tokenizer, rows: list[dict], steps: int, batch_size: int, lr: float, out: Path) -> float:
    examples = [{"input_ids": r["input_ids"], "attention_mask": [1] * len(r["input_ids"]),
                 "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["loss_mask"])]} for r in rows]
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch_size, max_steps=steps,
                             learning_rate=lr, warmup_steps=2, lr_scheduler_type="cosine", weight_decay=0.01,
                             adam_beta2=0.95, max_grad_norm=1.0, logging_steps=10 ** 6, save_strategy="no",
                             report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = Trainer(model=drafter, args=args, train_dataset=examples,
                      data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, label_pad_token_id=-100))
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def ours_run(drafter, target, tokenizer, records: Path, steps: int, batch_size: int, lr: float, out: Path) -> float:
    settings = DistillSettings(epochs=10 ** 6, max_steps=steps, batch_size=batch_size, heldout_records=1,
                               log_every=10 ** 6, select="last", optim=OptimSettings(lr=lr, warmup_steps=2))
    tracker = Tracker(LoggerSettings(backend="none", mode="disabled"), out, "distill", {})
    started = time.perf_counter()
    distill(drafter, target, tokenizer, records, LossMix({"ce": {"fn": cross_entropy}}), settings, out, tracker)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=Path, required=True, help="a data_gen output folder")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "draftsmith")
    options = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_target(configured_target("smollm2_135m"), options.cache)
    target, tokenizer = loaded.model, loaded.tokenizer
    rows = list(load_records(options.records).select_columns(["input_ids", "loss_mask"]))
    # the rows both sides will see: ours trains on all but one held-out record; the Trainer shuffles all
    tokens_per_step = options.batch_size * sum(len(r["input_ids"]) for r in rows) / len(rows)
    work = tokens_per_step * options.steps
    times = {"hf_trainer": [], "draftsmith": []}
    for attempt in range(2):
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            times["hf_trainer"].append(trainer_run(build_drafter(DRAFTER, target, tokenizer), tokenizer, rows,
                                                   options.steps, options.batch_size, options.lr, scratch / "hf"))
            times["draftsmith"].append(ours_run(build_drafter(DRAFTER, target, tokenizer), target, tokenizer,
                                                options.records, options.steps, options.batch_size, options.lr,
                                                scratch / "ours"))
            shutil.rmtree(scratch, ignore_errors=True)
        print(f"attempt {attempt + 1}: hf_trainer {times['hf_trainer'][-1]:.1f} s, "
              f"draftsmith {times['draftsmith'][-1]:.1f} s", flush=True)
    best = {name: min(values) for name, values in times.items()}
    print(f"\n{options.steps} steps × {options.batch_size} sequences (~{work:,.0f} input tokens), "
          f"{len(rows)} records, drafter {DRAFTER.name}, torch threads {torch.get_num_threads()}")
    print("| loop | seconds | tokens/s |\n|---|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.1f} | {work / seconds:,.0f} |")
    print(f"\nratio draftsmith / hf_trainer: {best['hf_trainer'] / best['draftsmith']:.2f}×")


if __name__ == "__main__":
    main()
