"""Stage `eval`: the acceptance benchmark, built on the lossless decoder in `eval/decoder.py`.

    python train/run.py +experiment=quickstart stages=[eval]
    python train/run.py +experiment=quickstart stages=[eval] eval.decode.tree=[3,2,1] \
        eval.decode.sampling.temperature=1.0
    python train/run.py +experiment=quickstart stages=[eval] eval_data=sharegpt_heldout +eval.drafters.mine=DIR

For each conversation, each user turn up to `turns` (MT-Bench has two) is answered by plain target decoding on
the pre-allocated cache; later turns are conditioned on the target's own earlier answers. Every drafter then
decodes the same prompts speculatively and is checked against those references: greedy fp32 output must be
equal token for token; in half precision every divergence is classified as a near-tie of the target's top-2
logits or not (`classify_divergence`); sampled output is checked statistically by the test suite, not here.

Reported per prompt, per category and overall (metrics in `eval/metrics.py`): acceptance rate, per-position
acceptance (unconditional and conditional), block efficiency τ, c (by parameters and measured), MBSU, the
predicted and the measured wall speedup (median of per-prompt ratios with a bootstrap interval). Wall times are
taken interleaved: each prompt is decoded plainly and by every drafter in turn (the order rotating from prompt to
prompt), so each ratio divides two times taken seconds apart and a machine whose speed drifts during the eval (by
±15-25% on a shared CPU) biases no row; the drift itself is reported (`plain.drift`). Outputs:
`report.json`, `report.md`, `acceptance_per_position.png`, `tau_per_category.png`, W&B tables.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from data_gen.chat import end_of_turn_ids, prompt_token_ids
from data_gen.shards import check_held_out, load_records
from data_gen.sources import PromptSourceSpec, load_conversations
from eval.decoder import DecodeSettings, LosslessnessError, plain_generate, speculative_generate, verification_seconds
from eval.metrics import DecodeStats, median_interval, speed_model
from eval.report import SUMMARY_COLUMNS, markdown_report, summary_rows
from eval.settings import EvalSettings
from infra.stage import StageRun
from infra.tracking import Tracker
from models.drafter import DrafterSpec
from models.eagle3_export import is_engine_folder
from models.feature_drafter import FeatureDrafterSpec
from models.kinds import draft_for, kind_of, kind_of_spec, load_any
from models.loading import check_finite
from models.lookup import LookupFirstDraft, MergedDraft, baseline_specs


@dataclass
class EvalPrompt:
    id: str
    category: str
    system: list[dict]
    turns: list[str]


def _timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def build_turns(target: PreTrainedModel, tokenizer, prompts: list[EvalPrompt], settings: EvalSettings,
                stop_ids: list[int], encode) -> tuple[list[dict], list[list[int]], float]:
    """Every (prompt, turn) as {id, category, turn, prompt_ids}, with the target's plain answers and the seconds
    they took in all (the drift check: the rows' own plain times are taken interleaved, `decode_interleaved`).
    Turn k's prompt holds turns 1..k-1 answered by the target itself (plain decoding, the same settings)."""
    decode = settings.decode
    items, answers, total = [], [], 0.0
    histories = {p.id: list(p.system) for p in prompts}
    for turn in range(settings.turns):
        batch = [p for p in prompts if turn < len(p.turns)]
        if not batch:
            break
        turn_items = []
        for p in batch:
            histories[p.id].append({"role": "user", "content": p.turns[turn]})
            turn_items.append({"id": p.id if turn == 0 else f"{p.id}/turn-{turn + 1}", "category": p.category,
                               "turn": turn + 1, "prompt_ids": encode(histories[p.id])})
        for first in tqdm(range(0, len(turn_items), decode.batch_size), desc=f"eval: plain target, turn {turn + 1}",
                          unit="batch" if decode.batch_size > 1 else "prompt"):
            chunk = turn_items[first: first + decode.batch_size]
            outputs, elapsed = _timed(plain_generate, target, [i["prompt_ids"] for i in chunk], decode, stop_ids,
                                      [i["id"] for i in chunk])
            answers += outputs
            total += elapsed
            for item, output in zip(chunk, outputs):
                text = tokenizer.decode([t for t in output if t not in stop_ids], skip_special_tokens=True)
                histories[item["id"].split("/turn-")[0]].append({"role": "assistant", "content": text})
        items += turn_items
    return items, answers, total


def decode_interleaved(target: PreTrainedModel, drafters: dict, items: list[dict], decode: DecodeSettings,
                       stop_ids: list[int]) -> tuple[dict, dict, dict]:
    """Every chunk of prompts decoded plainly (key None) and by every drafter, one after the other, the order
    rotated from chunk to chunk: {name: outputs}, {name: seconds per item}, {name: total seconds}. A time is then
    never compared with one taken minutes earlier, when the machine may have run faster or slower."""
    names = [None, *drafters]
    outputs = {name: [] for name in drafters}
    seconds, totals = {name: [] for name in names}, {name: 0.0 for name in names}
    chunks = range(0, len(items), decode.batch_size)
    bar = tqdm(chunks, desc=f"eval: plain target and {len(drafters)} drafter(s), interleaved",
               unit="batch" if decode.batch_size > 1 else "prompt")
    for index, first in enumerate(bar):
        chunk = items[first: first + decode.batch_size]
        ids, keys = [i["prompt_ids"] for i in chunk], [i["id"] for i in chunk]
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            if name is None:
                _, elapsed = _timed(plain_generate, target, ids, decode, stop_ids, keys)
            else:
                decoded, elapsed = _timed(speculative_generate, target, drafters[name], ids, decode, stop_ids, keys)
                outputs[name] += decoded
            seconds[name] += [elapsed] * len(chunk)
            totals[name] += elapsed
    return outputs, seconds, totals


def classify_divergence(target: PreTrainedModel, prompt_ids: list[int], reference: list[int], tokens: list[int],
                        tolerance: float) -> dict:
    """Where `tokens` first leaves `reference`: the target's top-2 logit gap there (one full forward, no cache)
    and whether it is a near-tie (gap <= tolerance), the expected effect of half-precision rounding."""
    at = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    if at >= min(len(tokens), len(reference)):
        return {"first_difference_at": at, "top2_gap": None, "near_tie": False, "reason": "lengths differ"}
    with torch.inference_mode():
        logits = target(input_ids=torch.tensor([prompt_ids + reference[:at]], device=target.device)).logits[0, -1]
    top = logits.float().topk(2).values
    gap = float(top[0] - top[1])
    return {"first_difference_at": at, "top2_gap": gap, "near_tie": gap <= tolerance,
            "tokens": [reference[at], tokens[at]]}


def measure_cost_ratio(target: PreTrainedModel, draft, prompt_ids: list[int], tokens: int = 32) -> float:
    """c measured: seconds per drafter forward / seconds per plain target forward, on one prompt, this machine.
    The drafter is timed drafting alone (a chain step's drafting phase, γ = `tokens`, one row)."""
    settings = DecodeSettings(gamma=tokens, max_new_tokens=tokens + 1)
    _, prefill = _timed(plain_generate, target, [prompt_ids], DecodeSettings(max_new_tokens=1), [])
    _, target_seconds = _timed(plain_generate, target, [prompt_ids], settings, [])
    timings = {}
    speculative_generate(target, draft, [prompt_ids], settings, [], timings=timings)
    per_target_step = max(target_seconds - prefill, 1e-9) / tokens  # the prompt's forward taken out
    if not timings["draft_forwards"]:  # a training-free drafter that abstained all along drafted nothing
        return 0.0
    return (timings["draft_seconds"] / timings["draft_forwards"]) / per_target_step


def node_cost(target: PreTrainedModel, prompt_ids: list[int], widths: tuple[int, int] = (2, 10),
              calls: int = 9) -> float:
    """What one more token in a verification forward costs on this machine, in one-token steps: the slope of the
    measured v(w) between `widths` (never below 0), the span merged trees verify (a difference of two medians is
    noisy: 0.023 and 0.095 in two evals an hour apart with (4, 8) and 5 calls). A drafted node whose chance of
    acceptance is below it costs more than it is expected to bring (an accepted token saves one plain step)."""
    seconds = verification_seconds(target, prompt_ids, [1, *widths], calls)
    low, high = widths
    return max(0.0, (seconds[high] - seconds[low]) / seconds[1] / (high - low))


def measure_verify_cost(target: PreTrainedModel, prompt_ids: list[int], width: int, calls: int = 5) -> float:
    """v measured: seconds per target forward over a `width`-token block (a verification) / seconds per one-token
    forward, after `prompt_ids` on this machine."""
    seconds = verification_seconds(target, prompt_ids, [1, width], calls)
    return seconds[width] / seconds[1]


def aggregate(stats: list[DecodeStats], depth: int = 1) -> dict:
    """The metrics of several generations' counters together (deeper records widen the per-position lists)."""
    total = DecodeStats(depth=depth)
    for s in stats:
        total.merge(s)
    return {k: v for k, v in total.metrics().items()}


def evaluate(target: PreTrainedModel, tokenizer, drafters: dict, prompts: list[EvalPrompt], stop_ids: list[int],
             settings: EvalSettings, out_dir: Path, tracker: Tracker, encode, parameters: dict[str, int],
             drafter_paths: dict[str, str] | None = None, baselines: tuple[str, ...] = (),
             hybrids: tuple[str, ...] = ()) -> dict:
    """Benchmark every drafter (name -> TokenDraft | FeatureDraft) on `prompts`; `encode(messages) -> ids` is the
    target's chat template; `parameters` holds parameter counts (target and drafters) for MBSU; `drafter_paths`
    says where each drafter came from; `baselines` names the training-free ones and `hybrids` the trained ones
    behind a lookup (neither is ever "best": "best" is a checkpoint the export stage can ship, so another trainer's
    engine folder is not either while one of ours is evaluated). Writes
    report.json, report.md and plots to `out_dir`; returns the report."""
    decode = settings.decode
    half = next(target.parameters()).dtype in (torch.float16, torch.bfloat16)
    for prompt in prompts[: settings.warmup_prompts]:  # one-off allocation costs
        warm = DecodeSettings(gamma=decode.gamma, tree=decode.tree, max_new_tokens=8)
        plain_generate(target, [encode(prompt.system + [{"role": "user", "content": prompt.turns[0]}])], warm,
                       stop_ids)
        for draft in drafters.values():
            speculative_generate(target, draft, [encode([{"role": "user", "content": prompt.turns[0]}])], warm,
                                 stop_ids)
    for draft in drafters.values():
        draft.reset()  # what a learning baseline saw during the warm-up must not help it
    items, references, plain_total = build_turns(target, tokenizer, prompts, settings, stop_ids, encode)
    report = {"settings": asdict(settings) | {"drafters": dict(settings.drafters)}, "num_prompts": len(prompts),
              "num_turns": len(items), "dtype": str(next(target.parameters()).dtype).replace("torch.", ""),
              "plain": {"tokens": sum(map(len, references))},
              "drafters": {}, "drafter_paths": drafter_paths or {}, "parameters": parameters,
              "baselines": list(baselines), "hybrids": list(hybrids), "stop_ids": list(stop_ids),
              # every prompt as decoded, with the target's plain answer: what a serving engine replays
              # (python -m eval.serving_check) to put its acceptance beside ours on exactly these tokens
              "prompts": [{"id": i["id"], "category": i["category"], "turn": i["turn"],
                           "prompt_ids": i["prompt_ids"], "reference_ids": r} for i, r in zip(items, references)]}
    verify_cost = measure_verify_cost(target, items[0]["prompt_ids"], decode.block_width)
    report["verify_cost"] = {"tokens": decode.block_width, "v_measured": verify_cost}
    decoded, timed, totals = decode_interleaved(target, drafters, items, decode, stop_ids)
    plain_seconds = timed[None]
    report["plain"] |= {"tokens_per_second": report["plain"]["tokens"] / totals[None],
                        # > 1: the machine ran slower while the drafters were timed than when the answers were made
                        "drift": totals[None] / plain_total}
    for name, draft in drafters.items():
        generations, seconds, elapsed_total = decoded[name], timed[name], totals[name]
        mismatches = []
        for item, generation, reference in zip(items, generations, references):
            if generation.tokens != reference:
                if decode.sampling.greedy:
                    mismatches.append({"id": item["id"]} | classify_divergence(
                        target, item["prompt_ids"], reference, generation.tokens, settings.tie_tolerance))
        ratios = [p / s for p, s in zip(plain_seconds, seconds)]
        median, low, high = median_interval(ratios)
        metrics = aggregate([g.stats for g in generations], decode.depth)
        # a merged tree's drafter forwards are its trained drafter's (the lookup's cost nothing)
        cost = measure_cost_ratio(target, draft.trained if draft.merged else draft,
                                  items[0]["prompt_ids"])
        width = round(metrics["mean_verified_per_step"])  # a merged tree verifies a width of its own
        # drafter forwards per step: a merged tree's drafter runs its own depth, and only where it runs
        forwards = (len(draft.drafter_branching(decode.tree, decode.gamma)) * metrics["drafter_run_fraction"]
                    if draft.merged else metrics["mean_drafted_per_step"])
        row_verify = verify_cost if width == decode.block_width else measure_verify_cost(
            target, items[0]["prompt_ids"], max(width, 1))
        c_params = parameters.get(name, 0) / parameters["target"]
        metrics |= {
            "c_measured": cost, "c_parameters": c_params,
            "mbsu": speed_model(metrics["block_efficiency"], forwards, c_params),
            "v_measured": row_verify,
            "predicted_speedup": speed_model(metrics["block_efficiency"], forwards, cost, row_verify),
            "speedup_median": median, "speedup_interval_95": [low, high],
            "tokens_per_second": sum(len(g.tokens) for g in generations) / elapsed_total,
            **losslessness(decode.sampling.greedy, half, mismatches, len(items)),
            "divergences": mismatches,
            "per_category": {category: aggregate([g.stats for g, i in zip(generations, items)
                                                   if i["category"] == category], decode.depth)
                             | {"speedup_median": statistics.median([r for r, i in zip(ratios, items)
                                                                     if i["category"] == category])}
                             for category in sorted({i["category"] for i in items})},
            "per_turn": {str(turn): aggregate([g.stats for g, i in zip(generations, items) if i["turn"] == turn],
                                               decode.depth)["block_efficiency"]
                         for turn in sorted({i["turn"] for i in items})},
            "per_prompt": [{"id": i["id"], "category": i["category"], "turn": i["turn"], "speedup": r,
                            **{k: v for k, v in g.stats.metrics().items() if not k.endswith("position")}}
                           for i, g, r in zip(items, generations, ratios)],
        }
        if draft.merged and draft.gate is not None:  # eval.merged_skip_at=auto: what it priced, per lookup length
            metrics["drafter_gate"] = draft.gate.summary()
        report["drafters"][name] = metrics
        tracker.log({f"eval/{name}/block_efficiency": metrics["block_efficiency"],
                     f"eval/{name}/acceptance_rate": metrics["acceptance_rate"],
                     f"eval/{name}/speedup_median": median, f"eval/{name}/mbsu": metrics["mbsu"]})
    learned = {n: m for n, m in report["drafters"].items() if n not in baselines and n not in hybrids}
    trained = {n: m for n, m in learned.items() if n != "untrained"}
    # another trainer's engine folder is decoded beside ours but is not ours to export
    paths = report["drafter_paths"]
    own = {n: m for n, m in trained.items() if n not in paths or not is_engine_folder(Path(paths[n]))}
    report["best"] = max(own or trained or learned or report["drafters"],
                         key=lambda n: report["drafters"][n]["block_efficiency"])
    report["table_markdown"] = markdown_report(report)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(report["table_markdown"])
    if settings.plots:
        report["plots"] = plot_report(report, out_dir)
    tracker.table("eval/summary", SUMMARY_COLUMNS, summary_rows(report))
    tracker.table("eval/per_category", ["drafter", "category", "block_efficiency", "acceptance_rate",
                                        "speedup_median"],
                  [[n, c, m["block_efficiency"], m["acceptance_rate"], m["speedup_median"]]
                   for n, d in report["drafters"].items() for c, m in d["per_category"].items()])
    failing = [n for n, m in report["drafters"].items() if m["lossless"] is False]
    if failing and settings.require_lossless:
        raise LosslessnessError(f"speculative output differs from plain output for {failing}: "
                                f"{[report['drafters'][n]['divergences'][:3] for n in failing]} (see {out_dir})")
    return report


def losslessness(greedy: bool, half: bool, mismatches: list[dict], outputs: int) -> dict:
    """What was checked, and its verdict: True/False when outputs were compared with plain decoding, None when
    nothing was compared here (sampling: a sampled output has no single right answer to compare with)."""
    if not greedy:
        return {"lossless": None, "lossless_check": (
            "not checked here: sampled outputs are not compared with plain decoding (the sampling rule is checked "
            "statistically against exact distributions in tests/eval/test_decoder.py)")}
    if half:
        ties = sum(m["near_tie"] for m in mismatches)
        return {"lossless": ties == len(mismatches), "lossless_check": (
            f"greedy, half precision: {outputs - len(mismatches)} of {outputs} outputs equal plain greedy decoding; "
            f"{ties} of {len(mismatches)} divergences are near-ties of the target's top-2 logits")}
    return {"lossless": not mismatches, "lossless_check": (
        f"greedy fp32: {outputs - len(mismatches)} of {outputs} outputs equal plain greedy decoding token for token")}


def plot_report(report: dict, out_dir: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, m in report["drafters"].items():
        positions = range(1, len(m["accepted_per_position"]) + 1)
        axes[0].plot(positions, m["accepted_per_position"], marker="o", label=name)
        axes[1].plot(positions, m["conditional_acceptance_per_position"], marker="o", label=name)
    for axis, title in zip(axes, ["unconditional (vLLM): accepted_i / drafts",
                                  "conditional (EAGLE α_i): accepted_i / reached_i"]):
        axis.set(title=title, xlabel="draft position", ylabel="acceptance", ylim=(0, 1.05))
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "acceptance_per_position.png", dpi=100)
    plt.close(figure)
    categories = sorted({c for m in report["drafters"].values() for c in m["per_category"]})
    figure, axis = plt.subplots(figsize=(max(6, len(categories) * 1.2), 4))
    width = 0.8 / max(1, len(report["drafters"]))
    for index, (name, m) in enumerate(report["drafters"].items()):
        axis.bar([c + index * width for c in range(len(categories))],
                 [m["per_category"].get(c, {}).get("block_efficiency", 0) for c in categories], width, label=name)
    axis.set_xticks([c + width * (len(report["drafters"]) - 1) / 2 for c in range(len(categories))],
                    [c or "-" for c in categories], rotation=30)
    axis.set(ylabel="block efficiency τ", title="τ per category")
    axis.axhline(1.0, color="grey", linewidth=0.5)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "tau_per_category.png", dpi=100)
    plt.close(figure)
    return ["acceptance_per_position.png", "tau_per_category.png"]


