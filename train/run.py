"""draftsmith's entry point: run the configured stages, in order, into `runs/<experiment>/<run_name>/<stage>/`.

    python train/run.py +experiment=smoke
    python train/run.py +experiment=quickstart stages=[eval] +eval.drafters.mine=/path/to/drafter

A stage whose complete output already exists with the same settings is skipped; an interrupted one is redone.
This file only turns the Hydra config into typed settings and calls each stage's plain function.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python train/run.py` from a checkout: make the top-level packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from data_gen.chat import chat_token_ids, end_of_turn_ids, prompt_token_ids
from data_gen.generate import ShardsPending, WorkerSettings, generate
from data_gen.shards import load_records
from data_gen.sources import load_conversations
from eval.speculative import EvalPrompt, draft_for, evaluate
from losses.feature import FeatureLoss
from models.drafter import build_drafter, load_drafter
from models.export import export_drafter, model_card
from models.feature_drafter import CONFIG_FILE as FEATURE_CONFIG_FILE
from models.feature_drafter import (FeatureDrafter, FeatureDrafterSpec, build_feature_drafter,
                                    load_feature_drafter)
from models.compat import check_versions
from models.loading import LoadedModel, load_target, resolve_device, resolve_model_dir
from train import distributed
from train.distill import distill
from train.feature_distill import distill_features
from train.preflight import check_stages
from train.pretrain import pretrain
from train.rundir import StageDir
from train.tracking import LoggerSettings, Tracker

STAGES = ("data_gen", "pretrain", "distill", "eval", "export")
DISTRIBUTED_STAGES = ("pretrain", "distill")  # the stages a torchrun/deepspeed launch may run
# The config sections each stage reads. A stage's fingerprint covers these plus its inputs' fingerprints, so a
# changed upstream stage makes every stage after it stale.
STAGE_SECTIONS = {
    "data_gen": ("target", "data", "data_gen"),
    "pretrain": ("target", "drafter", "corpus", "pretrain", "deepspeed"),
    "distill": ("target", "drafter", "distill", "loss", "deepspeed"),
    "eval": ("target", "drafter", "eval_data", "eval"),
    "export": ("export",),
}
STAGE_INPUTS = {"data_gen": (), "pretrain": (), "distill": ("data_gen", "pretrain"),
                "eval": ("pretrain", "distill"), "export": ("eval", "pretrain", "distill")}


@dataclass
class Pipeline:
    """Everything the stage runners share: typed settings built once from the config, and the loaded target."""

    config: DictConfig
    run_dir: Path
    cache_dir: Path
    resolved: dict
    _target: LoadedModel | None = field(default=None, repr=False)

    def spec(self, section: str):
        return instantiate(self.config[section], _convert_="all")

    def target(self) -> LoadedModel:
        if self._target is None:
            self._target = load_target(self.spec("target"), self.cache_dir,
                                       device=resolve_device(self.config.device))
        return self._target

    def stage_output(self, stage: str) -> Path | None:
        final = StageDir(self.run_dir, stage).final
        return final if (final / "meta.json").exists() else None


def run_data_gen(pipeline: Pipeline, out_dir: Path, tracker: Tracker) -> dict:
    settings = pipeline.spec("data_gen")
    model_dir, _ = resolve_model_dir(pipeline.spec("target"), pipeline.cache_dir)
    conversations, source_report = load_conversations(pipeline.spec("data"), pipeline.cache_dir)
    print(source_report.summary())
    if settings.backend == "vllm" and not settings.top_k_logprobs and not settings.on_policy_ratio:
        # vLLM holds the target; loading it into transformers as well would only take memory
        model, tokenizer = None, AutoTokenizer.from_pretrained(model_dir)
        stop_ids = end_of_turn_ids(tokenizer, generation_config_of(model_dir))
    else:
        target = pipeline.target()
        model, tokenizer = target.model, target.tokenizer
        stop_ids = end_of_turn_ids(tokenizer, model.generation_config)
    drafter = None
    if settings.on_policy_ratio > 0:  # DistillSpec on-policy data: a drafter checkpoint answers a share of prompts
        drafter = load_drafter(Path(settings.on_policy_drafter), model, tokenizer)
    return generate(model, tokenizer, conversations, settings, out_dir, tracker, stop_ids,
                    worker=WorkerSettings(**pipeline.config.worker), model_dir=model_dir, drafter=drafter,
                    source=source_report.as_dict())


def generation_config_of(model_dir: Path) -> GenerationConfig | None:
    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: the tokenizer's eos is the only stop token
        return None


def run_pretrain(pipeline: Pipeline, out_dir: Path, tracker: Tracker) -> dict:
    if isinstance(pipeline.spec("drafter"), FeatureDrafterSpec):
        raise ValueError("a feature-level drafter (drafter=eagle/fspad) has no pretraining stage: "
                         "run stages=[data_gen,distill]")
    target, settings = pipeline.target(), pipeline.spec("pretrain")
    conversations, corpus_report = load_conversations(pipeline.spec("corpus"), pipeline.cache_dir)
    needed, documents, tokens = settings.steps * settings.batch_size * settings.seq_len, [], 0
    tokenizer = target.tokenizer
    for conversation in conversations[: settings.max_documents]:
        if conversation.messages[0]["role"] == "text":  # corpus.format=text: raw text, then end-of-sequence
            ids = tokenizer(conversation.messages[0]["content"], add_special_tokens=False)["input_ids"]
            ids = (ids + [tokenizer.eos_token_id])[: 4 * settings.seq_len]
        else:
            ids = chat_token_ids(tokenizer, conversation.messages)[: 4 * settings.seq_len]
        documents.append(ids)  # capped: many short documents beat a few very long ones
        tokens += len(ids)
        if tokens >= needed:  # tokenize only what the step budget will read
            break
    drafter = build_drafter(pipeline.spec("drafter"), target.model, target.tokenizer, token_lists=documents)
    summary = pretrain(drafter, target.tokenizer, documents, settings, out_dir, tracker,
                       deepspeed=pipeline.spec("deepspeed"), resume=pipeline.config.resume)
    return summary | {"documents": len(documents), "corpus": corpus_report.as_dict()}


def run_distill(pipeline: Pipeline, out_dir: Path, tracker: Tracker) -> dict:
    target = pipeline.target()
    data = pipeline.stage_output("data_gen")
    if data is None:
        raise FileNotFoundError(f"distill needs the data_gen output in {pipeline.run_dir / 'data_gen'}; "
                                f"add data_gen to stages (stages=[data_gen,distill])")
    settings, pretrained = pipeline.spec("distill"), pipeline.stage_output("pretrain")
    drafter_spec = pipeline.spec("drafter")
    if isinstance(drafter_spec, FeatureDrafterSpec):  # EAGLE / FSPAD: trained on the target's features
        loss = pipeline.spec("loss")
        if not isinstance(loss, FeatureLoss):
            raise ValueError(f"drafter={drafter_spec.name} is feature-level: choose loss=eagle or loss=fspad")
        drafter = build_feature_drafter(drafter_spec, target.model)
        return distill_features(drafter, target.model, target.tokenizer, data, loss, settings, out_dir, tracker)
    if settings.init_from or pretrained:
        start = Path(settings.init_from) if settings.init_from else pretrained / "model"
        drafter = load_drafter(start, target.model, target.tokenizer)
    else:
        answers = load_records(data).select_columns(["response_ids"])["response_ids"]
        start, drafter = "fresh", build_drafter(pipeline.spec("drafter"), target.model, target.tokenizer,
                                                token_lists=answers)
    stop_ids = end_of_turn_ids(target.tokenizer, target.model.generation_config)
    summary = distill(drafter, target.model, target.tokenizer, data, pipeline.spec("loss"), settings,
                      out_dir, tracker, deepspeed=pipeline.spec("deepspeed"), resume=pipeline.config.resume,
                      stop_ids=stop_ids)
    return summary | {"init_from": str(start)}


def load_any_drafter(path: Path, target: LoadedModel):
    """A saved drafter of either kind: token-level (a transformers folder) or feature-level (feature_drafter.json)."""
    if (path / FEATURE_CONFIG_FILE).exists():
        return load_feature_drafter(path, target.model)
    return load_drafter(path, target.model, target.tokenizer)


def drafter_parameters(drafter, target: LoadedModel) -> int:
    """Parameters read per drafting step: the drafter's own, plus the target's head for a feature-level drafter."""
    own = sum(p.numel() for p in drafter.parameters())
    if isinstance(drafter, FeatureDrafter):
        own += target.model.get_output_embeddings().weight.numel()
    return own


def run_eval(pipeline: Pipeline, out_dir: Path, tracker: Tracker) -> dict:
    target, settings = pipeline.target(), pipeline.spec("eval")
    conversations, _ = load_conversations(pipeline.spec("eval_data"), pipeline.cache_dir)
    prompts = []
    for conversation in conversations:
        system, turns = conversation.user_turns()
        prompts.append(EvalPrompt(conversation.id, conversation.category, system, turns))
    trained_on = pipeline.stage_output("data_gen")
    if trained_on is not None:  # held-out check: an eval prompt seen in training inflates acceptance
        records = load_records(trained_on).select_columns(["source", "conversation_id"])
        seen = set(zip(records["source"], records["conversation_id"]))
        overlap = sorted(c.id for c in conversations if (c.source, c.id) in seen)
        if overlap:
            raise ValueError(f"{len(overlap)} eval prompts are in this run's training data ({overlap[:5]}); "
                             f"choose another eval_data slice (eval_data.offset) so results stay held out")
    drafters, paths = {}, {}
    if settings.include_untrained:
        spec = pipeline.spec("drafter")
        drafters["untrained"] = (build_feature_drafter(spec, target.model) if isinstance(spec, FeatureDrafterSpec)
                                 else build_drafter(spec, target.model, target.tokenizer)).eval()
        paths["untrained"] = "built from conf/drafter (no training)"
    candidates = {name: pipeline.stage_output(stage) for name, stage in (("pretrained", "pretrain"),
                                                                         ("distilled", "distill"))}
    candidates = {name: path / "model" for name, path in candidates.items() if path is not None}
    candidates |= {name: Path(path) for name, path in settings.drafters.items()}
    for name, path in candidates.items():
        drafters[name] = load_any_drafter(path, target)
        paths[name] = str(path)
    parameters = {"target": sum(p.numel() for p in target.model.parameters())}
    parameters |= {name: drafter_parameters(d, target) for name, d in drafters.items()}
    stop_ids = end_of_turn_ids(target.tokenizer, target.model.generation_config)
    report = evaluate(target.model, target.tokenizer, {n: draft_for(d, target.model) for n, d in drafters.items()},
                      prompts, stop_ids, settings, out_dir, tracker,
                      encode=lambda messages: prompt_token_ids(target.tokenizer, messages), parameters=parameters)
    report["drafter_paths"] = paths
    report["parameters"] = parameters
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(report["table_markdown"])
    return {name: {k: m[k] for k in ("block_efficiency", "acceptance_rate", "mbsu", "speedup_median", "lossless")}
            for name, m in report["drafters"].items()} | {"best": report["best"], "num_prompts": len(prompts),
                                                          "num_turns": report["num_turns"]}


def run_export(pipeline: Pipeline, out_dir: Path, tracker: Tracker) -> dict:
    settings = pipeline.spec("export")
    evaluated = pipeline.stage_output("eval")
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
    target_dir, identity = resolve_model_dir(pipeline.spec("target"), pipeline.cache_dir)
    card_report = None
    if report is not None and choice in report["drafters"]:
        card_report = report | {"table_markdown": report["table_markdown"]}
    reproduce = (f"python train/run.py +experiment={pipeline.config.experiment} "
                 f"run_name={pipeline.config.run_name}")
    card = model_card(settings.name, identity.as_dict(), parameters_in(drafter_dir), parameters_in(target_dir),
                      card_report, f"{choice} ({drafter_dir})", reproduce)
    exported = export_drafter(drafter_dir, out_dir / settings.name, card)
    return {"exported": str(pipeline.run_dir / "export" / settings.name), "drafter": choice,
            "files": sorted(p.name for p in exported.iterdir())}


def parameters_in(model_dir: Path) -> int:
    """Parameter count from the safetensors header alone (tied weights are stored once)."""
    with safe_open(str(model_dir / "model.safetensors"), "pt") as weights:
        return sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())


def preflight(pipeline: Pipeline, stages: list[str]) -> float:
    """Seconds-long checks on a tiny model of the target's architecture that `stages` can run (train/preflight.py)."""
    target = pipeline.spec("target")
    model_dir, _ = resolve_model_dir(target, pipeline.cache_dir)
    data_gen = pipeline.spec("data_gen")
    return check_stages(stages, AutoConfig.from_pretrained(model_dir, trust_remote_code=target.trust_remote_code),
                        data_gen_backend=data_gen.backend, data_gen_cache=data_gen.cache,
                        feature_level=isinstance(pipeline.spec("drafter"), FeatureDrafterSpec),
                        deepspeed=pipeline.spec("deepspeed").enabled)


