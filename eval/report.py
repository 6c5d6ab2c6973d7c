"""An eval stage's report: `report.json` read back typed (`EvalReport`), and its markdown table.

`report.json` holds the settings the eval ran with (`eval.settings.EvalSettings`, `decode` nested), every row's
metrics, the prompts as decoded and the target's plain answers. What reads a report back (the export stage's model
card, `eval.compare`, sweeps) reads it through `EvalReport.read`, which rebuilds those settings as the class they
were made from: a report that does not fit today's settings (an older layout, a hand edit) is refused with its path,
never read with a guessed default.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from eval.settings import EvalSettings

REPORT_FILE = "report.json"
REQUIRED = ("settings", "drafters", "best", "drafter_paths", "num_prompts", "num_turns", "dtype", "table_markdown")


@dataclass(frozen=True)
class EvalReport:
    path: Path                    # the report.json read
    settings: EvalSettings        # what the eval ran with
    drafters: dict[str, dict]     # row name -> its metrics (block_efficiency, accepted_per_position, ...)
    best: str                     # the trained row the export stage ships by default
    drafter_paths: dict[str, str]  # row name -> where it came from
    baselines: tuple[str, ...]    # the training-free rows
    hybrids: tuple[str, ...]      # the trained rows behind or merged with a lookup
    num_prompts: int              # conversations
    num_turns: int                # prompts decoded (every user turn of every conversation)
    dtype: str
    table_markdown: str
    data: dict                    # the whole file, for what has no field here (prompts, per-prompt rows)

    @classmethod
    def read(cls, path: Path | str) -> "EvalReport":
        """The report in `path` (an eval stage's folder, or its report.json)."""
        path = Path(path)
        file = path / REPORT_FILE if path.is_dir() else path
        try:
            data = json.loads(file.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{file}: no eval report there (an eval stage's folder holds report.json)"
                                    ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{file}: not a readable eval report ({error})") from None
        missing = [key for key in REQUIRED if not isinstance(data, dict) or key not in data]
        if missing:
            raise ValueError(f"{file}: not an eval report (no {missing}); an eval stage's report.json has them")
        recorded = dict(data["settings"])
        unknown = sorted(set(recorded) - {f.name for f in dataclasses.fields(EvalSettings)})
        if unknown:
            raise ValueError(f"{file}: written with eval settings this draftsmith does not have ({unknown}; "
                             f"γ, tree, sampling, max_new_tokens, batch_size and seed are under eval.decode): "
                             f"rerun its eval stage")
        try:
            settings = EvalSettings(**recorded)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{file}: its recorded settings do not build ({error}); rerun its eval stage") from None
        return cls(file, settings, data["drafters"], data["best"], data["drafter_paths"],
                   tuple(data.get("baselines", ())), tuple(data.get("hybrids", ())), data["num_prompts"],
                   data["num_turns"], data["dtype"], data["table_markdown"], data)

    @property
    def lossless_check(self) -> str:
        """What the eval compared to call its rows lossless, in its own words (the first row that says)."""
        return next((m["lossless_check"] for m in self.drafters.values() if "lossless_check" in m),
                    "greedy outputs were compared token for token with plain greedy decoding")


LOSSLESS_CELL = {True: "yes", False: "NO", None: "not checked (sampled)"}


SUMMARY_COLUMNS = ["drafter", "block_efficiency", "acceptance_rate", "c_measured", "v_measured", "mbsu",
                   "predicted_speedup",
                   "speedup_median", "lossless"]


def summary_rows(report: dict) -> list[list]:
    return [[n] + [m[c] for c in SUMMARY_COLUMNS[1:]] for n, m in report["drafters"].items()]


def markdown_report(report: dict, label: str = "") -> str:
    """The overall table (one row per drafter), then τ per category."""
    settings = report["settings"]
    decode = settings["decode"]
    depth = len(decode["tree"]) or decode["gamma"]
    head = (f"| {label or 'drafter'} | τ | acceptance | accepted per position 1..{depth} (uncond. / cond.) | c meas. "
            f"| v meas. | MBSU | predicted | wall speedup (median, 95% CI) | lossless |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in report["drafters"].items():
        unconditional = "/".join(f"{v:.2f}" for v in m["accepted_per_position"])
        conditional = "/".join(f"{v:.2f}" for v in m["conditional_acceptance_per_position"])
        low, high = m["speedup_interval_95"]
        verify = m["v_measured"]
        shown = f"{name} (training-free)" if name in report.get("baselines", ()) else name
        lines.append(f"| {shown} | {m['block_efficiency']:.3f} | {m['acceptance_rate']:.3f} | {unconditional} ; "
                     f"{conditional} | {m['c_measured']:.3f} | {verify:.2f} | {m['mbsu']:.2f} | "
                     f"{m['predicted_speedup']:.2f}× "
                     f"| {m['speedup_median']:.2f}× [{low:.2f}, {high:.2f}] | {LOSSLESS_CELL[m['lossless']]} |")
    widths = report["drafters"]
    if widths:
        lines += ["", "Tokens per verification forward (mean) and, where below 1, the share of steps the trained "
                  "drafter ran: " + ", ".join(
                      f"{n} {m['mean_verified_per_step']:.1f}" + (f" (drafter ran {m['drafter_run_fraction']:.0%})"
                                                                  if m["drafter_run_fraction"] < 1 else "")
                      for n, m in widths.items()) + "."]
    categories = sorted({c for m in report["drafters"].values() for c in m["per_category"]})
    if categories and categories != [""]:
        lines += ["", "τ per category:", "", "| drafter | " + " | ".join(c or "-" for c in categories) + " |",
                  "|---|" + "---|" * len(categories)]
        for name, m in report["drafters"].items():
            lines.append(f"| {name} | " + " | ".join(f"{m['per_category'][c]['block_efficiency']:.3f}"
                                                     if c in m["per_category"] else "" for c in categories) + " |")
    temperature = decode["sampling"]["temperature"]
    mode = "greedy" if temperature == 0 else f"T={temperature}"
    shape = f"tree {decode['tree']}" if decode["tree"] else f"γ={decode['gamma']}"
    lines += ["", f"{report['num_turns']} prompts ({report['num_prompts']} conversations), {mode}, {shape}, "
                  f"up to {decode['max_new_tokens']} new tokens, {report['dtype']}."]
    plain = report["plain"]
    lines[-1] += (f" Wall times interleaved (each prompt decoded plainly and by every drafter in turn): plain "
                  f"{plain['tokens_per_second']:.1f} tok/s, {plain['drift']:.2f}× the time of the first plain pass.")
    return "\n".join(lines) + "\n"
