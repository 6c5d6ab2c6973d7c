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
  breaks. `python -m models.compat` prints the table.
"""
from __future__ import annotations

import functools
import inspect
import os
import warnings
from dataclasses import dataclass
from importlib import metadata

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


def main() -> None:
    for row in version_checks():
        print(f"{row.package:14} {row.installed or '-':22} {row.required or '(any)':24} {row.problem or 'ok'}")


if __name__ == "__main__":
    main()
