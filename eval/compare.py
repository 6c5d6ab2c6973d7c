"""Compare eval reports side by side: one markdown table over every drafter of every report.

    python -m eval.compare runs/quickstart/a/eval/report.json runs/quickstart/b/eval/report.json [--out cmp.md]

Rows are named `<run>/<drafter>` (the run is the report's grandparent folder). Reports made with different
decoding settings or prompt sets are compared anyway, with the differing settings listed under the table: τ at
γ = 3 and at γ = 5 are different quantities.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from eval.report import EvalReport, markdown_report


def combine(paths: list[Path]) -> dict:
    reports = []
    for path in paths:
        try:
            reports.append(EvalReport.read(path))
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(str(error)) from None
    combined = dict(reports[0].data, drafters={})
    for report in reports:
        run = report.path.resolve().parent.parent.name
        for name, metrics in report.drafters.items():
            combined["drafters"][f"{run}/{name}"] = metrics
    values = [{f"decode.{key}": value for key, value in asdict(r.settings.decode).items()} | {"turns": r.settings.turns}
              for r in reports]
    differing = {key: [v[key] for v in values] for key in values[0]
                 if len({json.dumps(v[key], sort_keys=True) for v in values}) > 1}
    if len({(r.num_prompts, r.num_turns) for r in reports}) > 1:
        differing["prompts (conversations, turns)"] = [(r.num_prompts, r.num_turns) for r in reports]
    combined["differing_settings"] = differing
    return combined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", type=Path, nargs="+")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    combined = combine(args.reports)
    table = markdown_report(combined, label="run/drafter")
    if combined["differing_settings"]:
        table += "\nSettings differ between reports: " + "; ".join(
            f"{key} = {values}" for key, values in combined["differing_settings"].items()) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
