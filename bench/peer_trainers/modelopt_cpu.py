"""NVIDIA ModelOpt (nvidia-modelopt 0.47.0) EAGLE-3 training, offline (target features from files), on the CPU, in
its own environment (.venv-peers/modelopt):

    .venv-peers/modelopt/bin/python bench/peer_trainers/modelopt_cpu.py INPUTS.json SAVE_DIR [recipe.key=value ...]

ModelOpt's trainer is `examples/speculative_decoding/main.py` of its GitHub repository, which the wheel does not
ship. This driver makes the same calls into the wheel that main.py makes on its offline path and nothing else:
the built-in recipe `general/speculative_decoding/eagle3` (`modelopt.recipe.load_recipe`, overrides as dotlist),
`load_vlm_or_llm(use_offline_training=True)`, `mtsp.convert(model, [("eagle", recipe.eagle)])`, the draft
vocabulary cache, the wheel's `OfflineSupervisedDataset` and `EagleOfflineDataCollator`, and `transformers.Trainer`
with the recipe's training arguments (so its loss, optimizer, schedule and data path are ModelOpt's). Around it:
- at every epoch's end the draft module is exported with ModelOpt's own exporter (`model.get_exporter()`) into
  SAVE_DIR/<epoch>/, as `scripts/export_hf_checkpoint.py` exports, and its teacher-forced accuracy per TTT step on
  the held-out rows (its forward in training mode, no gradients) is written beside it (`heldout_acc.json`);
- every optimizer step's wall seconds and the positions its loss scored at the first TTT step are appended to
  SAVE_DIR/steps.jsonl (the driver's own records; ModelOpt is unchanged).
The run-time changes it needs without an accelerator are listed in modelopt_io.CPU_CHANGES. Imports only the peer
and its dependencies: nothing of draftsmith runs in the peer's environment.
"""
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]  # its own
# folder holds draftsmith's adapters, not the peer

import torch  # noqa: E402
import transformers  # noqa: E402

import modelopt.torch.opt as mto  # noqa: E402
import modelopt.torch.speculative as mtsp  # noqa: E402
from modelopt.recipe import load_recipe  # noqa: E402
from modelopt.torch.speculative.eagle.utils import EagleOfflineDataCollator, OfflineSupervisedDataset  # noqa: E402
from modelopt.torch.speculative.plugins.hf_training_args import TrainingArguments as SpecTrainingArgs  # noqa: E402
from modelopt.torch.speculative.utils import load_vlm_or_llm  # noqa: E402

RECIPE = "general/speculative_decoding/eagle3"

# transformers.TrainingArguments with ModelOpt's speculative fields, built as main.py builds it; defined here at
# module level (with this module's name) so the Trainer can pickle it into its checkpoints: main.py's
# make_dataclass class cannot be pickled on Python 3.11.
HfTrainingArguments = dataclasses.make_dataclass(
    "HfTrainingArguments",
    [(name, field.annotation, dataclasses.field(default=field.default))
     for name, field in SpecTrainingArgs.model_fields.items()],
    bases=(transformers.TrainingArguments,))
HfTrainingArguments.__module__ = __name__


class Recorded(transformers.Trainer):
    """transformers.Trainer, also recording each step's wall seconds and scored positions (no change to the loss)."""

    def __init__(self, *args, steps_file: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps_file = steps_file.open("a", buffering=1)
        self.scored = 0

    def compute_loss(self, model, inputs, *args, **kwargs):
        kwargs.pop("num_items_in_batch", None)
        # what ModelOpt's loss scores at the first TTT step: eagle position t against the teacher at t + 1
        self.scored += int(inputs["loss_mask"][:, 1:].sum())
        return super().compute_loss(model, inputs, *args, **kwargs)

    def training_step(self, *args, **kwargs):
        started = time.perf_counter()
        loss = super().training_step(*args, **kwargs)
        self.steps_file.write(json.dumps({"seconds": time.perf_counter() - started, "scored": self.scored}) + "\n")
        self.scored = 0
        return loss


class EpochExport(transformers.TrainerCallback):
    """At each epoch's end: ModelOpt's export of the draft module, and its held-out accuracy per TTT step."""

    def __init__(self, model, save: Path, heldout: OfflineSupervisedDataset, collator) -> None:
        self.model, self.save, self.heldout, self.collator = model, save, heldout, collator

    def on_epoch_end(self, args, state, control, **kwargs):
        epoch = round(state.epoch)
        folder = self.save / str(epoch)
        self.model.get_exporter().export(folder)
        sums, weights = None, 0
        with torch.no_grad():
            for index in range(len(self.heldout)):
                batch = self.collator([self.heldout[index]])
                accuracy = torch.tensor(self.model(**batch).train_acc[0])
                positions = int(batch["loss_mask"][:, 1:].sum())
                sums = accuracy * positions if sums is None else sums + accuracy * positions
                weights += positions
        (folder / "heldout_acc.json").write_text(json.dumps(
            {"epoch": epoch, "per_ttt_step": (sums / max(weights, 1)).tolist() if sums is not None else []}))
        return control


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    inputs = json.loads(Path(sys.argv[1]).read_text())
    save = Path(sys.argv[2])
    save.mkdir(parents=True, exist_ok=True)
    (save / "steps.jsonl").unlink(missing_ok=True)
    recipe = load_recipe(RECIPE, overrides=[
        f"model.model_name_or_path={inputs['target']}", f"data.offline_data_path={inputs['train']}",
        f"data.draft_vocab_cache={inputs['d2t']}", f"training.output_dir={save / 'trainer'}", *sys.argv[3:]])
    training_args = HfTrainingArguments(**recipe.training.model_dump())
    mto.enable_huggingface_checkpointing()
    model = load_vlm_or_llm(recipe.model.model_name_or_path, use_fake_base=recipe.model.use_fake_base_for_offline,
                            use_offline_training=True, dtype="auto", device_map="cpu",
                            trust_remote_code=recipe.model.trust_remote_code)
    tokenizer = transformers.AutoTokenizer.from_pretrained(recipe.model.model_name_or_path,
                                                           model_max_length=training_args.training_seq_len)
    mtsp.convert(model, [("eagle", recipe.eagle.model_dump())])
    mtsp.plugins.HFEagleModel.load_draft_vocab_cache(model, recipe.data.draft_vocab_cache)
    files = sorted(Path(recipe.data.offline_data_path).glob("*.pt"))
    train = OfflineSupervisedDataset([str(p) for p in files], answer_only_loss=training_args.answer_only_loss,
                                     tokenizer=tokenizer)
    heldout = OfflineSupervisedDataset([str(p) for p in sorted(Path(inputs["heldout"]).glob("*.pt"))],
                                       answer_only_loss=training_args.answer_only_loss, tokenizer=tokenizer)
    collator = EagleOfflineDataCollator(train_len=training_args.training_seq_len)
    trainer = Recorded(model=model, processing_class=tokenizer, args=training_args, train_dataset=train,
                       data_collator=collator, steps_file=save / "steps.jsonl",
                       callbacks=[EpochExport(model, save, heldout, collator)])
    trainer.can_return_loss = True
    trainer.train()


if __name__ == "__main__":
    main()
