"""Atomic file writes: write to a temporary file beside the target, then rename.

A reader (or a later stage) never sees a half-written file: either the old content or
the complete new one. Interrupting a write leaves at most a stray ``.tmp-*`` file, which
the next write of the same target replaces.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from gstalk.errors import OutputError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()
#: Write errors that say the disk (or the quota, or the file system) takes no more.
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


_CREATED: list[Path] = []  # the folders this process created (the topmost new one of each ensure_dir)


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) or raise :class:`OutputError` saying why not. Folders it
    creates are remembered: :func:`remove_empty_created` takes them away again after a failure."""
    p = Path(path)
    top = None
    for q in (p, *p.parents):
        if q.exists():
            break
        top = q
    try:
        p.mkdir(parents=True, exist_ok=True)
        if top is not None:
            _CREATED.append(top.absolute())
    except OSError as e:  # permission denied, a file in the way, read-only fs
        raise OutputError(f"cannot create output folder {p}: {e.strerror or e}. "
                          "Choose a folder you can write to.") from None
    if not os.access(p, os.W_OK):
        raise OutputError(f"output folder {p} is not writable. Choose a folder you can write to.")
    return p


def remove_empty_created() -> list[Path]:
    """After a failed command: remove the folders this process created that hold no file
    (a failed run leaves no empty output folder). Returns those removed."""
    gone = []
    for top in reversed(_CREATED):
        if not top.is_dir():
            continue
        try:
            if any(f for _, _, f in os.walk(top)):
                continue
            for d, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
                os.rmdir(d)
            gone.append(top)
        except OSError:
            continue
    _CREATED.clear()
    return gone


def check_own_folder(path: str | os.PathLike, is_ours, what: str) -> bool:
    """Refuse (:class:`OutputError`) an output folder that holds files gstalk did not write:
    ``path`` may be missing, empty (hidden files aside) or a folder ``is_ours(path)`` accepts
    (one gstalk wrote, finished or not). gstalk never overwrites a file it did not write.
    Returns whether the folder already held something of gstalk's."""
    p = Path(path)
    if not p.exists():
        return False
    if not p.is_dir():
        raise OutputError(f"{p} is a file, not a folder: give a new or empty folder for the {what}")
    names = sorted(e.name for e in os.scandir(p) if not e.name.startswith("."))
    if not names:
        return False
    if is_ours(p):
        return True
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    raise OutputError(f"{p} already holds files gstalk did not write ({shown}); give a new or empty folder for the "
                      f"{what} (gstalk never overwrites files it did not write)")


_STARTED = time.time()  # temporaries older than this process are no other write of its own
_STALE: dict[str, list[Path]] = {}  # per folder: the temporaries it held, older than this process
_STALE_LOCK = threading.Lock()


def _sweep_stale(target: Path, suffix: str) -> None:
    """Remove the temporaries of ``target`` that a killed run left (kill -9, power loss):
    ``.tmp-<stem>-*<suffix>`` files older than this process. Each folder is listed once per
    process (a prepare writes thousands of frames into one), not once per write."""
    folder = os.path.abspath(target.parent)
    prefix = f".tmp-{target.stem}-"
    with _STALE_LOCK:
        if folder not in _STALE:
            try:
                with os.scandir(folder) as it:
                    _STALE[folder] = [Path(e.path) for e in it if e.name.startswith(".tmp-")
                                      and e.is_file(follow_symlinks=False) and e.stat().st_mtime < _STARTED]
            except OSError:
                _STALE[folder] = []
        left = []
        for p in _STALE[folder]:
            if p.name.startswith(prefix) and p.name.endswith(suffix):
                with contextlib.suppress(OSError):
                    p.unlink()
            else:
                left.append(p)
        _STALE[folder] = left


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` on success.

    ``suffix`` defaults to the target's own suffix, so libraries that pick a format from
    the file name (imageio, PyAV) still see the right extension.
    """
    target = Path(target)
    ensure_dir(target.parent if str(target.parent) else ".")
    suffix = target.suffix if suffix is None else suffix
    _sweep_stale(target, suffix)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{target.stem}-", suffix=suffix, dir=target.parent)
    except OSError as e:  # a folder that takes no new files (/proc, a full or read-only disk)
        raise OutputError(f"cannot write {target}: {e.strerror or e}. Choose a folder you can write to.") from None
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual file mode
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(e, OSError) and e.errno in _FULL:  # the old file, if any, is still there
            raise OutputError(f"cannot write {target}: {e.strerror or e}. Free some space or choose another "
                              "folder; what was written before is kept.") from None
        raise


def write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | os.PathLike, text: str) -> Path:
    return write_bytes(target, text.encode("utf-8"))


def _finite(obj: Any) -> Any:
    """NaN and infinities become null: JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(target: str | os.PathLike, obj: Any) -> Path:
    return write_text(target, json.dumps(_finite(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")
