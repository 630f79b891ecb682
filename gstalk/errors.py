"""User-facing errors.

Every mistake a user can make (bad shapes, a non-finite camera, an unreadable file, an
unwritable folder) raises a subclass of :class:`GstalkError`. The CLI prints the message
without a traceback and exits non-zero; library users can catch the one base class.
"""

from __future__ import annotations


class GstalkError(Exception):
    """Base class: the message says what was wrong and what to do about it."""

    exit_code = 2


class InputError(GstalkError):
    """Arguments or data of the wrong shape, type or value."""


class FileFormatError(GstalkError):
    """A file exists but cannot be read as the format it claims to be."""


class OutputError(GstalkError):
    """An output location cannot be written."""

