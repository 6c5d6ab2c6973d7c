"""Files that must read back as they were written: every cache and checkpoint records the size and sha256 of its
files when it writes them, and checks both before it reads them again.

A folder that fails names its first bad file (missing, the wrong size, other bytes, or one it never wrote); its
owner then moves it aside to `<name>.damaged/` (kept for inspection, `move_aside`) and makes it again: a training
checkpoint falls back to the one before it, a feature cache and the compiled kernel are rebuilt, a dequantized target
is converted again. Hashing reads each file once (0.43 GB/s here: 0.8 s for the quickstart's 331 MB feature
cache), against the minutes that making or using the file costs.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path


class DamagedFilesError(RuntimeError):
    """Files that no longer match the sizes and digests recorded when they were written."""


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB weights do not need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def files_in(folder: Path, leave_out: tuple[str, ...] = ()) -> list[str]:
    """Relative paths of every file under `folder` but those named in `leave_out` (a manifest, a lock)."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")
                  if p.is_file() and p.name not in leave_out)


def digests(folder: Path, names: list[str]) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of the files `names` under `folder`."""
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)} for name in names}


def read_record(path: Path) -> dict:
    """The JSON record (manifest) at `path`; `DamagedFilesError` naming it when it is missing or unreadable."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise DamagedFilesError(f"{path}: missing or unreadable ({type(error).__name__}: {error})") from None
    if not isinstance(record, dict):
        raise DamagedFilesError(f"{path}: missing or unreadable (not a JSON object)")
    return record


def verify_files(folder: Path, expected: dict[str, dict], written_with: str,
                 leave_out: tuple[str, ...] | None = None) -> None:
    """Raise `DamagedFilesError` naming the first file under `folder` that is missing, has another size or other
    bytes than `expected` ({name: {"bytes", "sha256"}}) records; with `leave_out`, also the first file that is
    there but was never recorded ("was not written with `written_with`")."""
    for name, want in expected.items():
        path = Path(folder) / name
        if not path.is_file():
            raise DamagedFilesError(f"{path} is missing")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise DamagedFilesError(f"{path} has {size:,} bytes, {want['bytes']:,} were written")
        if sha256_file(path) != want["sha256"]:
            raise DamagedFilesError(f"{path} differs from what was written (sha256)")
    if leave_out is not None:
        extra = sorted(set(files_in(folder, leave_out)) - set(expected))
        if extra:
            raise DamagedFilesError(f"{Path(folder) / extra[0]} was not written with {written_with}")


def move_aside(folder: Path) -> Path:
    """`folder` renamed to `<name>.damaged` (an older one of that name is replaced), for inspection."""
    aside = folder.with_name(folder.name + ".damaged")
    shutil.rmtree(aside, ignore_errors=True)
    folder.rename(aside)
    return aside
