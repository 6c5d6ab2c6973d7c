"""Stage `data_gen`: the target (or, on-policy, the drafter) answers real prompts; we keep every token it made.

    python train/run.py +experiment=quickstart stages=[data_gen]
    python train/run.py +experiment=quickstart stages=[data_gen] data_gen.dry_run=true data.limit=null  # plan only

1. Plan: conversations -> jobs (one per conversation and sample), rendered with the target's chat template.
   Over-long prompts are dropped or truncated, duplicate prompts removed, every skip counted. The estimated disk
   use is printed, and the run refuses to start when the disk cannot hold it.
2. Generate shard by shard (worker `rank` of `world_size` takes shards rank, rank+world_size, ...): with
   `turns=all` each assistant turn is regenerated in order, conditioned on the target's own earlier answers;
   `turns=last` answers the last user turn after the original history; `turns=first` the first user turn.
   Every request has a seed derived from the run seed and its id, so the records do not depend on batching,
   sharding or restarts. Optionally the target's top-k log-probabilities of each answer token are stored.
3. Each shard is committed atomically (data_gen/shards.py); a rerun after a crash redoes only missing shards.
   When all shards exist, `manifest.json`, `report.json` and `response_lengths.png` are written.
"""
from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from data_gen.backends import BACKENDS, Completion, HFBackend, Request, VLLMBackend
from data_gen.chat import assistant_token_mask, end_of_turn_ids, prompt_token_ids
from data_gen.shards import MANIFEST, complete_shards, read_shard, shard_path, write_shard
from data_gen.sources import Conversation, PromptSourceSpec, load_conversations
from infra import preemption
from infra.rundir import NotEnoughSpace, RunLocked, exclusive, human_bytes
from infra.settings import at_least, between, check_fields, one_of
from infra.stage import StageRun
from infra.tracking import Tracker
from models.assets import sha256_file
from models.drafter import load_drafter
from models.loading import TargetSpec, load_tokenizer, resolve_model_dir
from models.sampling import SamplingSettings, as_sampling, request_seed

TURN_MODES = ("first", "last", "all")
OVERLONG = ("drop", "truncate")
BYTES_PER_TOKEN = 4 + 4 + 1  # input_ids, prompt_ids/response_ids (int32 each), loss_mask (int8)
TOPK_BYTES = 4 + 2          # id int32 + log-probability fp16, per stored candidate
RECORD_OVERHEAD = 256       # ids, names, flags, sampling struct, list offsets (measured ~150 B on ShareGPT)
SHARD_OVERHEAD = 16 * 1024  # Arrow IPC schema, metadata, footer and 64-byte buffer alignment


@dataclass(frozen=True)
class GenerationSettings:
    SECTION: ClassVar[str] = "data_gen"
    backend: str = "hf"
    turns: str = "first"
    max_new_tokens: int = 256
    max_prompt_tokens: int = 512
    overlong_prompt: str = "drop"
    drop_empty: bool = True
    batch_size: int = 8
    cache: str = "dynamic"
    sampling: SamplingSettings = field(default_factory=SamplingSettings)  # greedy by default
    samples_per_prompt: int = 1
    seed: int = 0
    top_k_logprobs: int = 0
    on_policy_drafter: str | None = None
    on_policy_ratio: float = 0.0
    shard_size: int = 256
    vllm: dict = field(default_factory=dict)
    dry_run: bool = False
    disk_headroom: float = 0.05

    LIMITS: ClassVar[dict] = {
        "backend": one_of(*BACKENDS), "turns": one_of(*TURN_MODES), "overlong_prompt": one_of(*OVERLONG),
        "max_new_tokens": at_least(1), "max_prompt_tokens": at_least(1), "batch_size": at_least(1),
        "cache": one_of("dynamic", "static"), "samples_per_prompt": at_least(1), "top_k_logprobs": at_least(0),
        "on_policy_ratio": between(0, 1), "shard_size": at_least(1), "disk_headroom": between(0, 1)}

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampling", as_sampling(self.sampling))
        check_fields(self)
        if self.samples_per_prompt > 1 and self.sampling.greedy:
            raise ValueError(f"data_gen.samples_per_prompt={self.samples_per_prompt} with temperature=0 gives "
                             f"identical copies; set data_gen.sampling.temperature > 0")
        if not 0 <= self.on_policy_ratio <= 1:
            raise ValueError(f"data_gen.on_policy_ratio={self.on_policy_ratio} must be in [0, 1]")
        if self.on_policy_ratio > 0 and not self.on_policy_drafter:
            raise ValueError("data_gen.on_policy_ratio > 0 needs data_gen.on_policy_drafter=/path/to/drafter")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError("data_gen.shard_size and data_gen.batch_size must be >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"data_gen.max_new_tokens={self.max_new_tokens} must be >= 1")


@dataclass(frozen=True)
class WorkerSettings:
    """Which slice of the shards this process makes. Not part of the stage's fingerprint: all workers of one
    run share an output folder. Defaults come from SLURM array variables (conf/config.yaml)."""

    SECTION: ClassVar[str] = "worker"
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        check_fields(self)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"worker.rank={self.rank} must be in [0, worker.world_size={self.world_size})")