RUNNERS = {"data_gen": run_data_gen, "pretrain": run_pretrain, "distill": run_distill, "eval": run_eval,
           "export": run_export}


def say(message: str) -> None:
    """Print once per launch (rank 0 of a torchrun/deepspeed launch)."""
    if distributed.is_main():
        print(message, flush=True)


def run(config: DictConfig) -> dict[str, Path]:
    """Run `config.stages` in order; returns each stage's output directory."""
    check_versions()
    unknown = [s for s in config.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"stages={list(config.stages)}: unknown {unknown}; choose from {list(STAGES)}")
    stages = sorted(config.stages, key=STAGES.index)
    if distributed.world_size() > 1:
        outside = [s for s in stages if s not in DISTRIBUTED_STAGES]
        if outside:
            raise ValueError(f"{distributed.world_size()} processes were launched, but stages {outside} run in one "
                             f"process: run them first without torchrun, then launch stages={list(DISTRIBUTED_STAGES)}")
        distributed.init()
    run_dir = Path(config.runs_root) / config.experiment / config.run_name
    resolved = OmegaConf.to_container(config, resolve=True)
    pipeline = Pipeline(config=config, run_dir=run_dir, cache_dir=Path(config.cache_dir), resolved=resolved)
    logger_settings = pipeline.spec("logger")
    outputs, checked = {}, not config.preflight
    for index, stage in enumerate(stages):
        stage_dir = StageDir(run_dir, stage)
        settings = {section: resolved[section] for section in STAGE_SECTIONS[stage]}
        settings["inputs"] = {name: (StageDir(run_dir, name).meta() or {}).get("fingerprint")
                              for name in STAGE_INPUTS[stage]}
        if stage_dir.check_reusable(settings, bool(config.overwrite)):
            say(f"[draftsmith] {stage}: complete output in {stage_dir.final} made with these settings, skipped")
            outputs[stage] = stage_dir.final
            continue
        if not checked:  # before the first stage that does work: can every stage still to come run here?
            seconds = preflight(pipeline, stages[index:])
            say(f"[draftsmith] preflight: {', '.join(stages[index:])} can run here (checked in {seconds:.1f} s)")
            checked = True
        say(f"[draftsmith] {stage}: running into {stage_dir.final}")
        if distributed.is_main():
            stage_dir.begin(settings)
        distributed.barrier()
        out_dir = stage_dir.partial
        tracker = Tracker(logger_settings if distributed.is_main() else LoggerSettings(backend="none"), run_dir,
                          stage, resolved)
        try:
            summary = RUNNERS[stage](pipeline, out_dir, tracker)
        except ShardsPending as pending:  # other data_gen workers still at work, or a dry run: stop here
            tracker.finish({})
            print(f"[draftsmith] {stage}: not complete: {pending}", flush=True)
            return outputs
        tracker.finish({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        _, identity = resolve_model_dir(pipeline.spec("target"), pipeline.cache_dir)
        if distributed.is_main():
            stage_dir.commit(settings, resolved, identity.as_dict(), summary)
        distributed.barrier()
        outputs[stage] = stage_dir.final
        printable = {k: v for k, v in summary.items() if not isinstance(v, dict)}
        say(f"[draftsmith] {stage}: done -> {outputs[stage]}\n  {json.dumps(printable, default=str)}")
    return outputs


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(config: DictConfig) -> None:
    run(config)


if __name__ == "__main__":
    main()
