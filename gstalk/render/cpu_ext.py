"""The compiled CPU compositor (``csrc/raster_cpu.cpp``): the same tiled front-to-back
compositing as :func:`gstalk.render.reference.composite`, in C++ with a hand-written
backward pass, tiles in parallel on torch's CPU threads, each tile walked Gaussian by
Gaussian over the pixels of its footprint; and the tile lists it reads. The same module holds
the CPU hash encoding (``csrc/hashgrid_cpu.cpp``) that :mod:`gstalk.deform.hashgrid` uses.

It is built with torch's extension loader on first use (a C++ compiler and Python's headers
are needed; the build, about 30 s on 2 cores, is cached in :func:`build_directory`). Where it cannot be built,
or with ``GSTALK_CPU_KERNEL=0``, rendering on the CPU falls back to the pure-PyTorch
compositor (and the hash encoding to its PyTorch form), which stay the references the tests
compare these against.
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
from torch import Tensor

from gstalk.deform.cuda_ext import CSRC
from gstalk.render.project import ALPHA_THRESHOLD, Projected
from gstalk.render.reference import T_MIN, view_tiles

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
def load_cpu_ext():
    """The compiled module, or None where it cannot be built (the reason is logged once)."""
    if os.environ.get("GSTALK_CPU_KERNEL", "1") == "0":
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        log.warning("no C++ compiler found: rendering and hash encoding on the CPU use the slower pure-PyTorch forms")
        return None
    from torch.utils.cpp_extension import load

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
        return load(name="gstalk_raster_cpu", sources=[str(CSRC / s) for s in SOURCES], build_directory=str(where),
                    extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # compiler or headers missing, unwritable cache, ...
        log.warning("building the CPU kernels failed (%s): rendering and hash encoding on the CPU use the slower "
                    "pure-PyTorch forms", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def available() -> bool:
    return load_cpu_ext() is not None


class _Composite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, opacities, feats, gauss_sorted, starts, counts, width, height, tile_size):
        ext = load_cpu_ext()
        ins = [t.contiguous() for t in (means2d, conics, opacities, feats)]
        img, t_final, stop_at = ext.composite_forward(*ins, gauss_sorted, starts, counts, width, height, tile_size,
                                                      ALPHA_THRESHOLD, T_MIN)
        ctx.save_for_backward(*ins, gauss_sorted, starts, counts, t_final, stop_at)
        ctx.size = (width, height, tile_size)
        return img

    @staticmethod
    def backward(ctx, grad):
        means2d, conics, opacities, feats, gauss_sorted, starts, counts, t_final, stop_at = ctx.saved_tensors
        width, height, tile_size = ctx.size
        per_hit = load_cpu_ext().composite_backward(grad, t_final, stop_at, means2d, conics, opacities, feats,
                                                     gauss_sorted, starts, counts, width, height, tile_size,
                                                     ALPHA_THRESHOLD)
        # one row per (tile, Gaussian) intersection: summed per Gaussian
        grads = [torch.zeros_like(t).index_add_(0, gauss_sorted, h)
                 for t, h in zip((means2d, conics, opacities, feats), per_hit)]
        return (*grads, None, None, None, None, None, None)


def tile_lists(means2d: Tensor, radii: Tensor, depths: Tensor, tiles_x: int, tiles_y: int, tile_size: int):
    """:func:`gstalk.render.reference._tile_lists` (same arguments, same lists), compiled: the
    visible Gaussians are radix-sorted by depth, then counted and placed into their tiles in
    that order, so the intersections themselves are never sorted."""
    m = means2d.detach()
    return load_cpu_ext().tile_lists(m.contiguous(), radii.to(torch.int32).contiguous(),
                                     depths.detach().to(m.dtype).contiguous(), tiles_x, tiles_y, tile_size)


def composite(proj: Projected, cam: int, opacities: Tensor, colors: Tensor, width: int, height: int,
              tile_size: int = 16) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`gstalk.render.reference.composite` (same arguments and results) with the
    compiled compositor; the tensors must be on the CPU and the extension built."""
    means2d, conics = proj.means2d[cam], proj.conics[cam]
    _, _, gauss_sorted, counts, starts, feats = view_tiles(proj, cam, colors, width, height, tile_size,
                                                           tile_lists=tile_lists)
    d = colors.shape[-1]
    dt = means2d.dtype
    img = _Composite.apply(means2d, conics.to(dt), opacities.to(dt), feats.to(dt), gauss_sorted, starts, counts,
                           width, height, tile_size)
    return img[..., :d], img[..., d + 1:], img[..., d:d + 1]
