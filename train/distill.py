"""Stage `distill`: fine-tune the drafter towards the frozen target on target-generated answers.

    python train/run.py +experiment=standalone stages=[distill] loss=tvdpp
    torchrun --nproc_per_node 2 train/run.py +experiment=standalone stages=[distill] deepspeed=zero2
    python train/run.py +experiment=smoke stages=[data_gen,distill] drafter=fspad loss=fspad

One loop for every drafter kind; what differs is the objective: `TokenObjective` below (a causal LM's logits) or
`train.core.features.FeatureObjective` (EAGLE/FSPAD, the target's features), each with its forward, loss,
acceptance proxy and saved format.

Setup: the data_gen records are split into training rows and a few held-out ones; the drafter (optionally with
LoRA adapters) goes into an engine (plain PyTorch, or DeepSpeed ZeRO 0-3); training resumes from the newest
checkpoint of an interrupted run. Loop: each optimizer step takes `batch_size` rows (length-grouped), split into
micro-batches over ranks and accumulation steps; the teacher signal is the frozen target's logits (`online`) or
the top-k log-probabilities data_gen stored (`offline`); with `on_policy.ratio` = λ a share of steps replaces the
stored answers by the drafter's own samples (DistillSpec/GKD), which the target then scores. The loss
(`conf/loss/`, any weighted mix of `losses/`) is taken only where the next token belongs to an answer. Every
`eval_every` steps the acceptance proxy, mean Σ min(p, q) over held-out answer positions (the expected
acceptance of a drafted token, METHODS.md §1), decides the best checkpoint. Save: `model/` is the selected
drafter (best by proxy, or the last), `last/` the final weights, `curve.jsonl` the per-step losses.
"""
from __future__ import annotations

import json
import random
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from data_gen.backends import HFBackend, Request
from data_gen.chat import end_of_turn_ids
from data_gen.shards import load_records
from data_gen.sources import PromptSourceSpec
from infra import distributed, preemption
from infra.settings import at_least, between, check_fields, one_of
from infra.stage import StageRun
from infra.tracking import Tracker
from losses.feature import FeatureLoss
from losses.mix import LossMix
from models.drafter import DrafterSpec, LoraSettings, apply_lora
from models.feature_drafter import FeatureDrafterSpec
from models.kinds import kind_of, kind_of_spec
from models.sampling import SamplingSettings, as_sampling, request_seed
from train.core import checkpoint
from train.core.engine import DeepSpeedSettings, build_engine, micro_batches, save_weights
from train.core.objectives import objective_for
from train.core.optim import OptimSettings
from train.core.rows import Row, corpus_rows, count_steps, distill_rows, epoch_batches

TEACHERS = ("online", "offline")
SELECTIONS = ("proxy", "decoder", "last")
TRAIN_ON = ("answers", "all")


@dataclass(frozen=True)
class OnPolicySettings:
    """λ = `ratio` of optimizer steps train on the drafter's own answers to the records' prompts (0 = never)."""
    SECTION: ClassVar[str] = "distill.on_policy"
    ratio: float = 0.0
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(temperature=1.0))
    max_new_tokens: int = 64

    LIMITS: ClassVar[dict] = {"ratio": between(0, 1), "max_new_tokens": at_least(1)}

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampling", as_sampling(self.sampling))
        check_fields(self)


@dataclass(frozen=True)
class DistillSettings:
    SECTION: ClassVar[str] = "distill"
    epochs: int = 1
    max_steps: int | None = None      # stop earlier than `epochs` would
    batch_size: int = 8               # sequences per optimizer step, over all ranks and accumulation steps
    accumulation: int = 1             # micro-batches per optimizer step on each rank
    max_seq_len: int = 512
    teacher: str = "online"           # online: frozen target forward | offline: data_gen's top-k log-probs
    train_on: str = "answers"         # which next tokens are scored: the answers, or all (prompts too)
    feature_cache: bool = False       # feature drafters: the target's features computed once, stored (fp16)
    feature_cache_dir: str | None = None  # a folder runs share their feature caches in (default: the run's own)
    corpus_records: int = 0           # more training rows: this many conversations of `corpus`, every token scored
    on_policy: OnPolicySettings = field(default_factory=OnPolicySettings)
    log_every: int = 5
    checkpoint_every: int = 0         # full resumable state every N steps (0: none)
    keep_checkpoints: int = 2
    eval_every: int = 0               # acceptance proxy every N steps (0: only before and after training)
    heldout_records: int = 16         # records kept out of training for the proxy
    select: str = "proxy"             # which weights become model/: best proxy, best decoder τ, or the last
    select_gamma: int = 4             # select=decoder: draft length of the greedy speculative decoding run
    select_max_new_tokens: int = 32   # select=decoder: tokens decoded per held-out prompt
    seed: int = 0
    init_from: str | None = None      # drafter checkpoint to start from (default: this run's pretrain output)
    optim: OptimSettings = field(default_factory=OptimSettings)
    lora: LoraSettings | None = None  # train LoRA adapters instead of all weights (merged when saved)
    LIMITS: ClassVar[dict] = {
        "epochs": at_least(1), "max_steps": at_least(1, none_ok=True), "batch_size": at_least(1),
        "accumulation": at_least(1), "max_seq_len": at_least(2), "teacher": one_of(*TEACHERS),
        "train_on": one_of(*TRAIN_ON), "corpus_records": at_least(0), "log_every": at_least(1),
        "checkpoint_every": at_least(0), "keep_checkpoints": at_least(1), "eval_every": at_least(0),
        "heldout_records": at_least(1), "select": one_of(*SELECTIONS), "select_gamma": at_least(1),
        "select_max_new_tokens": at_least(1)}

    def __post_init__(self) -> None:
        check_fields(self)


