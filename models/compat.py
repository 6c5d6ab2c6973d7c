"""Everything draftsmith relies on in its libraries' internals, in one place, for every version it supports.

Two things live here:

- **How we hand our KV cache to a transformers model.** The eval decoder and data_gen pass a cache object into HF
  model forwards; the argument's name and the way attention calls `cache.update` have changed between releases:
  transformers 5.0 calls `update(key, value, layer_idx, cache_kwargs)` and asks `get_seq_length()` for a
  `cache_position`, 5.23 `update(key, value, layer_idx)`, 5.24 renames the forward argument `past_key_values` to
  `cache` (the old name warns on every call) and calls `update(key, value, layer_idx, kwargs=...)`. `cache_argument(module, cache)` names the argument the way the
  installed version wants it; our cache's `update` accepts every calling convention.
- **Which library versions the suite has passed on.** The ranges are draftsmith's own package metadata
  (`pyproject.toml`'s dependencies, read back from the installed distribution, so there is one source); the exact
  versions of the last green run are the lock files (`.ci/lock.txt`, `.ci/lock-vllm.txt`). `check_versions()` warns,
  naming the range and what to do, when an installed library lies outside its range, and fails where we know it
  breaks. `python -m models.compat` prints the table; `python -m models.compat --lock FILE [--strict]` compares
  the running environment with a lock file (what .ci/setup and .ci/check-latest print).
"""
from __future__ import annotations

import argparse
import functools
import inspect
import os
import sys
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

# Release lines known to break draftsmith, each with the reason; `check_versions` refuses them outright.
KNOWN_BROKEN: dict[str, list[tuple[str, str]]] = {
    "transformers": [("<5.0", "4.x has another cache API (no DynamicCache(config=...), no `layer_types`)")],
}
# Libraries whose internals draftsmith couples to: a version outside the tested range is worth a warning.
CHECKED = ("torch", "transformers", "datasets", "deepspeed", "peft", "accelerate", "safetensors", "hydra-core")
ALLOW_UNTESTED = "DRAFTSMITH_ALLOW_UNTESTED"


class UntestedVersionWarning(UserWarning):
    """An installed library lies outside the range draftsmith's suite has passed on."""


@dataclass(frozen=True)
class VersionCheck:
    package: str
    installed: str | None
    required: str  # the specifier from draftsmith's metadata, "" when unconstrained
    problem: str | None  # None when fine


@functools.lru_cache(maxsize=None)
def _cache_keyword(forward) -> str:
    parameters = inspect.signature(forward).parameters  # follows functools.wraps through HF's decorators
    if "cache" in parameters:
        return "cache"
    if "past_key_values" in parameters:
        return "past_key_values"
    raise TypeError(f"{forward.__qualname__} takes neither `cache` nor `past_key_values`: this transformers "
                    f"version hands caches to models in a way draftsmith does not know ({_supported_line()})")


def cache_argument(module: torch.nn.Module, cache) -> dict:
    """{name: cache} for a forward of `module` (an HF model, its decoder, or one decoder layer)."""
    return {_cache_keyword(type(module).forward): cache}


def _installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def declared_requirements() -> dict[str, str]:
    """{package: specifier} from draftsmith's installed metadata (pyproject.toml's dependencies)."""
    from packaging.requirements import Requirement

    try:
        lines = metadata.requires("draftsmith") or []
    except metadata.PackageNotFoundError:
        return {}
    declared = {}
    for line in lines:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            declared[requirement.name.lower()] = str(requirement.specifier)
    return declared


def _supported_line() -> str:
    declared = declared_requirements()
    return "tested: " + ", ".join(f"{name}{declared.get(name, '')}" for name in CHECKED if name in declared)


