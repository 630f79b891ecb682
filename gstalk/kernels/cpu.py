"""The compiled CPU module (``csrc/raster_cpu.cpp`` + ``csrc/hashgrid_cpu.cpp``).

Built with torch's extension loader on first use (a C++ compiler and Python's headers are
needed; the build, about 30 s on 2 cores, is cached in :func:`build_directory`). Where it
cannot be built, or with ``GSTALK_CPU_KERNEL=0``, :func:`load` returns None and the callers
use their PyTorch forms (the rule in :mod:`gstalk.kernels`).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from gstalk.kernels import CSRC

log = logging.getLogger(__name__)

DTYPES = (torch.float32, torch.float64)  # what the kernels are compiled for
SOURCES = ("raster_cpu.cpp", "hashgrid_cpu.cpp")  # one module: the compositor and the hash encoding
STALE_LOCK_S = 600  # a build lock older than this was left by a killed build


def build_directory() -> Path:
    """Where the module is built and cached: under ``TORCH_EXTENSIONS_DIR`` (default
    ``~/.cache/torch_extensions``), one folder per Python and torch version."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.replace('+', '_')}"
    return Path(base) / tag / "gstalk_raster_cpu"


def needs_build(where: Path) -> bool:
    """Whether torch's loader will compile: nothing built in ``where`` yet, the sources edited
    since, or built from a checkout in another folder (a moved or second clone: the compile
    commands change, so ninja compiles again)."""
    built = sorted(where.glob("gstalk_raster_cpu*.so"))
    ninja = where / "build.ninja"
    if not built or not ninja.exists():
        return True
    commands = ninja.read_text(errors="replace")
    newest = max(p.stat().st_mtime for p in built)
    return any(str(CSRC / s) not in commands or (CSRC / s).stat().st_mtime > newest for s in SOURCES)


@functools.lru_cache(maxsize=None)
def load():
    """The compiled module, or None where it cannot be built (the reason is logged once)."""
    if os.environ.get("GSTALK_CPU_KERNEL", "1") == "0":
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        log.warning("no C++ compiler found: rendering and hash encoding on the CPU use the slower pure-PyTorch forms")
        return None
    from torch.utils.cpp_extension import load as load_ext

    try:
        where = build_directory()
        where.mkdir(parents=True, exist_ok=True)
        lock = where / "lock"
        # torch waits for a build lock forever; one left by a killed build would hang every run
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink(missing_ok=True)
        if needs_build(where):
            print("gstalk: building the CPU kernels (once, about 30 s) ...", file=sys.stderr, flush=True)
        # no fused multiply-add: the kernels keep their PyTorch twins' rounding on any -march
        return load_ext(name="gstalk_raster_cpu", sources=[str(CSRC / s) for s in SOURCES],
                        build_directory=str(where), extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],
                        extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # compiler or headers missing, unwritable cache, ...
        log.warning("building the CPU kernels failed (%s): rendering and hash encoding on the CPU use the slower "
                    "pure-PyTorch forms", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def available() -> bool:
    return load() is not None
