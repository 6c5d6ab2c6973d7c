"""The online stage's report: per-phase tables, recovery after each shift, per-version tables, the plot."""
from __future__ import annotations

import json
from pathlib import Path


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def moving_average(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - width] if i >= width else 0.0)
        out.append(total / min(i + 1, width))
    return out


def phase_table(logs: dict[str, list[dict]], phases: list[str], width: int) -> dict:
    """Per arm and phase: acceptance and τ (pooled over the phase's requests), the moving acceptance at the phase's
    end, and recovery (`recovery`)."""
    frozen = {line["index"]: line["accepted"] for line in logs.get("frozen", [])}
    table = {arm: {} for arm in logs}
    for phase in phases:
        for arm, lines in logs.items():
            own = [line for line in lines if line["phase"] == phase]
            drafted, accepted = sum(l["drafted"] for l in own), sum(l["accepted"] for l in own)
            average = moving_average([l["acceptance"] for l in own], width)
            table[arm][phase] = {"requests": len(own), "acceptance": accepted / max(1, drafted),
                                 "tau": sum(l["emitted"] for l in own) / max(1, sum(l["steps"] for l in own)),
                                 "end_moving_acceptance": average[-1] if average else float("nan"),
                                 "recovery_requests": recovery(own, frozen) if arm != "frozen" else None}
    return table


def recovery(lines: list[dict], frozen: dict[int, int]) -> int | None:
    """Requests into a phase after which the arm stays ahead of the frozen drafter: the first t from which its
    accepted tokens summed from the phase's start, less the frozen drafter's on the same requests, stay above 0 to
    the phase's end; None if it never does (or there is no frozen arm). Paired on the same requests, so the
    requests' own difficulty cancels; a level reached by chance once, which a moving average can cross, does not
    count."""
    if not lines or any(line["index"] not in frozen for line in lines):
        return None
    gain, last_behind = 0, -1
    for t, line in enumerate(lines):
        gain += line["accepted"] - frozen[line["index"]]
        if gain <= 0:
            last_behind = t
    return last_behind + 2 if last_behind + 1 < len(lines) else None


def per_version_table(lines: list[dict]) -> dict:
    """Per drafter version of an arm: requests it served (first and last), acceptance and τ pooled over them."""
    out = {}
    for line in lines:
        entry = out.setdefault(str(line["version"]), {"first": line["index"], "last": line["index"], "requests": 0,
                                                      "drafted": 0, "accepted": 0, "emitted": 0, "steps": 0})
        entry["last"] = line["index"]
        entry["requests"] += 1
        for key in ("drafted", "accepted", "emitted", "steps"):
            entry[key] += line[key]
    for entry in out.values():
        entry["acceptance"] = entry["accepted"] / max(1, entry["drafted"])
        entry["tau"] = entry["emitted"] / max(1, entry["steps"])
    return out


def version_markdown(per_version: dict[str, dict], arm: str = "ours") -> str:
    """The versions of one arm (every arm's are in report.json)."""
    lines = ["| arm | drafter version | requests served (first-last) | acceptance | τ |", "|---|---|---|---|---|"]
    for arm, versions in ((arm, per_version[arm]),) if arm in per_version else ():
        for version, entry in versions.items():
            lines.append(f"| {arm} | {version} | {entry['requests']} ({entry['first']}-{entry['last']}) | "
                         f"{entry['acceptance']:.3f} | {entry['tau']:.3f} |")
    return "\n".join(lines) + "\n"


def markdown(table: dict, phases: list[str], counters: dict[str, dict]) -> str:
    lines = ["| arm | " + " | ".join(f"{p}: acceptance / τ / recovery" for p in phases) +
             " | updates (rolled back) | training s per served token |",
             "|---|" + "---|" * len(phases) + "---|---|"]
    for arm, by_phase in table.items():
        cells = []
        for phase in phases:
            cell = by_phase[phase]
            after = cell["recovery_requests"]
            cells.append(f"{cell['acceptance']:.3f} / {cell['tau']:.3f} / "
                         f"{'—' if arm == 'frozen' else after if after is not None else 'never'}")
        c = counters[arm]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {c['updates']} ({c['rollbacks']}) | "
                     f"{c['train_seconds'] / max(1, c['tokens']):.4f} |")
    return "\n".join(lines) + "\n"


def plot(logs: dict[str, list[dict]], updates: dict[str, list[dict]], phases: list[str], width: int,
         path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for arm, lines in logs.items():
        x = [line["index"] for line in lines]
        for axis, key in zip(axes, ("acceptance", "tau")):
            axis.plot(x, moving_average([line[key] for line in lines], width), label=arm)
        for update in updates.get(arm, []):
            if update.get("published") is False:
                axes[0].axvline(update["after_request"], color="red", alpha=0.3, linewidth=0.8)
    boundaries = [next(l["index"] for l in next(iter(logs.values())) if l["phase"] == p) for p in phases]
    for axis in axes:
        for at, phase in zip(boundaries, phases):
            axis.axvline(at, color="grey", linestyle="--", linewidth=0.7)
            axis.text(at + 0.5, axis.get_ylim()[1], phase, va="top", fontsize=8, rotation=90)
        axis.legend(loc="lower right")
    axes[0].set(ylabel=f"acceptance (moving avg, {width} requests)")
    axes[1].set(ylabel="τ (moving avg)", xlabel="request in the stream (red: a rolled-back update)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