def _release(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0': local build tags (CPU/CUDA wheels) do not change what was tested."""
    return version.split("+", 1)[0]


def version_checks(installed: dict[str, str | None] | None = None) -> list[VersionCheck]:
    """One row per checked library; `installed` overrides what is looked up (for tests)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    declared = declared_requirements()
    rows = []
    for package in CHECKED:
        version = installed[package] if installed is not None and package in installed else _installed(package)
        required = declared.get(package, "")
        problem = None
        if version is None:
            problem = "not installed"
        else:
            release = Version(_release(version))
            for bad, why in KNOWN_BROKEN.get(package, []):
                if release in SpecifierSet(bad):
                    problem = f"known to break draftsmith ({why})"
            if problem is None and required and not SpecifierSet(required).contains(release, prereleases=True):
                problem = f"outside the tested range {required}"
        rows.append(VersionCheck(package, version, required, problem))
    return rows


def check_versions(installed: dict[str, str | None] | None = None) -> list[VersionCheck]:
    """Fail on a known-broken library, warn (once per library) on an untested one; returns the rows checked.

    Set DRAFTSMITH_ALLOW_UNTESTED=1 to silence the warnings (known-broken versions still fail)."""
    rows = version_checks(installed)
    broken = [row for row in rows if row.problem and row.problem.startswith("known to break")]
    if broken:
        raise RuntimeError("unsupported library versions: " + "; ".join(
            f"{row.package} {row.installed} is {row.problem}" for row in broken)
            + ". Run .ci/setup to install the locked versions (.ci/lock.txt).")
    if os.environ.get(ALLOW_UNTESTED) != "1":
        for row in rows:
            if row.problem and row.problem != "not installed":
                warnings.warn(f"{row.package} {row.installed} is {row.problem}: draftsmith may break with it. "
                              f"Run .ci/setup for the locked versions (.ci/lock.txt), or .ci/check-latest to test "
                              f"this one; {ALLOW_UNTESTED}=1 silences this warning.", UntestedVersionWarning,
                              stacklevel=2)
    return rows


def read_lock(path: Path) -> dict[str, str]:
    """{canonical package name: version} of a lock file (`name==version` lines, `#` comments)."""
    from packaging.utils import canonicalize_name

    pins = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            name, separator, version = line.partition("==")
            if not separator or not version:
                raise ValueError(f"{path}:{number}: {line!r} is not an exact pin (name==version)")
            pins[canonicalize_name(name)] = version
    return pins


def lock_differences(path: Path, skip: tuple[str, ...] = ()) -> tuple[list[tuple[str, str, str | None]], list[str]]:
    """(locked packages missing or at another release here: (name, locked, installed)), (installed packages the
    lock does not name). Local build tags (+cpu) do not count; `skip` names packages not to compare."""
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    locked = read_lock(path)
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = [(name, version, installed.get(name)) for name, version in sorted(locked.items())
             if name not in skip and (name not in installed
                                      or Version(installed[name]).public != Version(version).public)]
    extra = sorted(set(installed) - set(locked) - {"draftsmith", "pip"})
    return wrong, extra


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="installed library versions beside the tested ranges or a lock")
    parser.add_argument("--lock", type=Path, help="compare the running environment with this lock file instead")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a locked package differs")
    parser.add_argument("--skip", action="append", default=[], help="a locked package not to compare")
    args = parser.parse_args(argv)
    if args.lock is None:
        for row in version_checks():
            print(f"{row.package:14} {row.installed or '-':22} {row.required or '(any)':24} {row.problem or 'ok'}")
        return
    wrong, extra = lock_differences(args.lock, tuple(args.skip))
    for name, locked, installed in wrong:
        print(f"  {name:32} {locked:>14} -> {installed or 'missing'}")
    for name in extra:
        print(f"  {name:32} {'-':>14} -> {metadata.version(name)} (not in the lock)")
    print(f"  ({len(wrong)} locked packages differ, {len(extra)} installed packages are not in {args.lock})")
    if args.strict and wrong:
        sys.exit(f"the environment does not match {args.lock}: run .ci/setup")


if __name__ == "__main__":
    main()
