"""Stage `online`: online distillation (OSD, Liu et al. 2023, and better): the drafter learns from the traffic it serves.

    python train/run.py +experiment=online_shift
    python train/run.py +experiment=standalone stages=[online] online.mode=serve loss=tvd

A stream of requests (`data_gen/stream.py`, phases whose domain changes) is served by the embedded lossless
decoder. What verification computed, the target's top-k log-probabilities at every drafted position, the accepted
prefix and the correction, goes into a bounded replay buffer (`train/online/buffer.py`): the target never runs a
second time for training. Every `schedule.every_requests` requests the trainer takes `schedule.steps` optimizer
steps on batches from the buffer (recent rows, and a `replay_share` of older ones against forgetting), with any
loss of the family (the `loss` group: fkl, rkl, jsd, tvd, tvdpp, ...) on the rows of the configured source.
Rehearsal (`buffer.rehearsal_share`): a share of each batch from the rows the drafter was distilled on (this run's
distill stage: its data_gen training split and corpus rows), so that learning the traffic does not unlearn what the
drafter knew; their teacher side is prepared once at the start (`train/online/learners.py`).

Safe publication: each update makes a candidate; every `publish.heldout_every`-th request is served as usual but
kept out of the buffer, in a window of the `publish.window` most recent ones; the candidate replaces the serving
drafter (version + 1) only if its acceptance on that window is not worse than the serving drafter's (`tau`: τ of
greedy chain decoding, exact under greedy serving; `alpha`: expected acceptance Σ min(p, q) from the stored top-k).
Otherwise it is rolled back: the trainer returns to the serving weights and optimizer state (unless
`publish.reset_trainer=false`: it keeps learning); counted and logged. `publish.check_on=next` holds nothing out:
the candidate is judged on the requests served after it was made, before it trains on them (one update later), so
the window is always the most recent traffic and every request trains.

Arms: the configured learner (`ours`) and `baselines` served on the same stream: `frozen` (never updates) and `osd`
(OSD's public code: forward KL on the corrected positions, an update every 8 requests, one step, the buffer
emptied, lr 1e-4 constant, no clipping, no check).

Modes: `serve` runs the real decoder for every request (greedy output compared with plain decoding every
`check_lossless_every` requests; token drafters). `replay` (greedy, teacher rows; token and feature drafters)
decodes the stream once with the plain target (the trace: answers and top-k along them) and replays it: under
greedy verification the accepted prefix is exactly the run of positions where the drafter's argmax, given the
target's own prefix, equals the target's token, so acceptance follows from one drafter forward per request
(ANCHORS.md §10; a feature drafter's deeper drafts read its own features: `train/online/learners.py`). Every
`spot_check_every`-th request is also served for real and must give the trace's tokens (lossless) and the replay's
counts (mismatches are counted and reported).

Resumable: each arm checkpoints after every `checkpoint_every` updates (serving and trainer weights, optimizer
states, buffer, window, counters); kill -9 and rerun continues from the newest good checkpoint, the request logs
are cut back to it and the requests after it are served again (once in the logs).

Outputs: `arms/<arm>/stream.jsonl` (per request: phase, drafter version, drafted, accepted, τ), `updates.jsonl`,
`model/` (ours's final serving drafter), `report.json`, `report.md` (per-phase table, recovery after each shift),
`acceptance_stream.png`, W&B series.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from data_gen.chat import end_of_turn_ids, prompt_token_ids
from data_gen.shards import check_held_out
from data_gen.sources import PromptSourceSpec, load_conversations
from data_gen.stream import build_stream
from infra.settings import SettingsError
from infra.stage import StageRun
from losses.mix import LossMix, needs_teacher
from models.drafter import check_same_vocabulary
from models.kinds import kind_of, load_any
from train.core.rows import Row, conversation_rows, distill_rows
from train.online.arms import ArmState, OSD_LOSS, arms_for
from train.online.learners import LEARNERS, learner_for
from train.online.replay import Trace, make_trace
from train.online.report import markdown, per_version_table, phase_table, plot, read_lines, version_markdown
from train.online.serving import resume_arm, serve_arm
from train.online.settings import OnlineSettings


def starting_drafter(run: StageRun, settings: OnlineSettings, target) -> tuple[Path, torch.nn.Module]:
    candidates = [Path(settings.init_from)] if settings.init_from else [
        folder / "model" for folder in (run.output("distill"), run.output("pretrain")) if folder is not None]
    if not candidates:
        raise SettingsError("online needs a drafter to start from: this run has no distill or pretrain output; add "
                            "them to stages, or set online.init_from=/path/to/drafter")
    drafter = load_any(candidates[0], target)
    kind = kind_of(drafter)
    if not kind.trainable:
        raise SettingsError(f"online.init_from={candidates[0]}: a {kind.name} drafter has no weights to learn")
    if settings.mode not in LEARNERS[kind.training].modes:
        raise SettingsError(f"online.mode={settings.mode} with the {kind.name} drafter in {candidates[0]}: a feature "
                            f"drafter learns online in online.mode=replay only (the verification recorder keeps the "
                            f"target's top-k, not the hidden states this drafter trains on)")
    check_same_vocabulary(kind.vocabulary_of(drafter), target.model)
    return candidates[0], drafter


@dataclass
class DistilledOn:
    """What this run's distill stage trained with, from its meta.json: its config, its summary, and the corpus
    conversations it added (distill.corpus_records: the first N of the `corpus` source, as
    `train.core.rows.corpus_rows` takes them), read once."""
    config: dict
    summary: dict
    corpus: PromptSourceSpec | None
    conversations: list


def distilled_on(run: StageRun) -> DistilledOn | None:
    """None without a distill output in this run."""
    folder = run.output("distill")
    if folder is None:
        return None
    meta = json.loads((folder / "meta.json").read_text())
    config = meta.get("config", {})
    count = config.get("distill", {}).get("corpus_records", 0)
    corpus = PromptSourceSpec(**{k: v for k, v in config["corpus"].items() if k != "_target_"}) if count else None
    conversations = load_conversations(corpus, run.cache_dir, "corpus")[0][:count] if count else []
    return DistilledOn(config, meta.get("summary", {}), corpus, conversations)


def corpus_trained_on(distilled: DistilledOn | None) -> set[tuple[str, str | None, str]]:
    """(location, file, id) of the corpus conversations the distill stage added to its data."""
    if distilled is None or distilled.corpus is None:
        return set()
    return {(distilled.corpus.location, distilled.corpus.file, c.id) for c in distilled.conversations}


def rehearsal_rows(run: StageRun, settings: OnlineSettings, tokenizer, distilled: DistilledOn | None) -> list[Row]:
    """The rows this run's distill stage trained on (`train.core.rows.distill_rows`: its data_gen records less the
    held-out split, and its corpus conversations), cut at its max_seq_len and scored as it scored them
    (`online.buffer.rehearsal_share`)."""
    if distilled is None or settings.init_from:
        raise SettingsError(f"online.buffer.rehearsal_share={settings.buffer.rehearsal_share}: rehearsal draws on the "
                            f"rows the drafter was distilled on, known only for this run's own distill output "
                            f"({'online.init_from is set' if settings.init_from else 'this run has none'}); add "
                            f"distill to stages, or set online.buffer.rehearsal_share=0")
    distill = distilled.config["distill"]
    cut, every = distill["max_seq_len"], distill.get("train_on") == "all"  # all: prompt tokens were scored too
    rows, _ = distill_rows(run.require("data_gen"), "online", distill["heldout_records"],
                           conversation_rows(tokenizer, distilled.conversations, cut))
    rows = [replace(r, input_ids=r.input_ids[:cut], loss_mask=[0] + [1] * (min(len(r.input_ids), cut) - 1)
                    if every else r.loss_mask[:cut]) for r in rows]
    kept = [row for row in rows if row.loss_positions(cut)]
    if len(kept) < len(rows):
        print(f"[online] rehearsal: {len(rows) - len(kept)} of distill's rows have no scored token within its "
              f"max_seq_len={cut} (it did not learn from them either): left out", flush=True)
    return kept


def run_stage(run: StageRun, settings: OnlineSettings, loss) -> dict:
    """Serve the stream with every arm, then write the reports (module docstring)."""
    token = loss if isinstance(loss, LossMix) else getattr(loss, "token", None)
    label_terms = [name for name, (fn, _) in (token.terms if token else {}).items() if not needs_teacher(fn)]
    if label_terms and settings.buffer.source != "teacher":
        raise SettingsError(f"loss terms {label_terms} learn the next token of the row, and with online.buffer.source="
                            f"{settings.buffer.source} rows hold the drafter's own proposals; use a loss against the "
                            f"target's distribution (fkl, rkl, jsd, tvd, tvdpp), or buffer.source=teacher")
    target = run.target()
    path, first = starting_drafter(run, settings, target)
    token_drafter = kind_of(first).training == "tokens"
    if token_drafter != isinstance(loss, LossMix):
        wanted = ("a token loss (loss=fkl, tvd, tvdpp, ...)" if token_drafter
                  else "a feature loss (loss=eagle3, eagle, fspad)")
        raise SettingsError(f"loss: a {kind_of(first).name} drafter learns online with {wanted}, not "
                            f"{type(loss).__name__}")
    tokenizer, model = target.tokenizer, target.model
    distilled = distilled_on(run)
    requests, stream_report = build_stream(
        settings.stream, run.cache_dir,
        lambda c: len(prompt_token_ids(tokenizer, c.first_turn_prompt())) > settings.max_prompt_tokens,
        corpus_trained_on(distilled))
    check_held_out([r.conversation for r in requests], run.output("data_gen"), "online stream requests",
                   "online.stream.<phase>.source.offset")
    print(f"[online] stream of {len(requests)} requests:\n{stream_report.summary()}", flush=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [prompt_token_ids(tokenizer, r.conversation.first_turn_prompt()) for r in requests]
    stop_ids = end_of_turn_ids(tokenizer, model.generation_config)
    trace = None
    if settings.mode == "replay":
        trace_path = run.out_dir / "trace.pt"
        if trace_path.exists():
            trace = Trace(**torch.load(trace_path, weights_only=True))
        else:
            trace = make_trace(model, prompts, [r.key for r in requests], settings, stop_ids)
            torch.save(asdict(trace), trace_path.with_suffix(".tmp"))
            trace_path.with_suffix(".tmp").replace(trace_path)
    items = None if trace is None else [(r.key, p, a) for r, p, a in zip(requests, prompts, trace.answers)]
    learner = learner_for(first, model, settings.decode.gamma, settings.max_seq_len, pad_id, items)
    rehearsal = []
    if settings.buffer.rehearsal_share:
        rehearsal = rehearsal_rows(run, settings, tokenizer, distilled)
        cache = distilled.summary.get("feature_cache_folder") or "features"  # absent: distilled before it was kept
        learner.rehearse(rehearsal, settings.top_k, run.output("distill") / cache)  # an absolute path stays itself
        print(f"[online] rehearsal: {len(rehearsal)} rows the drafter was distilled on, "
              f"{settings.buffer.rehearsal_share:.0%} of each training batch of ours", flush=True)
    arms = arms_for(settings, loss, learner.osd_loss(OSD_LOSS))
    logs, updates, counters = {}, {}, {}
    for arm in arms:
        arm_dir = run.out_dir / "arms" / arm.name
        done = arm_dir / "done.json"
        if done.exists():
            counters[arm.name] = json.loads(done.read_text())
        else:
            state = ArmState(arm, copy.deepcopy(first), settings, learner, pad_id, rehearsal)
            start = resume_arm(state, arm_dir, run.resume)
            serve_arm(state, requests, prompts, trace, stop_ids, run, arm_dir, start)
            if arm.name == "ours":
                kind_of(first).save(state.serving, target, run.out_dir / "model")
            counters[arm.name] = state.counters
            done.write_text(json.dumps(state.counters, indent=2))
        logs[arm.name] = read_lines(arm_dir / "stream.jsonl")
        updates[arm.name] = read_lines(arm_dir / "updates.jsonl")
    phases = list(settings.stream)
    table = phase_table(logs, phases, settings.moving_window)
    per_version = {arm: per_version_table(lines) for arm, lines in logs.items()}
    report = {"drafter": str(path), "mode": settings.mode, "stream": stream_report.phases, "arms": counters,
              "rehearsal_rows": len(rehearsal),
              "phases": table, "per_version": per_version,
              "table_markdown": markdown(table, phases, counters) + "\n" + version_markdown(per_version)}
    (run.out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (run.out_dir / "report.md").write_text(report["table_markdown"])
    if settings.plots:
        plot(logs, updates, phases, settings.moving_window, run.out_dir / "acceptance_stream.png")
    run.tracker.table("online/phases", ["arm", "phase", "acceptance", "tau", "recovery_requests"],
                      [[a, p, c["acceptance"], c["tau"], c["recovery_requests"]]
                       for a, by in table.items() for p, c in by.items()])
    print(report["table_markdown"], flush=True)
    summary = {f"{arm}_acceptance": sum(l["accepted"] for l in lines) / max(1, sum(l["drafted"] for l in lines))
               for arm, lines in logs.items()}
    return summary | {f"{arm}_{key}": c[key] for arm, c in counters.items()
                      for key in ("updates", "rollbacks", "version")} | {"requests": len(requests)}
