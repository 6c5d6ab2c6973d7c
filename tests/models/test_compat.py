"""The version check names the tested range and what to do; the cache argument follows the installed transformers."""
from __future__ import annotations

import inspect
import warnings

import pytest
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from models.compat import (CHECKED, UntestedVersionWarning, cache_argument, check_versions, declared_requirements,
                           version_checks)
from tests.conftest import locked_versions


def test_declared_ranges_come_from_the_installed_metadata():
    declared = declared_requirements()
    assert set(CHECKED) <= set(declared), "every checked library has a range in pyproject.toml"
    assert all("<" in declared[name] for name in CHECKED), declared


def test_the_locked_versions_pass_silently():
    locked = locked_versions()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = check_versions({name: locked[name] for name in CHECKED})
    assert all(row.problem is None for row in rows), rows


def test_a_newer_release_warns_naming_the_range_and_what_to_do(monkeypatch):
    monkeypatch.delenv("DRAFTSMITH_ALLOW_UNTESTED", raising=False)
    with pytest.warns(UntestedVersionWarning) as caught:
        check_versions({"transformers": "5.99.0"})
    message = str(caught[0].message)
    assert "transformers 5.99.0" in message and declared_requirements()["transformers"] in message
    assert ".ci/setup" in message and ".ci/check-latest" in message
    monkeypatch.setenv("DRAFTSMITH_ALLOW_UNTESTED", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_versions({"transformers": "5.99.0"})


def test_a_known_broken_release_is_an_error():
    with pytest.raises(RuntimeError, match=r"transformers 4\.57\.1 is known to break draftsmith"):
        check_versions({"transformers": "4.57.1"})


def test_local_build_tags_do_not_count_as_other_versions():
    locked = locked_versions()["torch"]
    (row,) = [r for r in version_checks({"torch": f"{locked}+cpu"}) if r.package == "torch"]
    assert row.problem is None


def test_cache_argument_uses_the_name_the_installed_forward_takes():
    for module in (LlamaForCausalLM, LlamaDecoderLayer):
        parameters = inspect.signature(module.forward).parameters
        (name,) = cache_argument(module.__new__(module), object())
        assert name in parameters
        assert name == ("cache" if "cache" in parameters else "past_key_values")
