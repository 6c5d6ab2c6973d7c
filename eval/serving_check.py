"""Serving-side acceptance beside ours: replay the eval's exact prompts through vLLM with an exported drafter.

    .venv-vllm/bin/python -m eval.serving_check runs/quickstart/default/export/drafter
    .venv-vllm/bin/python -m eval.serving_check runs/eagle3/default/export/drafter-eagle3 .../drafter-speculators
    .venv-vllm/bin/python -m eval.serving_check --report runs/peers/default/eval/report.json \
        peers/speculators/checkpoint=speculators --ngram

Reads the run's `eval/report.json` (every prompt's token ids, the target's plain answers, γ, the stop ids) and the
export's `meta.json` (which drafter, which target), then runs vLLM on the same token prompts, greedy: plain once,
and speculative once per export folder (folders of several runs whose evals replayed the same prompts can share the
plain run), with `{"method": M, "model": EXPORT_DIR, "num_speculative_tokens": γ}`
(M: `draft_model` for an hf export, `eagle3` for the eagle3 and speculators formats). It checks
that vLLM's speculative output equals its plain output token for token (and reports how often vLLM's plain output
equals our eval's plain answers), and puts vLLM's spec-decode counters (mean acceptance length, acceptance per
position: accepted at i / drafts, vLLM's form) beside our eval's τ and per-position acceptance for that drafter.
Writes `EXPORT_DIR.serving_check.json` and `.md` beside each export and adds vLLM's table to the export's model card.

A bare folder (another trainer's checkpoint, or any EAGLE-3 / speculators folder outside a run's export stage)
is checked against an eval report given with `--report runs/<experiment>/<run>/eval/report.json`, as the row
that eval decoded it as: `FOLDER=ROW` (`+eval.drafters.ROW=FOLDER`; ROW defaults to the folder's name); exports
of runs given beside it still read their own run's report. `--ngram`
also runs vLLM's own training-free `method: ngram` (prompt lookup, `prompt_lookup_min..max` as our eval's
`prompt_lookup` row matches) on the same prompts, beside that row of ours: what a vLLM user compares a trained
drafter with. Exit status 1 when vLLM's speculative output is not lossless. Runs where vLLM is installed (on CPU:
`.venv-vllm`, built by `.ci/setup-vllm`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def load_inputs(export_dir: Path, report_path: Path | None = None, row: str | None = None) -> dict:
    """What the check replays: the drafter's row and target, the eval's prompts and settings. An export of a run
    finds them beside it (the export stage's meta.json, the run's eval report); a bare folder, or any folder given
    a `row`, reads them from `report_path` (an eval report) as row `row` (default: the folder's name)."""
    stage_dir = export_dir.parent
    if report_path is None or (row is None and (stage_dir / "meta.json").exists()):
        meta_path, report_path = stage_dir / "meta.json", stage_dir.parent / "eval" / "report.json"
        for path, what in ((meta_path, "the export stage's meta.json"), (report_path, "the run's eval report")):
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing: {export_dir} must be an export of a draftsmith run "
                                        f"that also ran eval ({what}), or pass --report EVAL_REPORT with it")
        drafter = json.loads(meta_path.read_text())["summary"]["drafter"]
    else:
        drafter = row or export_dir.name
    inputs = eval_inputs(report_path)
    if drafter not in inputs["rows"]:
        raise ValueError(f"the drafter {drafter!r} is not a row of {report_path} (rows: {sorted(inputs['rows'])}); "
                         f"evaluate it first (+eval.drafters.{drafter}={export_dir}) or name its row: FOLDER=ROW")
    return inputs | {"drafter": drafter, "ours": inputs["rows"][drafter]}


def eval_inputs(report_path: Path) -> dict:
    """An eval report's prompts, settings and rows, and its target (the config in the eval stage's meta.json)."""
    meta_path = report_path.parent / "meta.json"
    for path in (report_path, meta_path):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: name an eval stage's report.json "
                                    f"(runs/<experiment>/<run>/eval/report.json), with its meta.json beside it")
    report = json.loads(report_path.read_text())
    if "prompts" not in report:
        raise ValueError(f"{report_path} predates serving checks (no prompt token ids); re-run the eval stage")
    decode = report["settings"].get("decode")
    if not isinstance(decode, dict):
        raise ValueError(f"{report_path} was written with flat eval settings (before eval.decode); re-run the eval "
                         f"stage")
    if decode["sampling"]["temperature"] != 0:
        raise ValueError("the serving check replays greedy evals only (eval.decode.sampling.temperature=0)")
    return {"rows": report["drafters"], "report_dir": report_path.parent, "prompts": report["prompts"],
            "gamma": decode["gamma"], "tree": decode["tree"],
            "max_new_tokens": decode["max_new_tokens"], "stop_ids": report["stop_ids"],
            "config": json.loads(meta_path.read_text())["config"]}


