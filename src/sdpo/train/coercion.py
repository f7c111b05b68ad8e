"""Config values coerced by their field's type annotation, and the one-line messages for bad ones.

Numbers work in the forms people write them: PyYAML reads ``1e-4`` as a string, and ``--set
learning_rate=1e-4`` does too; ``true``/``yes``/``on`` are booleans wherever a bool is expected. Every
value that cannot be coerced ends in one InputError line naming the field and what it must be. The
configs that use it (``sdpo.train.config``) know their fields; this module knows only annotations.
"""

from __future__ import annotations

import difflib
import math
import types
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from sdpo.errors import InputError

BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
"""The spellings of a boolean a string may hold (any case, surrounding spaces ignored)."""


_HINTS: dict[type, dict[str, Any]] = {}


def type_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of dataclass ``cls`` (cached: resolving them costs more than a field)."""
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def field_names(cls: type) -> list[str]:
    """The field names of dataclass ``cls``, in order."""
    return [item.name for item in fields(cls)]


def coerce(name: str, annotation: Any, value: Any) -> Any:
    """``value`` as the type ``annotation`` names, or a one-line InputError naming field ``name``."""
    try:
        return _convert(annotation, value)
    except (ValueError, TypeError, OverflowError):
        raise InputError(f"{name} must be {expected(annotation)}, got {show(value)}") from None


def _convert(annotation: Any, value: Any) -> Any:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:  # the type of its values; which value is the config's own check
        return _convert(type(args[0]), value)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value)
            except (ValueError, TypeError, OverflowError):
                continue
        raise ValueError
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError
        if origin is tuple and Ellipsis not in args:
            if len(value) != len(args):
                raise ValueError
            return tuple(_convert(a, v) for a, v in zip(args, value, strict=True))
        return origin(_convert(args[0], v) for v in value)
    if annotation is bool:
        if isinstance(value, str) and value.strip().lower() in BOOL_WORDS:
            return BOOL_WORDS[value.strip().lower()]
        if not isinstance(value, bool):
            raise ValueError
        return value
    if isinstance(value, bool):  # YAML's yes/no/true/false are never numbers or names
        raise ValueError
    if annotation is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        number = float(value) if isinstance(value, (float, str)) else math.nan  # "1e3" is 1000
        if not (math.isfinite(number) and number.is_integer()):
            raise ValueError
        return int(number)
    if annotation is float:
        if not isinstance(value, (int, float, str)):
            raise ValueError
        number = float(value)
        if not math.isfinite(number):
            raise ValueError
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError
        return value
    return value


def expected(annotation: Any) -> str:
    """What a value of ``annotation`` must be, as an error message says it ("an integer or null")."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return expected(type(args[0]))
    if origin in (Union, types.UnionType):
        parts = [expected(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is tuple and Ellipsis not in args:
        return f"a list of {len(args)} {expected(args[0]).split(' ', 1)[1]}s"
    if origin in (list, tuple):
        return f"a list of {expected(args[0]).split(' ', 1)[1]}s"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}.get(
        annotation, str(annotation))


def check_choice(name: str, value: str, choices: Any) -> None:
    """A one-line InputError unless ``value`` is one of ``choices``: a ``Literal[...]`` type (its values)
    or a tuple of names."""
    allowed: tuple[Any, ...] = get_args(choices) if get_origin(choices) is Literal else tuple(choices)
    if value not in allowed:
        raise InputError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def check_keys(data: Mapping[Any, Any], known: list[str], what: str) -> None:
    """A one-line InputError naming the keys of ``data`` not in ``known`` (with a close match as a hint)."""
    # repr for anything but a plain name, so a key holding a newline or spaces still reads on one line
    unknown = sorted(key if isinstance(key, str) and key.isidentifier() else repr(key)
                     for key in data if key not in known)
    if unknown:
        hints = [m for key in unknown for m in difflib.get_close_matches(key, known, n=1)]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise InputError(f"unknown {what}(s): {', '.join(unknown)}{hint}")


def show(value: Any) -> str:
    """A short one-line rendering of a user's value (YAML spelling for None and booleans)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else text[:77] + "..."


def one_line(error: Exception) -> str:
    """An exception's message on one line."""
    return " ".join(str(error).split())
