"""Resumable training state in `checkpoints/step-NNNNNNN/`, written atomically.

A checkpoint holds the engine's state (weights, optimizer, scheduler: `PlainEngine.save` or DeepSpeed's own
format), every rank's RNG states, and `state.json` (step, data position, best-so-far selection, the git commit,
and, given the run's provenance, the resolved config and the target's identity). It is written to `step-N.tmp/` and renamed only when every rank has finished, so a
folder named `step-N` is always complete; `latest()` ignores anything else. `resume=auto` continues from it.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from infra import distributed
from infra.rundir import git_commit

RESUME_CHOICES = ("auto", "never")


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, if any."""
    complete = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
                and (p / "state.json").exists()]
    return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)


def resume_or_clear(engine, root: Path, curve_path: Path, resume: str, stage: str, total_steps: int) -> dict:
    """Start of a training stage: load the newest checkpoint under `root` (resume=auto) and return its state, or
    clear `root` and return {}; the per-step curve keeps only the steps before the one training restarts from."""
    if resume not in RESUME_CHOICES:
        raise ValueError(f"resume={resume!r} is not one of {RESUME_CHOICES}")
    found = latest(root) if resume == "auto" else None
    state = {}
    if found is not None:
        state = load(engine, found)
        print(f"[{stage}] resuming from {found} (step {state['step']} of {total_steps})", flush=True)
    elif distributed.is_main():
        shutil.rmtree(root, ignore_errors=True)
    if distributed.is_main():
        start_step = state.get("step", 0)
        kept = [line for line in (curve_path.read_text().splitlines() if curve_path.exists() else [])
                if json.loads(line)["step"] < start_step]
        curve_path.write_text("".join(line + "\n" for line in kept))
    return state


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, root: Path, step: int, state: dict, keep: int, provenance: dict | None = None) -> Path:
    """Write the checkpoint for `step` (every rank calls this); keep the newest `keep` of them. `provenance`
    ({"config", "target", ...}, infra.stage.StageRun.provenance) goes into state.json."""
    final = root / f"step-{step:07d}"
    temporary = final.with_name(final.name + ".tmp")
    if distributed.is_main():
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    distributed.barrier()
    engine.save(temporary)
    torch.save(_picklable(rng_state()), temporary / f"rng_rank{distributed.rank()}.pt")
    distributed.barrier()
    if distributed.is_main():
        made_by = provenance or {}
        payload = state | {"step": step, "world_size": distributed.world_size(), "git_commit": git_commit(),
                           "config": made_by.get("config"), "target": made_by.get("target")}
        (temporary / "state.json").write_text(json.dumps(payload, indent=2, default=str))
        shutil.rmtree(final, ignore_errors=True)
        temporary.replace(final)
        complete = sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp"))
        for old in complete[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def load(engine, folder: Path) -> dict:
    """Restore the engine and this rank's RNG from `folder`; returns its state.json."""
    state = json.loads((folder / "state.json").read_text())
    if state["world_size"] != distributed.world_size():
        raise ValueError(f"{folder} was written by {state['world_size']} processes, this run has "
                         f"{distributed.world_size()}; resume with the same number, or resume=never")
    engine.load(folder)
    set_rng_state(_unpicklable(torch.load(folder / f"rng_rank{distributed.rank()}.pt", weights_only=True)))
    return state


def _picklable(state: dict) -> dict:
    """RNG states as tensors and plain lists, which `torch.load(weights_only=True)` accepts."""
    version, internal, gauss = state["python"]
    kind, keys, position, has_gauss, cached = state["numpy"]
    converted = {"python": [version, list(internal), gauss], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)),
                                                                         position, has_gauss, cached],
                 "torch": state["torch"]}
    if "cuda" in state:
        converted["cuda"] = state["cuda"]
    return converted


def _unpicklable(state: dict) -> dict:
    version, internal, gauss = state["python"]
    kind, keys, position, has_gauss, cached = state["numpy"]
    restored = {"python": (version, tuple(internal), gauss),
                "numpy": (kind, keys.numpy().astype(np.uint32), position, has_gauss, cached), "torch": state["torch"]}
    if "cuda" in state:
        restored["cuda"] = state["cuda"]
    return restored
