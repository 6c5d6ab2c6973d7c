"""Resumable training state in `checkpoints/step-NNNNNNN/`, written atomically.

A checkpoint holds the engine's state (weights, optimizer, scheduler: `PlainEngine.save` or DeepSpeed's own
format), every rank's RNG states, and `state.json` (step, data position, best-so-far selection, the git commit,
and, given the run's provenance, the resolved config and the target's identity). It is written to `step-N.tmp/` and
renamed only when every rank has finished, so a folder named `step-N` was complete when written; `manifest.json`,
written last, records the size and sha256 of every file in it. `resume=auto` continues from the newest checkpoint
that still matches its manifest: one damaged later (a truncated file, a disk error, a file replaced by hand) is
reported, moved aside to `step-N.damaged/` and skipped, and the next older one is used. Nothing in a checkpoint is
unpickled before it has matched its manifest (DeepSpeed's own files included), and pickles load with
`weights_only=True` only.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from infra import distributed
from infra.integrity import DamagedFilesError, digests, files_in, move_aside, read_record, verify_files
from infra.rundir import git_commit, writing

RESUME_CHOICES = ("auto", "never")


MANIFEST = "manifest.json"
STEP_FOLDER = re.compile(r"step-(\d+)")


class DamagedCheckpointError(DamagedFilesError):
    """A checkpoint whose files no longer match the manifest written with them."""


def checkpoints(root: Path) -> list[Path]:
    """The checkpoint folders under `root` (`step-N`, finished writing), newest first."""
    found = [p for p in root.glob("step-*") if p.is_dir() and STEP_FOLDER.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(STEP_FOLDER.fullmatch(p.name).group(1)), reverse=True)


def checkpoint_files(folder: Path) -> list[str]:
    """Relative paths of every file under `folder` but the manifest itself."""
    return files_in(folder, (MANIFEST,))


def verify(folder: Path) -> dict:
    """The checkpoint's state.json, once every file matches the manifest (size, then sha256); raise
    `DamagedCheckpointError` naming the first file that does not, or the missing manifest or state."""
    manifest_path = folder / MANIFEST
    try:
        expected = read_record(manifest_path).get("files")
        if not isinstance(expected, dict):
            raise DamagedFilesError(f"{manifest_path}: missing or unreadable (no files entry)")
        verify_files(folder, expected, "this checkpoint", leave_out=(MANIFEST,))
    except DamagedFilesError as error:
        raise DamagedCheckpointError(str(error)) from None
    return json.loads((folder / "state.json").read_text())


def newest_good(root: Path, stage: str) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies, with its state.json; each damaged newer one is reported and moved aside
    to `step-N.damaged/` (kept for inspection), so training resumes from the one before it."""
    damaged = []
    for folder in checkpoints(root):
        try:
            state = verify(folder)
        except DamagedCheckpointError as error:
            print(f"[{stage}] checkpoint {folder.name} is damaged and skipped: {error}", flush=True)
            damaged.append(folder)
            continue
        break
    else:
        folder = None
    distributed.barrier()  # every rank has looked before the damaged ones move
    if distributed.is_main():
        for bad in damaged:
            move_aside(bad)
    distributed.barrier()
    if folder is None and damaged:
        raise DamagedCheckpointError(
            f"every checkpoint under {root} is damaged (moved aside to *.damaged: {[d.name for d in damaged]}); "
            f"rerun to start this stage over (resume=auto now finds none), or pass resume=never")
    return None if folder is None else (folder, state)


def resume_or_clear(engine, root: Path, curve_path: Path, resume: str, stage: str, total_steps: int) -> dict:
    """Start of a training stage: load the newest good checkpoint under `root` (resume=auto) and return its state,
    or clear `root` and return {}; the per-step curve keeps only the steps before the one training restarts from."""
    if resume not in RESUME_CHOICES:
        raise ValueError(f"resume={resume!r} is not one of {RESUME_CHOICES}")
    found = newest_good(root, stage) if resume == "auto" else None
    state = {}
    if found is not None:
        folder, state = found
        load(engine, folder, state)
        print(f"[{stage}] resuming from {folder} (step {state['step']} of {total_steps})", flush=True)
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
    with writing(temporary):
        engine.save(temporary)
        torch.save(_picklable(rng_state()), temporary / f"rng_rank{distributed.rank()}.pt")
    distributed.barrier()
    if distributed.is_main():
        made_by = provenance or {}
        payload = state | {"step": step, "world_size": distributed.world_size(), "git_commit": git_commit(),
                           "config": made_by.get("config"), "target": made_by.get("target")}
        (temporary / "state.json").write_text(json.dumps(payload, indent=2, default=str))
        (temporary / MANIFEST).write_text(json.dumps({"files": digests(temporary, checkpoint_files(temporary))},
                                                           indent=2))
        shutil.rmtree(final, ignore_errors=True)
        temporary.replace(final)
        for old in checkpoints(root)[keep:] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def load(engine, folder: Path, state: dict) -> None:
    """Restore the engine and this rank's RNG from `folder`; `state` is what `verify(folder)` returned, so nothing
    is unpickled from a checkpoint that did not match its manifest."""
    if state["world_size"] != distributed.world_size():
        raise ValueError(f"{folder} was written by {state['world_size']} processes, this run has "
                         f"{distributed.world_size()}; resume with the same number, or resume=never")
    engine.load(folder)
    set_rng_state(_unpicklable(torch.load(folder / f"rng_rank{distributed.rank()}.pt", weights_only=True)))


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