def on_policy_rows(drafter: PreTrainedModel, rows: list[Row], settings: DistillSettings, step: int, pad_id: int,
                   stop_ids: list[int]) -> list[Row]:
    """The same prompts, answered by the drafter (seeded per record and step, so identical on every rank and
    after a resume); the target scores these answers in the loss."""
    backend = HFBackend(drafter, pad_id, stop_ids, settings.on_policy.sampling, settings.on_policy.max_new_tokens,
                        batch_size=len(rows), progress=False)
    requests = [Request(key=row.id, prompt_ids=row.prompt_ids,
                        seed=request_seed(settings.seed, f"{row.id}:on_policy:{step}")) for row in rows]
    was_training = drafter.training
    drafter.eval()
    completions = backend.generate(requests)
    drafter.train(was_training)
    return [Row(id=row.id, input_ids=row.prompt_ids + done.token_ids, prompt_ids=row.prompt_ids,
                loss_mask=[0] * len(row.prompt_ids) + [1] * len(done.token_ids))
            for row, done in zip(rows, completions)]


def decoder_block_efficiency(draft, target: PreTrainedModel, rows: list[Row], settings: DistillSettings,
                             stop_ids: list[int]) -> float:
    """τ (tokens per target forward) of greedy speculative decoding with `draft` (the decoder's view of the drafter,
    `models.kinds.DrafterKind.draft`) on the rows' prompts."""
    from eval.decoder import DecodeSettings, speculative_generate

    generations = speculative_generate(target, draft, [row.prompt_ids for row in rows],
                                       DecodeSettings(gamma=settings.select_gamma,
                                                      max_new_tokens=settings.select_max_new_tokens), stop_ids)
    return sum(g.stats.emitted for g in generations) / max(1, sum(g.stats.steps for g in generations))


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def distill(drafter: torch.nn.Module, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data_dir: Path,
            loss: LossMix | FeatureLoss, settings: DistillSettings, out_dir: Path, tracker: Tracker,
            deepspeed: DeepSpeedSettings = DeepSpeedSettings(), resume: str = "auto",
            stop_ids: list[int] | None = None, provenance: dict | None = None,
            extra_rows: list[Row] | None = None) -> dict:
    """Train `drafter` (any kind) against `target`; write `model/` (selected), `last/`, `curve.jsonl` and
    checkpoints (each with `provenance`)."""
    kind = kind_of(drafter)
    objective = objective_for(kind, target, tokenizer, loss, settings, data_dir)
    refused = objective.refused()
    if refused:
        raise ValueError(f"a {kind.name}-level drafter cannot train with " + "; ".join(refused))
    objective.prepare(drafter)
    world = distributed.world_size()
    if settings.batch_size % (world * settings.accumulation):
        raise ValueError(f"distill.batch_size={settings.batch_size} must divide by processes ({world}) × "
                         f"accumulation ({settings.accumulation})")
    if extra_rows and (settings.teacher == "offline" or settings.on_policy.ratio > 0):
        raise ValueError("distill.corpus_records > 0 adds corpus text without top-k log-probabilities or prompts to "
                         "answer: it needs distill.teacher=online and distill.on_policy.ratio=0")
    if (settings.on_policy.ratio > 0 or settings.select == "decoder") and not stop_ids:
        raise ValueError("distill.on_policy and distill.select=decoder need the target's end-of-turn ids (stop_ids)")
    if settings.select == "decoder" and deepspeed.enabled and deepspeed.stage == 3:
        raise ValueError("distill.select=decoder decodes with whole weights on each rank; ZeRO-3 partitions them: "
                         "use select=proxy, or ZeRO 0-2")
    torch.manual_seed(settings.seed + 7919 * distributed.rank())  # ranks draw independent noise, rank 0 as alone
    train_rows, heldout = distill_rows(data_dir, settings.teacher, settings.heldout_records, extra_rows or [])
    steps_per_epoch, total_steps = count_steps(train_rows, settings.batch_size, settings.epochs, settings.max_steps)
    preparing = time.perf_counter()
    objective.prepare_rows(train_rows + heldout, out_dir)  # e.g. the feature cache's one target prefill
    prepare_seconds = time.perf_counter() - preparing
    if settings.lora is not None:
        drafter = apply_lora(drafter, settings.lora, kind.lora_task)
    micro_batch = settings.batch_size // (world * settings.accumulation)
    engine = build_engine(drafter, settings.optim, total_steps, deepspeed, micro_batch, settings.accumulation,
                          forward=objective.forward_module(drafter))
    model, pad_id = engine.module, tokenizer.pad_token_id
    target.eval()
    target.requires_grad_(False)
    model.train()

    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints, curve_path = out_dir / "checkpoints", out_dir / "curve.jsonl"
    state = checkpoint.resume_or_clear(engine, checkpoints, curve_path, resume, "distill", total_steps)
    start_step, best, history = 0, {"proxy": float("-inf"), "score": float("-inf"), "step": None}, []
    scored_before = 0  # loss positions scored by earlier runs of this training (a resume continues the count)
    if state:
        start_step, best, history = state["step"], state["best"], state["proxy_history"]
        scored_before = state.get("loss_tokens", 0)
    elif distributed.is_main():
        shutil.rmtree(out_dir / "best", ignore_errors=True)

    evaluating = [0.0]  # seconds spent on held-out evaluations (and saving the best), not training

    def evaluate_proxy(step: int, scored: int) -> None:
        began = time.perf_counter()
        model.eval()
        proxy = objective.proxy(model, heldout, micro_batch or 1)
        entry, score = {"step": step, "loss_tokens": scored, "proxy": round(proxy, 6)}, proxy
        if settings.select == "decoder":  # what serving will see: τ of the lossless decoder on held-out prompts
            score = decoder_block_efficiency(objective.draft(model), target, heldout, settings, stop_ids)
            entry["block_efficiency"] = round(score, 6)
            tracker.log({"distill/block_efficiency": score}, step=step)
        model.train()
        history.append(entry)
        tracker.log({"distill/acceptance_proxy": proxy}, step=step)
        if score > best.get("score", best["proxy"]):
            best.update(proxy=proxy, score=score, step=step)
            if settings.select != "last":
                save_weights(engine, out_dir / "best", objective.save)
        evaluating[0] += time.perf_counter() - began

    if start_step == 0:
        evaluate_proxy(0, 0)  # the starting drafter is a candidate too: training may not improve acceptance
    batches: dict[int, list[list[int]]] = {}
    started, tokens, loss_tokens, losses = time.perf_counter(), 0, 0, {}
    evaluating[0] = 0.0  # from here on, within the training clock
    progress = tqdm(total=total_steps, initial=start_step, desc=f"distill ({kind.name})", unit="step",
                    disable=not distributed.is_main())
    for step in range(start_step, total_steps):
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in batches:
            batches = {epoch: epoch_batches(train_rows, settings.batch_size, settings.seed, epoch,
                                            settings.max_seq_len)}
        batch = [train_rows[i] for i in batches[epoch][index]]
        on_policy = random.Random(f"{settings.seed}:on_policy:{step}").random() < settings.on_policy.ratio
        if on_policy:
            batch = on_policy_rows(model, batch, settings, step, pad_id, stop_ids)
        every_position = settings.train_on == "all" and not on_policy  # an answer of the drafter's own: answers
        step_positions = sum(row.loss_positions(settings.max_seq_len, objective.ahead, every_position)
                             for row in batch)
        sums = {"loss": 0.0}
        for micro in micro_batches(batch, settings.accumulation):
            total, parts, kept, read = objective.micro_loss(engine, micro, on_policy)
            share = kept / max(step_positions, 1)
            if not torch.isfinite(total):
                raise FloatingPointError(f"distill step {step} (epoch {epoch}, records "
                                         f"{[row.id for row in micro][:4]}...): loss is {total.item()}; lower "
                                         f"distill.optim.lr or check the data in {data_dir}")
            engine.backward(total * share)
            sums["loss"] += total.item() * share
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + value.item() * share
            tokens += read
        grad_norm = engine.step()
        names = sorted(sums)
        *summed, tokens_all = distributed.all_sum([sums[name] for name in names] + [tokens])  # one collective
        losses = dict(zip(names, summed))
        loss_tokens += step_positions
        progress.update(1)
        progress.set_postfix(loss=f"{losses['loss']:.4f}")
        if distributed.is_main():
            with curve_path.open("a") as curve:
                curve.write(json.dumps({"step": step, "on_policy": on_policy, "grad_norm": grad_norm, **losses}) + "\n")
        if step % settings.log_every == 0 or step == total_steps - 1:
            elapsed = time.perf_counter() - started
            tracker.log({**{f"distill/{'loss' if k == 'loss' else 'loss_' + k}": v for k, v in losses.items()},
                         "distill/lr": engine.lr, "distill/grad_norm": grad_norm, "distill/epoch": epoch,
                         "distill/on_policy": float(on_policy), "distill/tokens_per_s": tokens_all / elapsed,
                         "distill/loss_tokens_per_s": loss_tokens / elapsed,
                         "distill/peak_memory_mib": peak_memory_mib()}, step=step)
        done = step + 1
        if done == total_steps or (settings.eval_every and done % settings.eval_every == 0):
            evaluate_proxy(done, scored_before + loss_tokens)
        stopping = done < total_steps and preemption.requested()
        if stopping or (settings.checkpoint_every and done % settings.checkpoint_every == 0 and done < total_steps):
            saved = checkpoint.save(engine, checkpoints, done, {"best": best, "proxy_history": history,
                                                                "loss_tokens": scored_before + loss_tokens,
                                                                "data_position": {"epoch": epoch, "batch": index + 1}},
                                    settings.keep_checkpoints, provenance)
        if stopping:
            raise preemption.Preempted(f"distill stopped after step {done} of {total_steps} on the warning "
                                       f"signal; resumes from {saved}")
    progress.close()
    model.eval()
    save_weights(engine, out_dir / "last", objective.save)
    if distributed.is_main():
        shutil.rmtree(out_dir / "model", ignore_errors=True)
        chosen = out_dir / ("last" if settings.select == "last" else "best")
        shutil.copytree(chosen, out_dir / "model")
    distributed.barrier()
    elapsed = time.perf_counter() - started
    summary = {"steps": total_steps, "resumed_at": start_step, "epochs": settings.epochs, "records": len(train_rows),
               "heldout_records": len(heldout), "final_loss": round(losses.get("loss", float("nan")), 4),
               **objective.summary(model), "selected": settings.select,
               "best_step": best["step"], "best_acceptance_proxy": round(best["proxy"], 4),
               **({"best_block_efficiency": round(best["score"], 4)} if settings.select == "decoder" else {}),
               "acceptance_proxy": history, "loss_tokens_this_run": loss_tokens, "seconds": round(elapsed, 1),
               "evaluation_seconds": round(evaluating[0], 1),  # of `seconds`: held-out checks, not training
               "prepare_seconds": round(prepare_seconds, 1),
               "loss_tokens_per_s": round(loss_tokens / max(elapsed, 1e-9)), "processes": world,
               "lora": settings.lora is not None, "deepspeed_stage": deepspeed.stage if deepspeed.enabled else None}
    engine.close()
    return summary