def target_dir(config: dict) -> Path:
    from hydra.utils import instantiate

    from models.loading import resolve_model_dir

    spec = instantiate(config["target"], _convert_="all")
    return resolve_model_dir(spec, Path(config["cache_dir"]))[0]


def generate(target: Path, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int],
             speculative: dict | None) -> tuple[list[list[int]], dict, float]:
    """vLLM's greedy outputs (stop ids removed), its spec-decode counters, and the generation seconds."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    engine = LLM(**engine_settings(target, prompts, max_new_tokens, speculative), disable_log_stats=False,
                 **({"speculative_config": speculative} if speculative else {}))
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=stop_ids)
    started = time.perf_counter()
    results = engine.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - started
    outputs = [[t for t in r.outputs[0].token_ids if t not in stop_ids] for r in results]
    counters = {}
    for metric in engine.get_metrics():
        if metric.name.startswith("vllm:spec_decode_"):
            counters[metric.name.removeprefix("vllm:spec_decode_")] = getattr(metric, "values", None) or metric.value
    del engine
    return outputs, counters, seconds


def engine_settings(target: Path, prompts: list[list[int]], max_new_tokens: int,
                    speculative: dict | None = None) -> dict:
    """The vLLM engine both sides run on (plain and speculative alike): fp32, eager, room for the longest prompt;
    plus what `speculative`'s method needs for this target (models.export.vllm_draft_model_flags), which the model
    card's serving line also carries."""
    settings = dict(model=str(target), dtype="float32", enforce_eager=True, seed=0, max_num_seqs=8,
                    max_model_len=max(map(len, prompts)) + max_new_tokens + 16)
    if speculative and speculative["method"] == "draft_model":
        from models.export import vllm_draft_model_flags

        settings |= vllm_draft_model_flags(target)
    return settings


def speculative_config(export_dir: Path, gamma: int) -> dict:
    return {"method": method(export_dir), "model": str(export_dir), "num_speculative_tokens": gamma}


