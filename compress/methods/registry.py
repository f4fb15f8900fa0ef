"""Methods are registered by name; a recipe stage names one and gives its typed parameters.

A method registers itself in its own file with `@register`; `compress.methods` imports the built-in
ones, and a method defined outside the package is available once its module is imported.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from compress.errors import CompressError

if TYPE_CHECKING:
    from compress.methods.base import Method

_METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to recipes under `cls.name`."""
    if cls.name in _METHODS:
        raise RuntimeError(f"method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The method registered under `name`, or a CompressError listing the known ones."""
    if name not in _METHODS:
        known = ", ".join(sorted(_METHODS))
        close = difflib.get_close_matches(name, _METHODS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise CompressError(f"unknown method {name!r} (known: {known}){hint}")
    return _METHODS[name]


def method_names() -> list[str]:
    return sorted(_METHODS)