class ShardsPending(RuntimeError):
    """This worker finished its shards but others are still missing; the stage is not complete yet."""


@dataclass
class Job:
    order: int
    key: str
    conversation: Conversation
    sample: int
    context: list[dict]      # messages before the first turn to generate (system prompt, original history)
    user_turns: list[dict]   # the user messages to answer, in order
    generator: str
    first_prompt_len: int


@dataclass
class Plan:
    jobs: list[Job]
    skipped: Counter
    flagged: Counter


def turn_layout(conversation: Conversation, mode: str) -> tuple[list[dict], list[dict]]:
    """(context, user turns to answer) for one conversation under turns=first|last|all."""
    messages = conversation.messages
    user_indices = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if mode == "first":
        return messages[: user_indices[0]], [messages[user_indices[0]]]
    if mode == "last":
        return messages[: user_indices[-1]], [messages[user_indices[-1]]]
    return messages[: user_indices[0]], [messages[i] for i in user_indices]


def fit_prompt(tokenizer: PreTrainedTokenizerBase, context: list[dict], user: dict,
               max_tokens: int) -> tuple[dict | None, list[int]]:
    """Shorten the user message's text until the rendered prompt fits; (None, ids) if it cannot."""
    ids = prompt_token_ids(tokenizer, context + [user])
    content_ids = tokenizer(user["content"], add_special_tokens=False)["input_ids"]
    while len(ids) > max_tokens:
        keep = len(content_ids) - (len(ids) - max_tokens)
        if keep < 1:
            return None, ids
        content_ids = content_ids[:keep]
        user = {**user, "content": tokenizer.decode(content_ids)}
        ids = prompt_token_ids(tokenizer, context + [user])
    return user, ids


def make_plan(tokenizer: PreTrainedTokenizerBase, conversations: list[Conversation],
              settings: GenerationSettings) -> Plan:
    skipped, flagged, jobs, seen = Counter(), Counter(), [], set()
    for conversation in tqdm(conversations, desc="data_gen plan", unit="conv", disable=len(conversations) < 2000):
        context, user_turns = turn_layout(conversation, settings.turns)
        ids = prompt_token_ids(tokenizer, context + user_turns[:1])
        if len(ids) > settings.max_prompt_tokens:
            if settings.overlong_prompt == "drop":
                skipped[f"prompt longer than max_prompt_tokens={settings.max_prompt_tokens}"] += 1
                continue
            shortened, ids = fit_prompt(tokenizer, context, user_turns[0], settings.max_prompt_tokens)
            if shortened is None:
                skipped[f"prompt over max_prompt_tokens={settings.max_prompt_tokens} even with the user "
                        f"message cut (system prompt or history too long)"] += 1
                continue
            user_turns = [shortened] + user_turns[1:]
            flagged["prompt truncated to max_prompt_tokens"] += 1
        dedupe_key = json.dumps(context + user_turns if settings.turns == "all" else ids)
        if dedupe_key in seen:
            skipped["duplicate prompt"] += 1
            continue
        seen.add(dedupe_key)
        for sample in range(settings.samples_per_prompt):
            key = f"{conversation.source}/{conversation.id}/{sample}"
            draw = request_seed(settings.seed, f"{key}/policy") / 2 ** 63
            generator = "drafter" if draw < settings.on_policy_ratio else "target"
            jobs.append(Job(order=len(jobs), key=key, conversation=conversation, sample=sample, context=context,
                            user_turns=user_turns, generator=generator, first_prompt_len=len(ids)))
    return Plan(jobs=jobs, skipped=skipped, flagged=flagged)


