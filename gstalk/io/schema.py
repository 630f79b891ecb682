"""Checks of what gstalk reads back from its own folders (avatar config.json, motion.npz,
track.npz, dataset manifests): each field has a type and a range, each array a shape, and
what is wrong is a :class:`FileFormatError` naming the file, the field and what was expected.

These files are gstalk's own, but users edit them, copy them between versions and lose
parts of them; a wrong value must never reach a library as a traceback far from its cause.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gstalk.errors import FileFormatError


@dataclass(frozen=True)
class Int:
    """An integer (not a bool, not a float) in [low, high]."""

    low: int
    high: int

    def expected(self) -> str:
        return f"an integer from {self.low} to {self.high}"

    def ok(self, v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and self.low <= v <= self.high


@dataclass(frozen=True)
class Number:
    """A finite number (int or float, not a bool) in [low, high]."""

    low: float
    high: float

    def expected(self) -> str:
        return f"a number from {self.low:g} to {self.high:g}"

    def ok(self, v) -> bool:
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and self.low <= v <= self.high)


@dataclass(frozen=True)
class Choice:
    """One of some strings."""

    values: tuple[str, ...]

    def expected(self) -> str:
        return "one of " + ", ".join(f"'{v}'" for v in self.values)

    def ok(self, v) -> bool:
        return isinstance(v, str) and v in self.values


@dataclass(frozen=True)
class Bool:
    def expected(self) -> str:
        return "true or false"

    def ok(self, v) -> bool:
        return isinstance(v, bool)


@dataclass(frozen=True)
class Text:
    def expected(self) -> str:
        return "a string"

    def ok(self, v) -> bool:
        return isinstance(v, str)


@dataclass(frozen=True)
class Point:
    """A list of ``n`` finite numbers, or null where ``optional``."""

    n: int = 3
    optional: bool = False

    def expected(self) -> str:
        return f"a list of {self.n} numbers" + (" or null" if self.optional else "")

    def ok(self, v) -> bool:
        if v is None:
            return self.optional
        return isinstance(v, list) and len(v) == self.n and all(Number(-math.inf, math.inf).ok(x) for x in v)


@dataclass(frozen=True)
class Record:
    """A JSON object whose listed keys follow their own rules (keys it lacks are allowed
    unless ``required``; keys it has beyond them are kept)."""

    fields: dict
    required: tuple[str, ...] = ()

    def expected(self) -> str:
        return "an object" + (f" with {', '.join(self.required)}" if self.required else "")

    def ok(self, v) -> bool:
        return isinstance(v, dict) and all(k in v for k in self.required)


@dataclass(frozen=True)
class Optional:
    """``rule``, or null."""

    rule: object

    def expected(self) -> str:
        return self.rule.expected() + " or null"

    def ok(self, v) -> bool:
        return v is None or self.rule.ok(v)


def _show(v) -> str:
    s = repr(v) if not isinstance(v, str) else f"'{v}'"
    return s if len(s) <= 40 else s[:37] + "..."


def check_fields(raw: dict, rules: dict, path: str | Path, fix: str, prefix: str = "") -> None:
    """Each key of ``raw`` that ``rules`` names must satisfy its rule (keys ``raw`` lacks are
    left to the reader's defaults). ``fix``: what the user can do, appended to the message."""
    for name, rule in rules.items():
        if name not in raw:
            continue
        v = raw[name]
        if not rule.ok(v):
            raise FileFormatError(f"{path}: '{prefix}{name}' must be {rule.expected()}, got {_show(v)}; {fix}")
        if isinstance(rule, Record):
            check_fields(v, rule.fields, path, fix, prefix=f"{prefix}{name}.")


def check_arrays(arrays: dict, shapes: dict[str, tuple], path: str | Path, fix: str,
                 dims: dict[str, int] | None = None, may_be_nan: tuple[str, ...] = ()) -> dict[str, int]:
    """Every array that ``shapes`` names has that shape: a tuple of ints (fixed sizes) and
    names (sizes that must agree across arrays, such as 'frames'; ``dims`` gives known ones),
    and holds finite numbers (those in ``may_be_nan`` excepted). Returns the sizes the names took."""
    dims = dict(dims or {})
    for name, shape in shapes.items():
        if name not in arrays:
            continue
        a = np.asarray(arrays[name])
        if a.dtype.kind not in "biuf":
            raise FileFormatError(f"{path}: '{name}' must hold numbers, it holds {a.dtype}; {fix}")
        if a.ndim != len(shape):
            want = "x".join(str(s) for s in shape) or "a single number"
            got = "x".join(map(str, a.shape)) or "a scalar"
            raise FileFormatError(f"{path}: '{name}' must be {want}, it is {got}; {fix}")
        for axis, (n, want) in enumerate(zip(a.shape, shape)):
            expect = dims.setdefault(want, n) if isinstance(want, str) else want
            if n != expect:
                label = f"{want} = {expect}" if isinstance(want, str) else str(want)
                raise FileFormatError(f"{path}: '{name}' has {n} along axis {axis}, expected {label} "
                                      f"(shape {'x'.join(map(str, a.shape))}); {fix}")
        if name not in may_be_nan and a.dtype.kind == "f" and not np.isfinite(a).all():
            raise FileFormatError(f"{path}: '{name}' holds NaN or infinite values; {fix}")
    return dims