def run_stage(run: StageRun, settings: DistillSettings, drafter: DrafterSpec | FeatureDrafterSpec,
              loss: LossMix | FeatureLoss, deepspeed: DeepSpeedSettings, corpus: PromptSourceSpec) -> dict:
    """Stage `distill`: the drafter (`init_from`, this run's pretrain output, or a fresh one) trained towards the
    target on this run's data_gen records (and `distill.corpus_records` conversations of `corpus`), into
    `run.out_dir`."""
    target, kind = run.target(), kind_of_spec(drafter)
    data = run.require("data_gen")
    extra, corpus_report = [], None
    if settings.corpus_records:
        extra, corpus_report = corpus_rows(target.tokenizer, corpus, run.cache_dir, settings.corpus_records,
                                           settings.max_seq_len)
    pretrained = run.output("pretrain") if kind.pretrainable else None
    if settings.init_from or pretrained:
        start = Path(settings.init_from) if settings.init_from else pretrained / "model"
        model = kind.load(start, target)
    else:
        answers = load_records(data).select_columns(["response_ids"])["response_ids"]
        token_lists = list(answers) + [row.input_ids for row in extra]  # what a draft vocabulary is counted on
        start, model = "fresh", kind.build(drafter, target, token_lists=token_lists)
    stop_ids = end_of_turn_ids(target.tokenizer, target.model.generation_config)
    summary = distill(model, target.model, target.tokenizer, data, loss, settings, run.out_dir, run.tracker,
                      deepspeed=deepspeed, resume=run.resume, stop_ids=stop_ids, provenance=run.provenance,
                      extra_rows=extra)
    return summary | {"init_from": str(start), "corpus_records": len(extra),
                      **({"corpus": corpus_report} if corpus_report else {})}
