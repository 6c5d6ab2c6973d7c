"""Settings that are checked before anything runs: types, ranges and names, with errors that say what is allowed.

Every settings dataclass calls `check_fields(self)` first in its `__post_init__`: each field's value must fit its
annotation (an `int` field takes no "abc", no 2.5 and no null) and the rule named for it in the class's `LIMITS`
(e.g. `LIMITS = {"epochs": at_least(1), "lr": positive}`), so a bad value fails where it is made, also when a test
or a script builds the settings in Python. `check_config` walks a Hydra config the same way before any model
loads (train/run.py): unknown keys get the nearest valid name, and every error names its full key:

    distill.epochs=-1: must be an integer ≥ 1
    distill.epochz is not a setting of distill (train.distill.DistillSettings); did you mean distill.epochs?
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable


class SettingsError(ValueError):
    """A setting that cannot work; the message names the key, the value and what is allowed."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key  # the field's own name when raised by check_fields (the walker adds the path)

    def at(self, path: str) -> "SettingsError":
        """The same error under its full key, e.g. `limit=-1` raised by the spec that `corpus` builds."""
        message = str(self)
        if message.startswith(path):
            return SettingsError(message)
        if self.key is not None and message.startswith(self.key):
            return SettingsError(f"{path}.{message}")
        return SettingsError(f"{path}: {message}")


@dataclass(frozen=True)
class Rule:
    allowed: str                     # what the error says is allowed, e.g. "an integer ≥ 1"
    test: Callable[[Any], bool]
    none_ok: bool = False            # null (None) is allowed too, e.g. "no limit"


def at_least(minimum: int | float, none_ok: bool = False) -> Rule:
    return Rule(f"must be ≥ {minimum}" + (" (or null)" if none_ok else ""),
                lambda value: math.isfinite(value) and value >= minimum, none_ok)


def between(low: float, high: float) -> Rule:
    return Rule(f"must be a number in [{low}, {high}]", lambda value: math.isfinite(value) and low <= value <= high)


def one_of(*choices: object) -> Rule:
    return Rule(f"must be one of {list(choices)}", lambda value: value in choices)


positive = Rule("must be a finite number > 0", lambda value: math.isfinite(value) and value > 0)
integer = Rule("must be an integer", lambda value: isinstance(value, int) and not isinstance(value, bool))


def check_fields(settings: object) -> None:
    """Raise `SettingsError` for the first field of a settings dataclass whose value breaks its type or rule."""
    hints = _hints(type(settings))
    limits = getattr(type(settings), "LIMITS", {})
    section = getattr(type(settings), "SECTION", "")  # where the class always lives in the config, if anywhere
    for field in dataclasses.fields(settings):
        value, key = getattr(settings, field.name), f"{section}.{field.name}".lstrip(".")
        if field.name in hints and not _fits(value, hints[field.name]):
            raise SettingsError(f"{key}={shown(value)}: must be {_describe(hints[field.name])}", key)
        rule = limits.get(field.name)
        if rule is None or (value is None and rule.none_ok):
            continue
        if value is None or not rule.test(value):
            raise SettingsError(f"{key}={shown(value)}: {rule.allowed}", key)


def shown(value: object) -> str:
    """A value as the user typed it on the command line: null, true, 'abc', 3."""
    return {None: "null", True: "true", False: "false"}.get(value, repr(value)) if isinstance(value, (bool, type(
        None))) else repr(value)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _fits(value: object, hint: object) -> bool:
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in arguments)
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in arguments
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, (str, os.PathLike))
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and arguments and arguments[-1] is not Ellipsis:
            return len(value) == len(arguments) and all(_fits(v, a) for v, a in zip(value, arguments))
        return all(_fits(v, arguments[0]) for v in value) if arguments else True
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a hint this checker does not model (a Callable, a Protocol): left to the code that uses it


def _describe(hint: object) -> str:
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in arguments)
    if origin in (tuple, list):
        return f"a list of {_describe(arguments[0])}" if arguments else "a list"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null",
             dict: "a mapping"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_config(config, sections: list[str]) -> None:
    """Check the named sections of a Hydra config (DictConfig) without loading anything: unknown keys (with the
    nearest valid one), then each `_target_` built as the stages will build it, which runs `check_fields`."""
    from hydra.utils import instantiate
    from omegaconf import DictConfig

    def walk(node, path: str) -> None:
        if not isinstance(node, DictConfig):
            return
        if "_target_" not in node:  # a plain mapping (e.g. loss terms): look inside for built settings
            for key in node:
                walk(node._get_node(key), f"{path}.{key}")
            return
        accepted = _accepted_names(node._target_)
        for key in node:
            if str(key).startswith("_"):
                continue
            if accepted is not None and key not in accepted:
                nearest = difflib.get_close_matches(str(key), sorted(accepted), n=1, cutoff=0.5)
                hint = f"did you mean {path}.{nearest[0]}?" if nearest else f"settings: {sorted(accepted)}"
                raise SettingsError(f"{path}.{key} is not a setting of {path} ({node._target_}); {hint}")
            walk(node._get_node(key), f"{path}.{key}")
        try:
            instantiate(node, _convert_="all")
        except Exception as error:  # hydra wraps what the settings class raised; report the class's own words
            cause = error
            while cause.__cause__ is not None and not isinstance(cause, SettingsError):
                cause = cause.__cause__
            if isinstance(cause, SettingsError):
                raise cause.at(path) from None
            raise SettingsError(f"{path}: {cause}") from None

    for section in sections:
        walk(config._get_node(section), section)


def _accepted_names(target: str) -> set[str] | None:
    """The keyword arguments `target` takes (a dataclass's init fields), or None when it takes any."""
    from hydra.utils import get_object

    built = get_object(target)
    if dataclasses.is_dataclass(built):
        return {field.name for field in dataclasses.fields(built) if field.init}
    parameters = inspect.signature(built).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL}
