"""Compare eval reports side by side: one markdown table over every drafter of every report.

    python -m eval.compare runs/quickstart/a/eval/report.json runs/quickstart/b/eval/report.json [--out cmp.md]

Rows are named `<run>/<drafter>` (the run is the report's grandparent folder). Reports made with different
decoding settings or prompt sets are compared anyway, with the differing settings listed under the table: τ at
γ = 3 and at γ = 5 are different quantities.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from eval.speculative import markdown_report
from models.sampling import sampling_in


def combine(paths: list[Path]) -> dict:
    reports = []
    for path in paths:
        try:
            reports.append((path, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"{path}: not a readable eval report ({error})")
        if "drafters" not in reports[-1][1]:
            raise SystemExit(f"{path}: not an eval report (no 'drafters' key)")
    first = reports[0][1]
    combined = dict(first, drafters={})
    for path, report in reports:
        run = path.resolve().parent.parent.name
        for name, metrics in report["drafters"].items():
            combined["drafters"][f"{run}/{name}"] = metrics
    keys = ("gamma", "tree", "sampling", "max_new_tokens", "turns", "confidence_threshold")
    values = [dict(r["settings"], sampling=sampling_in(r["settings"])) for _, r in reports]
    differing = {key: [v.get(key) for v in values] for key in keys
                 if len({json.dumps(v.get(key), sort_keys=True) for v in values}) > 1}
    if len({(r["num_prompts"], r["num_turns"]) for _, r in reports}) > 1:
        differing["prompts (conversations, turns)"] = [(r["num_prompts"], r["num_turns"]) for _, r in reports]
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
