"""User-facing errors.

Every mistake a user can make (bad shapes, a non-finite camera, an unreadable file, an
unwritable folder) raises a subclass of :class:`GstalkError`. The CLI prints the message
without a traceback and exits non-zero; library users can catch the one base class.
:func:`check_value` and :func:`check_ranges` are the range checks of numbers and options.
"""

from __future__ import annotations

import math


class GstalkError(Exception):
    """Base class: the message says what was wrong and what to do about it."""

    exit_code = 2


class InputError(GstalkError):
    """Arguments or data of the wrong shape, type or value."""


class FileFormatError(GstalkError):
    """A file exists but cannot be read as the format it claims to be."""


class OutputError(GstalkError):
    """An output location cannot be written."""


class GstalkWarning(UserWarning):
    """Something the user should know that does not stop the command (a truncated file, a
    source too small for the output size). The CLI prints these, one line each, and hides the
    warnings of the libraries below it."""


def warn(message: str) -> None:
    import warnings

    warnings.warn(message, GstalkWarning, stacklevel=2)



# ---------------------------------------------------------------- range checks
#: Rules for :func:`check_value` and :func:`check_ranges`: (what the value must satisfy, how
#: to say it).
AT_LEAST_0 = (lambda v: v >= 0, "0 or more")
ABOVE_0 = (lambda v: v > 0, "above 0")
AT_LEAST_1 = (lambda v: v >= 1, "at least 1")


def between(low: float, high: float, unit: str = "") -> tuple:
    return (lambda v: low <= v <= high, f"between {low:g} and {high:g}{unit}")


def check_value(value, rule: tuple, flag: str, error: type | None = None):
    """``value`` if it is a finite number satisfying ``rule`` (such as :data:`AT_LEAST_0` or
    :func:`between`), else ``error`` (default :class:`InputError`) naming it as ``flag``."""
    ok, words = rule
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise (error or InputError)(f"{flag} must be {words}, got {value}")
    return value


def check_ranges(opts, rules: dict[str, tuple], error: type | None = None, prefix: str = "") -> None:
    """:func:`check_value` for options of ``opts`` (a config dataclass; ``rules``: option name to
    rule), each named as its command-line flag (``prefix`` before the name: 'train.' for
    'gstalk fit')."""
    for name, rule in rules.items():
        check_value(getattr(opts, name), rule, f"--{prefix}{name.replace('_', '-')}", error)
