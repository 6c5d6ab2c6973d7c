"""The version check names the tested range and what to do; the cache argument follows the installed transformers."""
from __future__ import annotations

import inspect
import warnings

import pytest
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from models.compat import (CHECKED, UntestedVersionWarning, cache_argument, check_versions, declared_requirements,
                           read_lock, version_checks)
from tests.conftest import LOCK


def test_declared_ranges_come_from_the_installed_metadata():
    declared = declared_requirements()
    assert set(CHECKED) <= set(declared), "every checked library has a range in pyproject.toml"
    assert all("<" in declared[name] for name in CHECKED), declared


def test_the_locked_versions_pass_silently():
    locked = read_lock(LOCK)
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
    locked = read_lock(LOCK)["torch"]
    (row,) = [r for r in version_checks({"torch": f"{locked}+cpu"}) if r.package == "torch"]
    assert row.problem is None


def test_cache_argument_uses_the_name_the_installed_forward_takes():
    for module in (LlamaForCausalLM, LlamaDecoderLayer):
        parameters = inspect.signature(module.forward).parameters
        (name,) = cache_argument(module.__new__(module), object())
        assert name in parameters
        assert name == ("cache" if "cache" in parameters else "past_key_values")


def test_a_lock_that_does_not_match_the_environment_is_reported_and_fails_strict(tmp_path, capsys):
    from importlib import metadata

    from models.compat import lock_differences, main

    lock = tmp_path / "lock.txt"
    lock.write_text(f"# made with python 3.11 linux\npytest==0.0.1\npackaging=={metadata.version('packaging')}\n"
                    "no-such-package==1.0\n")
    wrong, extra = lock_differences(lock)
    assert wrong == [("no-such-package", "1.0", None), ("pytest", "0.0.1", metadata.version("pytest"))]
    assert "torch" in extra and "packaging" not in extra
    main(["--lock", str(lock)])  # reports without failing
    assert "pytest" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="does not match"):
        main(["--lock", str(lock), "--strict"])
    lock.write_text("torch==2.13.0\ntorch>=2\n")
    with pytest.raises(ValueError, match=r"lock.txt:2: 'torch>=2' is not an exact pin"):
        lock_differences(lock)
