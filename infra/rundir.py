"""Run directories: `runs/<experiment>/<run_name>/<stage>/`, written atomically and explaining themselves.

A stage writes into `<stage>.partial/`; only when it has finished is `meta.json` (resolved config, git commit,
target identity, the stage's fingerprint and summary) written and the folder renamed to `<stage>/`. So a
folder named after a stage is always complete. A leftover `.partial` made with the same settings is kept, so a
stage that commits its work in pieces (data_gen shards) resumes; one made with other settings is cleared.

A stage folder has one writer: `train/run.py` holds `exclusive(run_dir/.locks/<stage>.lock)` (an `flock`, released by
the kernel when the process dies, kill -9 included) from the check that the stage must run until its commit, so a
second identical command stops with `RunLocked` instead of renaming its `.partial` over the first one's.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def git_commit(repo_dir: Path = REPO_ROOT) -> str:
    """HEAD of the draftsmith checkout, with `-dirty` when tracked files differ from it, as it was at this
    process's first call (`train/run.py` calls it at start): a commit made while a long run works is not the code
    that run is running."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + ("-dirty" if dirty else "")


def fingerprint(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(tree: object, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): tree}


def write_atomically(path: Path, text: str) -> None:
    """Write a small file so that readers in other processes see the old content or the new, never half of it."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    temporary.replace(path)


class StageMismatchError(RuntimeError):
    pass


class NotEnoughSpace(OSError):
    """A stage's estimate of what it will write exceeds the free space (the message says both)."""


DISK_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EIO)
# how torch and safetensors report a write that the disk refused: a RuntimeError or SafetensorError without a path
FULL_DISK_SIGNS = ("No space left on device", "Disk quota exceeded", "unexpected pos", "failed writing file")


def as_disk_error(error: BaseException, path: Path) -> OSError | None:
    """`error` as the OSError it is when a write into `path` failed for want of space, rights or a working disk
    (naming `path` where it names none: torch's and safetensors' own errors carry no path), else None."""
    if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
        return error if error.filename else OSError(error.errno, error.strerror, str(path))
    text = str(error)
    sign = next((sign for sign in FULL_DISK_SIGNS if sign in text), None)
    if sign is None or isinstance(error, OSError):
        return None
    first = " ".join(text.split())[:160]
    quota = "quota" in sign
    return OSError(errno.EDQUOT if quota else errno.ENOSPC,
                   f"{'Disk quota exceeded' if quota else 'No space left on device'} ({type(error).__name__}: {first})",
                   str(path))


@contextlib.contextmanager
def writing(path: Path):
    """Within the block, a write refused by the disk is an OSError naming `path` (`as_disk_error`)."""
    try:
        yield
    except Exception as error:
        disk = as_disk_error(error, path)
        if disk is None or disk is error:
            raise
        raise disk from error


class RunLocked(RuntimeError):
    """Another live process holds the lock of the output this process wants to write."""


@contextlib.contextmanager
def exclusive(lock_path: Path, what: str, wait: bool = False):
    """Hold `lock_path` (an flock) for the block, or raise `RunLocked` at once naming the process that holds it
    (`wait=True`: wait for it instead). The lock dies with its holder, so a crashed run never blocks the next."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that did not say who it is"
        handle.close()
        raise RunLocked(f"{what} is being written by another process ({holder}; lock {lock_path}). Wait for it to "
                        f"finish, or pass another run_name=...") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                 f"{' '.join(sys.argv)[:300]}\n")
    handle.flush()
    try:
        yield
    finally:
        handle.close()  # closing the only descriptor releases the flock


@dataclass
class StageDir:
    run_dir: Path
    stage: str

    @property
    def final(self) -> Path:
        return self.run_dir / self.stage

    @property
    def partial(self) -> Path:
        return self.run_dir / f"{self.stage}.partial"

    def lock(self, name: str | None = None):
        """Exclusive right to write this stage (or its part `name`, e.g. one data_gen worker's shards)."""
        name = name or self.stage
        return exclusive(self.run_dir / ".locks" / f"{name}.lock", f"{self.final} ({name})")

    def meta(self) -> dict | None:
        path = self.final / "meta.json"
        return json.loads(path.read_text()) if path.exists() else None

    def check_reusable(self, settings: dict, overwrite: bool) -> bool:
        """True when a complete output made with the same settings exists; raise if it was made otherwise."""
        meta = self.meta()
        if meta is None:
            return False
        if meta["fingerprint"] == fingerprint(settings):
            return True
        if overwrite:
            return False
        old, new = flatten(meta["settings"]), flatten(json.loads(json.dumps(settings, default=str)))
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))[:8]
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise StageMismatchError(
            f"{self.final} was made with other settings ({details}). Pass a new run_name=..., or overwrite=true "
            f"to redo this stage and those after it.")

    def begin(self, settings: dict) -> Path:
        """The `.partial` folder to write into: kept if it was started with these settings, else emptied.

        Processes that write disjoint parts of one stage (data_gen's workers) begin it at the same moment: the
        check, the emptying and the stamp happen under one lock, so no process empties a folder another has just
        made and not yet stamped."""
        stamp = self.partial / "settings.fingerprint"
        with exclusive(self.run_dir / ".locks" / f"{self.stage}.begin.lock", f"{self.partial} (setting up)",
                       wait=True):
            if self.partial.exists() and (not stamp.exists() or stamp.read_text() != fingerprint(settings)):
                shutil.rmtree(self.partial)
            self.partial.mkdir(parents=True, exist_ok=True)
            if not stamp.exists():
                write_atomically(stamp, fingerprint(settings))
        return self.partial

    def discard_unstarted(self) -> None:
        """Remove the `.partial` folder if it holds nothing but what `begin` put there (its settings stamp)."""
        if self.partial.is_dir() and {p.name for p in self.partial.iterdir()} <= {"settings.fingerprint"}:
            shutil.rmtree(self.partial, ignore_errors=True)

    def commit(self, settings: dict, resolved_config: dict, target_identity: dict, summary: dict) -> Path:
        meta = {
            "stage": self.stage,
            "fingerprint": fingerprint(settings),
            "settings": json.loads(json.dumps(settings, default=str)),
            "config": resolved_config,
            "git_commit": git_commit(),
            "target": target_identity,
            "summary": summary,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (self.partial / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        if self.final.exists():
            shutil.rmtree(self.final)
        self.partial.replace(self.final)
        return self.final


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:,.1f} {unit}"
        count /= 1024
    return f"{count:,.1f} TiB"