def serving_metrics(counters: dict) -> dict:
    """vLLM's own definitions (vllm/v1/spec_decode/metrics.py): mean acceptance length 1 + accepted / drafts,
    acceptance per position accepted_i / drafts, acceptance rate accepted / drafted."""
    drafts, drafted, accepted = (counters.get(k, 0) for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"))
    per_position = counters.get("num_accepted_tokens_per_pos", [])
    return {"drafts": drafts, "draft_tokens": drafted, "accepted_tokens": accepted,
            "mean_acceptance_length": 1 + accepted / max(1, drafts), "acceptance_rate": accepted / max(1, drafted),
            "accepted_per_position": [a / max(1, drafts) for a in per_position]}


def method(export_dir: Path) -> str:
    """vLLM's speculative method for an export folder: eagle3 for the EAGLE-3 and speculators layouts."""
    config = json.loads((export_dir / "config.json").read_text())
    eagle3 = "speculators_config" in config or any("Eagle3" in a for a in config.get("architectures") or [])
    return "eagle3" if eagle3 else "draft_model"


REPLAYED = ("prompts", "gamma", "max_new_tokens", "stop_ids")


def ngram_config(gamma: int) -> dict:
    """vLLM's prompt lookup with our eval's `prompt_lookup` n-gram range (models.lookup.LookupSpec's defaults)."""
    from models.lookup import BASELINES

    spec = BASELINES["prompt_lookup"]
    return {"method": "ngram", "num_speculative_tokens": gamma, "prompt_lookup_min": spec.min_ngram,
            "prompt_lookup_max": spec.max_ngram}


class UnservableError(ValueError):
    """The installed vLLM cannot serve this way of drafting for this target."""


def eagle3_refusal(target: Path) -> str | None:
    """Why the installed vLLM cannot serve `method: eagle3` with this target (its model class must hand the drafter
    the target's hidden states: vLLM's SupportsEagle3), or None where it can."""
    import vllm
    from vllm.model_executor.models.interfaces import supports_eagle3
    from vllm.model_executor.models.registry import ModelRegistry

    architectures = json.loads((target / "config.json").read_text()).get("architectures") or []
    for architecture in architectures:
        model_class = ModelRegistry._try_load_model_cls(architecture)
        if model_class is not None and supports_eagle3(model_class):
            return None
    return (f"vLLM {vllm.__version__} cannot serve method eagle3 for a {' / '.join(architectures) or 'target'} "
            f"target: its model class does not give a drafter the target's hidden states (SupportsEagle3); "
            f"our eval's decoder runs this drafter, and a standalone (hf) export serves in vLLM as draft_model")


def check(export_dirs: list[Path], report: Path | None = None, rows: list[str | None] | None = None,
          ngram: bool = False) -> list[dict]:
    """One plain vLLM run, then one speculative run per folder (and one of vLLM's `ngram` with `ngram`). Folders
    may come from different runs (and drafters) as long as their evals replayed the same prompts with the same
    settings and target; with `report`, every folder is checked against that eval report, as row `rows[i]`."""
    rows = rows or [None] * len(export_dirs)
    inputs = [load_inputs(export_dir, report, row) for export_dir, row in zip(export_dirs, rows)]
    target = target_dir(inputs[0]["config"])
    for export_dir, other in zip(export_dirs[1:], inputs[1:]):
        differs = [key for key in REPLAYED if other[key] != inputs[0][key]]
        if differs or target_dir(other["config"]) != target:
            raise ValueError(f"{export_dir} was evaluated on other {differs or ['target']} than {export_dirs[0]}; "
                             f"check them one at a time")
    for export_dir in export_dirs:
        if method(export_dir) == "eagle3" and (refusal := eagle3_refusal(target)):
            raise UnservableError(f"{export_dir}: {refusal}")
    prompts = [p["prompt_ids"] for p in inputs[0]["prompts"]]
    plain, _, plain_seconds = generate(target, prompts, inputs[0]["max_new_tokens"], inputs[0]["stop_ids"], None)
    results = [compare(export_dir, each, speculative_config(export_dir, each["gamma"]), target, plain, plain_seconds)
               for export_dir, each in zip(export_dirs, inputs)]
    if ngram:  # beside `report`'s row prompt_lookup (else the first folder's eval): eval/vllm-ngram.serving_check.*
        first = eval_inputs(report) if report else inputs[0]
        lookup = dict(first, drafter="prompt_lookup", ours=first["rows"].get("prompt_lookup"))
        out = first["report_dir"] / "vllm-ngram"
        results.append(compare(out, lookup, ngram_config(first["gamma"]), target, plain, plain_seconds))
    return results


def compare(export_dir: Path, inputs: dict, speculative: dict, target: Path, plain: list[list[int]],
            plain_seconds: float) -> dict:
    """vLLM with `speculative` against its plain run, beside our eval's row `inputs['drafter']` (None: no row).
    Writes `export_dir`.serving_check.json/.md beside `export_dir` and vLLM's table into its model card."""
    prompts = [p["prompt_ids"] for p in inputs["prompts"]]
    ours_plain = [[t for t in p["reference_ids"] if t not in inputs["stop_ids"]] for p in inputs["prompts"]]
    spec, counters, spec_seconds = generate(target, prompts, inputs["max_new_tokens"], inputs["stop_ids"],
                                            speculative)
    mismatched = [p["id"] for p, a, b in zip(inputs["prompts"], spec, plain) if a != b]
    tokens = sum(map(len, spec))
    ours = inputs["ours"]
    result = {
        "export": str(export_dir), "drafter": inputs["drafter"], "target": str(target),
        "speculative_config": speculative, "prompts": len(prompts), "max_new_tokens": inputs["max_new_tokens"],
        "our_eval_tree": inputs["tree"],
        "lossless": not mismatched, "speculative_differs_from_plain": mismatched,
        "vllm_plain_equals_our_plain": sum(a == b for a, b in zip(plain, ours_plain)),
        "vllm": serving_metrics(counters) | {"tokens": tokens, "plain_tokens_per_s": sum(map(len, plain)) /
                                             plain_seconds, "speculative_tokens_per_s": tokens / spec_seconds},
        "ours": ours and {k: ours[k] for k in ("block_efficiency", "acceptance_rate", "accepted_per_position")},
    }
    result["vllm"]["speedup"] = result["vllm"]["speculative_tokens_per_s"] / result["vllm"]["plain_tokens_per_s"]
    result["table_markdown"] = table(result)
    (export_dir.parent / f"{export_dir.name}.serving_check.json").write_text(json.dumps(result, indent=2))
    (export_dir.parent / f"{export_dir.name}.serving_check.md").write_text(result["table_markdown"])
    add_to_card(export_dir / "README.md", result["table_markdown"])
    return result


CARD_SECTION = "## Measured in vLLM"


def add_to_card(card: Path, table_markdown: str) -> None:
    """The model card gets vLLM's acceptance beside ours (replacing an earlier check's section)."""
    if not card.exists():
        return
    text = card.read_text()
    if CARD_SECTION in text:
        start = text.index(CARD_SECTION)
        following = text.find("\n## ", start + len(CARD_SECTION))
        text = text[:start] + (text[following + 1:] if following != -1 else "")
    card.write_text(text.rstrip("\n") + f"\n\n{CARD_SECTION}\n\n`python -m eval.serving_check` replayed the eval's "
                    f"prompts through vLLM with this folder:\n\n{table_markdown}")


def table(result: dict) -> str:
    ours, vllm = result["ours"], result["vllm"]

    def positions(values: list[float]) -> str:
        return " / ".join(f"{v:.2f}" for v in values)

    γ = result["speculative_config"]["num_speculative_tokens"]
    our_row = (f"| draftsmith eval | {ours['block_efficiency']:.3f} | {ours['acceptance_rate']:.3f} | "
               f"{positions(ours['accepted_per_position'])} | – | yes (checked by eval) |" if ours else
               "| draftsmith eval | – (no such row in the eval) | – | – | – | – |")
    return "\n".join([
        f"Drafter `{result['drafter']}` ({result['export']}), γ = {γ}, greedy, {result['prompts']} prompts of our "
        f"eval, up to {result['max_new_tokens']} new tokens, fp32.", "",
        "| where | τ / mean acceptance length | acceptance rate | accepted per position | tokens/s (spec / plain) "
        "| lossless |", "|---|---|---|---|---|---|", our_row,
        f"| vLLM `{result['speculative_config']['method']}` | {vllm['mean_acceptance_length']:.3f} | {vllm['acceptance_rate']:.3f} | "
        f"{positions(vllm['accepted_per_position'])} | {vllm['speculative_tokens_per_s']:.1f} / "
        f"{vllm['plain_tokens_per_s']:.1f} ({vllm['speedup']:.2f}×) | "
        f"{'yes' if result['lossless'] else 'NO: ' + ', '.join(result['speculative_differs_from_plain'])} |", "",
        f"vLLM's plain greedy output equals our eval's plain answer on {result['vllm_plain_equals_our_plain']} of "
        f"{result['prompts']} prompts" + ("." if result["vllm_plain_equals_our_plain"] == result["prompts"] else
                                          " (the others part at a near-tie of the two implementations' fp32 "
                                          "arithmetic, so from there the two runs decode different text)."),
        ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dirs", nargs="+",
                        help="runs/<experiment>/<run_name>/export/<folder>, one or more evaluated on the same prompts; "
                             "with --report, any EAGLE-3 / speculators / hf folder as FOLDER or FOLDER=ROW")
    parser.add_argument("--report", type=Path, default=None,
                        help="an eval report.json whose rows the (bare) folders were decoded as")
    parser.add_argument("--ngram", action="store_true", help="also vLLM's own method: ngram on the same prompts")
    arguments = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU: plenty for eval prompts
    folders, rows = zip(*(((item.split("=", 1) + [None])[:2]) for item in arguments.export_dirs))
    if arguments.report is None and any(rows):
        parser.error("FOLDER=ROW names a row of an eval report: pass --report")
    try:
        results = check([Path(folder).resolve() for folder in folders],
                        arguments.report and arguments.report.resolve(), list(rows), arguments.ngram)
    except UnservableError as error:
        print(f"[draftsmith] error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    for result in results:
        print(result["table_markdown"])
    raise SystemExit(0 if all(result["lossless"] for result in results) else 1)


if __name__ == "__main__":
    main()