def training_free(target, specs: dict, data_gen_dir: Path | None, records: dict | None = None
                  ) -> tuple[dict, dict[str, str]]:
    """The baselines that can be built here ({name: drafter}), and the skipped ones with the reason: a corpus
    table needs this run's data_gen records (the answers the trained drafters learned from). `records` (a dict,
    filled on first use) lets a second call reuse the records the first one read."""
    built, skipped = {}, {}
    records = {} if records is None else records
    for name, spec in specs.items():
        if "corpus" in spec.sources and data_gen_dir is None:
            skipped[name] = "no data_gen output in this run to build its n-gram table from"
            print(f"[eval] baseline {name} skipped: {skipped[name]}", flush=True)
            continue
        if "corpus" in spec.sources and not records:
            columns = load_records(data_gen_dir).select_columns(["input_ids", "loss_mask"])
            records.update(input_ids=columns["input_ids"], loss_mask=columns["loss_mask"])
        built[name] = kind_of_spec(spec).build(spec, target, token_lists=records.get("input_ids"),
                                               masks=records.get("loss_mask"))
    return built, skipped


def run_stage(run: StageRun, settings: EvalSettings, drafter: DrafterSpec | FeatureDrafterSpec,
              eval_data: PromptSourceSpec) -> dict:
    """Stage `eval`: the untrained, pretrained and distilled drafters of this run (and `eval.drafters`) on the
    held-out prompts of `eval_data`; report.json, report.md and plots in `run.out_dir`."""
    target = run.target()
    conversations, source_report = load_conversations(eval_data, run.cache_dir, "eval_data")
    if source_report.skipped:
        print(f"[eval] prompts read (eval_data):\n{source_report.summary()}", flush=True)
    prompts = []
    for conversation in conversations:
        system, turns = conversation.user_turns()
        prompts.append(EvalPrompt(conversation.id, conversation.category, system, turns))
    check_held_out(conversations, run.output("data_gen"))
    drafters, paths = {}, {}
    if settings.include_untrained:
        data_gen_dir = run.output("data_gen")
        if getattr(drafter, "draft_vocab_size", None) and data_gen_dir is None:  # nothing to count a vocabulary on
            paths["untrained"] = "skipped: a draft vocabulary is counted on data_gen's answers; this run has none"
            print(f"[eval] untrained drafter {paths['untrained']}", flush=True)
        else:
            answers = (list(load_records(data_gen_dir).select_columns(["response_ids"])["response_ids"])
                       if data_gen_dir is not None else None)
            drafters["untrained"] = kind_of_spec(drafter).build(drafter, target, token_lists=answers).eval()
            paths["untrained"] = "built from conf/drafter (no training)"
    candidates = {name: run.output(stage) for name, stage in (("pretrained", "pretrain"), ("distilled", "distill"))}
    candidates = {name: path / "model" for name, path in candidates.items() if path is not None}
    candidates |= {name: Path(path) for name, path in settings.drafters.items()}
    for name, path in candidates.items():
        drafters[name] = load_any(path, target)
        check_finite(drafters[name], f"drafter {name!r} ({path})")  # a NaN drafter is refused, never ranked
        paths[name] = str(path)
    corpus = {}  # data_gen's records, read once for the baselines and the hybrids' lookups alike
    baselines, skipped = training_free(target, baseline_specs(settings.baselines), run.output("data_gen"), corpus)
    drafters |= baselines
    paths |= {name: f"training-free ({', '.join(d.spec.sources)})" for name, d in baselines.items()}
    paths |= {name: f"skipped: {why}" for name, why in skipped.items()}
    parameters = {"target": sum(p.numel() for p in target.model.parameters())}
    parameters |= {name: kind_of(d).parameters_per_token(d, target.model) for name, d in drafters.items()}
    drafts = {name: draft_for(d, target.model) for name, d in drafters.items()}
    fronts, skipped = training_free(target, settings.hybrid_specs, run.output("data_gen"), corpus)
    for name in candidates:  # the trained drafters, each behind each lookup kind (models.lookup.LookupFirstDraft)
        for kind, front in fronts.items():
            hybrid = f"{name}+{kind}"
            drafts[hybrid] = LookupFirstDraft(draft_for(front, target.model), draft_for(drafters[name], target.model))
            parameters[hybrid] = parameters[name]
            paths[hybrid] = (f"{paths[name]}, behind training-free {kind} (its guess first where it matches "
                             f"≥ {front.spec.min_ngram} tokens)")
    paths |= {f"{name}+{kind}": f"skipped: {why}" for name in candidates for kind, why in skipped.items()}
    fronts, skipped = training_free(target, settings.merged_specs, run.output("data_gen"), corpus)
    bar = settings.merged_min_probability
    if bar == "auto" and fronts and candidates:
        first = prompts[0]
        bar = node_cost(target.model, prompt_token_ids(target.tokenizer, first.system + [
            {"role": "user", "content": first.turns[0]}]))
        print(f"[eval] merged trees: one more verified token costs {bar:.3f} plain steps here; drafter nodes less "
              f"likely than that are not verified", flush=True)
    for name in candidates:  # each trained drafter's own tree beside each lookup kind's guess (MergedDraft)
        for kind, front in fronts.items():
            merged = f"{name}&{kind}"
            drafts[merged] = MergedDraft(draft_for(front, target.model), draft_for(drafters[name], target.model),
                                         settings.merged_depth, settings.merged_skip_at, settings.merged_tree,
                                         min(float(bar), 0.99))
            parameters[merged] = parameters[name]
            skip = ("; the drafter sits out steps where its measured gain is worth less than its measured cost"
                    if settings.merged_skip_at == "auto" else
                    f"; the drafter sits out steps whose guess is ≥ {settings.merged_skip_at} tokens"
                    if settings.merged_skip_at else "")
            skip += f"; its nodes below path probability {float(bar):.3f} are not verified" if float(bar) else ""
            own = settings.merged_tree or settings.decode.tree
            shape = f"its tree {list(own)}" if own else f"its γ={settings.decode.gamma} chain"
            paths[merged] = (f"{paths[name]}, {shape} and training-free {kind}'s guess (up to "
                             f"{settings.merged_depth} tokens, matches ≥ {front.spec.min_ngram}) in one token "
                             f"tree{skip}")
    paths |= {f"{name}&{kind}": f"skipped: {why}" for name in candidates for kind, why in skipped.items()}
    stop_ids = end_of_turn_ids(target.tokenizer, target.model.generation_config)
    report = evaluate(target.model, target.tokenizer, drafts,
                      prompts, stop_ids, settings, run.out_dir, run.tracker,
                      encode=lambda messages: prompt_token_ids(target.tokenizer, messages), parameters=parameters,
                      drafter_paths=paths, baselines=tuple(baselines),
                      hybrids=tuple(name for name, draft in drafts.items()
                                    if isinstance(draft, (LookupFirstDraft, MergedDraft))))
    print(report["table_markdown"])
    return {name: {k: m[k] for k in ("block_efficiency", "acceptance_rate", "mbsu", "speedup_median", "lossless")}
            for name, m in report["drafters"].items()} | {"best": report["best"], "num_prompts": len(prompts),
                                                          "num_turns": report["num_turns"]}