def estimated_bytes(plan: Plan, settings: GenerationSettings, provenance_bytes: int = 0) -> int:
    """Upper bound on the records' size: every turn runs to max_new_tokens; prompts of later turns to the cap. Each
    shard also carries the run's provenance (`provenance_bytes` of JSON: the resolved config grows with every
    config section) twice, in the schema at its start and again in its footer."""
    shards = -(-len(plan.jobs) // settings.shard_size)
    total = shards * (SHARD_OVERHEAD + 2 * provenance_bytes) + len(plan.jobs) * RECORD_OVERHEAD
    for job in plan.jobs:
        turns = len(job.user_turns)
        tokens = (settings.max_prompt_tokens if turns > 1 else job.first_prompt_len) + settings.max_new_tokens
        total += tokens * BYTES_PER_TOKEN + turns * settings.max_new_tokens * settings.top_k_logprobs * TOPK_BYTES
    return total


def check_disk(out_dir: Path, needed: int, headroom: float) -> str:
    free = shutil.disk_usage(out_dir).free
    line = (f"estimated disk use: {human_bytes(needed)} (upper bound: every answer at max_new_tokens); "
            f"free on {out_dir}: {human_bytes(free)}")
    if needed > free * (1 - headroom):
        raise NotEnoughSpace(f"{line}. Not enough space: free some, lower data.limit / max_new_tokens / "
                      f"top_k_logprobs, or write elsewhere (runs_root=...)")
    return line


@torch.inference_mode()
def target_topk(model: PreTrainedModel, records: list[dict], k: int, batch_size: int) -> None:
    """Add `topk_ids` / `topk_logprobs` ([n_masked, k]: int32 / fp16) to each record: the target's top-k
    log-probabilities (temperature 1) at every loss-masked position, from one teacher-forced forward."""
    body, head = model.get_decoder(), model.get_output_embeddings()
    order = sorted(range(len(records)), key=lambda i: len(records[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        batch = [records[i] for i in order[start: start + batch_size]]
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        attention = torch.zeros_like(ids)
        for row, record in enumerate(batch):
            ids[row, : len(record["input_ids"])] = torch.tensor(record["input_ids"])
            attention[row, : len(record["input_ids"])] = 1
        hidden = body(input_ids=ids.to(model.device), attention_mask=attention.to(model.device)).last_hidden_state
        for row, record in enumerate(batch):
            targets = torch.tensor(record["loss_mask"][1:]).nonzero().squeeze(-1)  # position t predicts t+1
            values, indices = [], []
            for chunk in targets.split(512):
                logprobs = torch.log_softmax(head(hidden[row, chunk.to(model.device)]).float(), dim=-1)
                top = torch.topk(logprobs, k, dim=-1)
                values.append(top.values.cpu())
                indices.append(top.indices.cpu())
            record["topk_logprobs"] = torch.cat(values).numpy().astype(np.float16) if values else np.zeros((0, k))
            record["topk_ids"] = torch.cat(indices).numpy().astype(np.int32) if indices else np.zeros((0, k))


def decode_answer(tokenizer: PreTrainedTokenizerBase, completion: Completion) -> str:
    tokens = completion.token_ids[:-1] if completion.finish_reason == "stop" else completion.token_ids
    return tokenizer.decode(tokens)


def run_shard(jobs: list[Job], tokenizer: PreTrainedTokenizerBase, backends: dict, stop_ids: list[int],
              settings: GenerationSettings) -> tuple[list[dict], dict]:
    """Generate every turn of every job in the shard; returns its records and its own accounting."""
    started, skipped, flagged, generated = time.perf_counter(), Counter(), Counter(), 0
    contexts = {job.key: list(job.context) for job in jobs}
    turns: dict[str, list[tuple[list[int], Completion]]] = {job.key: [] for job in jobs}
    live = list(jobs)
    for turn in range(max(len(job.user_turns) for job in jobs)):
        requests: dict[str, list[tuple[Job, Request]]] = {"target": [], "drafter": []}
        for job in live:
            if turn >= len(job.user_turns):
                continue
            messages = contexts[job.key] + [job.user_turns[turn]]
            ids = prompt_token_ids(tokenizer, messages)
            if turn > 0 and len(ids) > settings.max_prompt_tokens:
                flagged[f"later turns cut: prompt over max_prompt_tokens={settings.max_prompt_tokens}"] += 1
                continue
            contexts[job.key] = messages
            requests[job.generator].append((job, Request(job.key, ids, request_seed(settings.seed,
                                                                                     f"{job.key}/turn{turn}"))))
        answered = []
        for generator, pending in requests.items():
            if not pending:
                continue
            completions = backends[generator].generate([r for _, r in pending], desc=f"turn {turn + 1} ({generator})")
            for (job, request), completion in zip(pending, completions):
                generated += len(completion.token_ids)
                turns[job.key].append((request.prompt_ids, completion))
                contexts[job.key] = contexts[job.key] + [{"role": "assistant",
                                                          "content": decode_answer(tokenizer, completion)}]
                answered.append(job)
        live = answered
    records = []
    for job in jobs:
        prompt_ids, last = turns[job.key][-1]
        flags = []
        if last.finish_reason == "length":
            flags.append("hit_max_new_tokens")
        if any(c.finish_reason == "length" for _, c in turns[job.key][:-1]):
            flags.append("earlier_turn_hit_max_new_tokens")
        if len(turns[job.key]) < len(job.user_turns):
            flags.append("turns_cut_at_max_prompt_tokens")
        if last.finish_reason == "stop" and len(last.token_ids) <= 1:
            if settings.drop_empty:
                skipped["empty response"] += 1
                continue
            flags.append("empty_response")
        prompt_mask = [0] * len(prompt_ids)
        if settings.turns == "all" and len(turns[job.key]) > 1:  # earlier answers are the target's own tokens
            history = contexts[job.key][:-1]
            rendered, prompt_mask = assistant_token_mask(tokenizer, history, stop_ids, add_generation_prompt=True)
            if rendered != prompt_ids:
                raise RuntimeError(f"{job.key}: re-rendering the conversation changed the prompt tokens")
        for flag in flags:
            flagged[flag] += 1
        records.append({
            "id": job.key, "source": job.conversation.source, "conversation_id": job.conversation.id,
            "category": job.conversation.category, "sample": job.sample, "order": job.order,
            "generator": job.generator, "turns": len(turns[job.key]), "prompt_ids": prompt_ids,
            "response_ids": last.token_ids, "input_ids": prompt_ids + last.token_ids,
            "loss_mask": prompt_mask + [1] * len(last.token_ids), "finish_reason": last.finish_reason,
            "flags": flags, "sampling": settings.sampling.as_dict() | {
                "max_new_tokens": settings.max_new_tokens, "seed": request_seed(settings.seed, f"{job.key}/turn{len(turns[job.key]) - 1}")},
        })
    stats = {"jobs": len(jobs), "records": len(records), "skipped": dict(skipped), "flagged": dict(flagged),
             "generated_tokens": generated, "seconds": round(time.perf_counter() - started, 3),
             "by_generator": dict(Counter(r["generator"] for r in records))}
    return records, stats


def make_backends(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: GenerationSettings,
                  stop_ids: list[int], model_dir: Path | None, drafter: PreTrainedModel | None) -> dict:
    sampling, new_tokens = settings.sampling, settings.max_new_tokens
    if settings.backend == "vllm":
        if model_dir is None:
            raise ValueError("data_gen.backend=vllm needs the target as a local HF directory")
        options = dict(settings.vllm)
        target = VLLMBackend(model_dir, stop_ids, sampling, new_tokens,
                             tensor_parallel_size=options.pop("tensor_parallel_size", 1),
                             dtype=options.pop("dtype", "auto"), max_model_len=options.pop("max_model_len", None),
                             engine_args=options)
    else:
        target = HFBackend(model, tokenizer.pad_token_id, stop_ids, sampling, new_tokens, settings.batch_size,
                           settings.cache)
    backends = {"target": target}
    if drafter is not None:
        backends["drafter"] = HFBackend(drafter, tokenizer.pad_token_id, stop_ids, sampling, new_tokens,
                                        settings.batch_size, settings.cache)
    return backends


def generate(model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase, conversations: list[Conversation],
             settings: GenerationSettings, out_dir: Path, tracker: Tracker, stop_ids: list[int] | None = None,
             worker: WorkerSettings = WorkerSettings(), model_dir: Path | None = None,
             drafter: PreTrainedModel | None = None, source: dict | None = None,
             provenance: dict | None = None) -> dict:
    """Plan, generate this worker's shards into `out_dir/shards/`, and finalize when every shard exists.
    `model` may be None with the vllm backend when no top-k log-probabilities are stored. `source` (the prompt
    source's own report) is carried into plan.json and report.json; `provenance` into every shard."""
    plan = make_plan(tokenizer, conversations, settings)
    if not plan.jobs:
        raise RuntimeError(f"data_gen has nothing to generate from {len(conversations)} conversations: "
                           f"{dict(plan.skipped)}")
    shards = [plan.jobs[i: i + settings.shard_size] for i in range(0, len(plan.jobs), settings.shard_size)]
    estimate = estimated_bytes(plan, settings, len(json.dumps(provenance, default=str)) if provenance else 0)
    disk_line = check_disk(out_dir, estimate, settings.disk_headroom)
    print(f"[data_gen] plan: {len(conversations)} conversations -> {len(plan.jobs)} jobs in {len(shards)} shards; "
          f"skipped {dict(plan.skipped)}; flagged {dict(plan.flagged)}\n[data_gen] {disk_line}", flush=True)
    plan_summary = {"conversations_in": len(conversations), "jobs": len(plan.jobs), "shards": len(shards),
                    "skipped": dict(plan.skipped), "flagged": dict(plan.flagged),
                    "estimated_bytes": estimate} | ({"source": source} if source else {})
    if settings.dry_run:
        (out_dir / "plan.json").write_text(json.dumps(plan_summary, indent=2))
        raise ShardsPending(f"dry run: nothing generated; plan written to {out_dir / 'plan.json'}")
    if drafter is None and settings.on_policy_ratio > 0:
        raise ValueError("on-policy data needs the drafter model")

    done = complete_shards(out_dir, len(shards))
    mine = [i for i in range(worker.rank, len(shards), worker.world_size) if i not in done]
    if done:
        print(f"[data_gen] resuming: {len(done)} of {len(shards)} shards already complete", flush=True)
    stop_ids = stop_ids or end_of_turn_ids(tokenizer, model.generation_config)
    for index in mine:  # a writer killed mid-write leaves a temporary file; only this worker's are its own
        for stale in shard_path(out_dir, index).parent.glob(f".{shard_path(out_dir, index).name}.*.tmp"):
            stale.unlink()
    if mine:
        backends = make_backends(model, tokenizer, settings, stop_ids, model_dir, drafter)
        for index in tqdm(mine, desc=f"data_gen shards (worker {worker.rank}/{worker.world_size})", unit="shard"):
            records, stats = run_shard(shards[index], tokenizer, backends, stop_ids, settings)
            if settings.top_k_logprobs and records:
                target_topk(model, records, settings.top_k_logprobs, settings.batch_size)
            write_shard(shard_path(out_dir, index), records, settings.top_k_logprobs, stats, provenance)
            tracker.log({"data_gen/shard": index, "data_gen/records": stats["records"],
                         "data_gen/tokens_per_s": stats["generated_tokens"] / max(stats["seconds"], 1e-9)})
            if preemption.requested() and index != mine[-1]:
                raise preemption.Preempted(f"data_gen stopped after shard {index} on the warning signal; its committed "
                                           f"shards are kept and a rerun makes the rest")
    missing = sorted(set(range(len(shards))) - complete_shards(out_dir, len(shards)))
    if missing:
        raise ShardsPending(f"worker {worker.rank}/{worker.world_size} is done; shards {missing[:10]}"
                            f"{'...' if len(missing) > 10 else ''} ({len(missing)} of {len(shards)}) belong to other "
                            f"workers. The last worker to finish finalizes the stage.")
    return finalize(out_dir, len(shards), plan_summary)


def finalize(out_dir: Path, num_shards: int, plan_summary: dict) -> dict:
    """Write manifest.json, report.json and the response-length histogram from the committed shards."""
    try:
        with exclusive(out_dir.parent / ".locks" / "data_gen.finalize.lock", f"{out_dir} (finalize)"):
            if not out_dir.exists():  # the worker that held the lock before us finalized and committed the stage
                raise ShardsPending(f"another worker finalized {out_dir.name.removesuffix('.partial')}")
            return _finalize(out_dir, num_shards, plan_summary)
    except RunLocked as locked:
        raise ShardsPending(f"another worker is finalizing: {locked}") from None


def _finalize(out_dir: Path, num_shards: int, plan_summary: dict) -> dict:
    shards, skipped, flagged, by_generator, lengths, reasons = [], Counter(plan_summary["skipped"]), \
        Counter(plan_summary["flagged"]), Counter(), [], Counter()
    tokens = seconds = 0.0
    for index in range(num_shards):
        path = shard_path(out_dir, index)
        table, stats = read_shard(path)
        shards.append({"file": str(path.relative_to(out_dir)), "records": table.num_rows, "sha256": sha256_file(path)})
        skipped.update(stats["skipped"])
        flagged.update(stats["flagged"])
        by_generator.update(stats["by_generator"])
        tokens, seconds = tokens + stats["generated_tokens"], seconds + stats["seconds"]
        lengths += [len(ids) for ids in table.column("response_ids").to_pylist()]
        reasons.update(table.column("finish_reason").to_pylist())
    records = sum(s["records"] for s in shards)
    report = {
        "conversations_in": plan_summary["conversations_in"], "jobs": plan_summary["jobs"], "records": records,
        "skipped": dict(skipped), "flagged": dict(flagged), "finish_reasons": dict(reasons),
        "by_generator": dict(by_generator), "generated_tokens": int(tokens),
        "generation_seconds": round(seconds, 2), "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
        "response_tokens": length_summary(lengths), "estimated_bytes": plan_summary["estimated_bytes"],
        "written_bytes": sum(shard_path(out_dir, i).stat().st_size for i in range(num_shards)),
    } | ({"source": plan_summary["source"]} if "source" in plan_summary else {})
    (out_dir / MANIFEST).write_text(json.dumps({"shards": shards, "records": records}, indent=2))
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    plot_lengths(lengths, out_dir / "response_lengths.png")
    print(report_table(report), flush=True)
    return report


def length_summary(lengths: list[int]) -> dict:
    if not lengths:
        return {}
    values = np.array(lengths)
    return {"mean": round(float(values.mean()), 1), "p50": int(np.percentile(values, 50)),
            "p90": int(np.percentile(values, 90)), "max": int(values.max())}


def plot_lengths(lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    axis.hist(lengths, bins=min(50, max(5, len(set(lengths)))), color="#4C72B0")
    axis.set_xlabel("response tokens")
    axis.set_ylabel("records")
    axis.set_title(f"data_gen response lengths ({len(lengths)} records)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def report_table(report: dict) -> str:
    lines = [f"data_gen: {report['records']} records from {report['conversations_in']} conversations, "
             f"{report['generated_tokens']} tokens at {report['tokens_per_s']} tok/s",
             f"  {'count':>7}  reason"]
    lines += [f"  {n:>7}  skipped: {reason}" for reason, n in sorted(report["skipped"].items())]
    lines += [f"  {n:>7}  flagged: {reason}" for reason, n in sorted(report["flagged"].items())]
    lines += [f"  {n:>7}  finish reason: {reason}" for reason, n in sorted(report["finish_reasons"].items())]
    lines += [f"  {n:>7}  generated by: {who}" for who, n in sorted(report["by_generator"].items())]
    return "\n".join(lines)


def generation_config_of(model_dir: Path) -> GenerationConfig | None:
    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: the tokenizer's eos is the only stop token
        return None


def run_stage(run: StageRun, settings: GenerationSettings, target: TargetSpec, data: PromptSourceSpec) -> dict:
    """Stage `data_gen`: the target answers the prompts of `data` into `run.out_dir`."""
    model_dir, _ = resolve_model_dir(target, run.cache_dir)
    conversations, source_report = load_conversations(data, run.cache_dir)
    print(source_report.summary())
    if settings.backend == "vllm" and not settings.top_k_logprobs and not settings.on_policy_ratio:
        # vLLM holds the target; loading it into transformers as well would only take memory
        model, tokenizer = None, load_tokenizer(model_dir, target.trust_remote_code, target.chat_template)
        stop_ids = end_of_turn_ids(tokenizer, generation_config_of(model_dir))
    else:
        loaded = run.target()
        model, tokenizer = loaded.model, loaded.tokenizer
        stop_ids = end_of_turn_ids(tokenizer, model.generation_config)
    drafter = None
    if settings.on_policy_ratio > 0:  # DistillSpec on-policy data: a drafter checkpoint answers a share of prompts
        drafter = load_drafter(Path(settings.on_policy_drafter), model, tokenizer)
    return generate(model, tokenizer, conversations, settings, run.out_dir, run.tracker, stop_ids,
                    worker=run.worker, model_dir=model_dir, drafter=drafter, source=source_report.as_dict(),
                    provenance=run.provenance)
