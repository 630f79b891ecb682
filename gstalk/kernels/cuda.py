"""The CUDA kernels (``csrc/*.cu``) and gsplat's, built only where ``torch.cuda.is_available()``.

torch's extension loader compiles with the CUDA toolkit in ``CUDA_HOME``. Where that is not
set, :func:`cuda_home` finds the toolkit from the real location of ``nvcc`` on the PATH
(a wrapper script in front of it would otherwise make torch look in the wrapper's folder, where
``cuda_runtime_api.h`` is not). Builds are cached by torch (``TORCH_EXTENSIONS_DIR``).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import torch

from gstalk.errors import GstalkError
from gstalk.kernels import CSRC

log = logging.getLogger(__name__)

MODULES = {"hashgrid": ["hashgrid.cpp", "hashgrid_kernels.cu"], "pose": ["pose.cpp", "pose_kernels.cu"]}


class CudaBuildError(GstalkError):
    """A CUDA kernel could not be built or loaded."""


def cuda_home() -> Path | None:
    """The CUDA toolkit: ``CUDA_HOME`` / ``CUDA_PATH`` if set, else the folder above the real
    ``bin/nvcc`` (following symlinks, and asking a wrapper script where the compiler it runs
    lives), else None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = Path(nvcc).resolve()
    if (real.parent.parent / "include" / "cuda_runtime_api.h").is_file():
        return real.parent.parent
    # a wrapper script: the toolkit's nvcc is named in it, or nvcc's dry run says where it is
    # ("#$ TOP=/usr/local/cuda-13.0/bin/.." from CUDA 12 and 13; "_TOP_=" from older ones)
    candidates = []
    try:
        if real.stat().st_size < 65536:
            candidates += [m.group(1) for m in re.finditer(r"(/[^\s\"']+)/bin/nvcc\b", real.read_text(errors="ignore"))]
    except OSError:
        pass
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True,
                             text=True, timeout=20)
        text = out.stdout + out.stderr
        candidates += [m.group(1) or m.group(2) for m in re.finditer(r"\b_?TOP_?=(\S+)|(\S+)/bin/nvcc\b", text)]
    except (OSError, subprocess.SubprocessError):
        pass
    for c in candidates:
        top = Path(c).resolve()
        if (top / "include" / "cuda_runtime_api.h").is_file():
            return top
    return None


def _set_cuda_home() -> None:
    if not os.environ.get("CUDA_HOME"):
        home = cuda_home()
        if home is not None:
            os.environ["CUDA_HOME"] = str(home)


@functools.lru_cache(maxsize=None)
def load(name: str):
    """The compiled CUDA module ``name`` (:data:`MODULES`), built on first use; a
    :class:`CudaBuildError` that says why where it cannot be."""
    if not torch.cuda.is_available():
        raise CudaBuildError(f"the {name} CUDA kernels need a CUDA GPU; use the torch backend")
    _set_cuda_home()
    from torch.utils.cpp_extension import load as load_ext

    try:
        return load_ext(name=f"gstalk_{name}", sources=[str(CSRC / s) for s in MODULES[name]],
                        extra_cuda_cflags=["-O3", "--use_fast_math"], verbose=False)
    except Exception as e:  # compiler missing, wrong CUDA toolkit, ...
        raise CudaBuildError(f"building the {name} CUDA kernels failed: {e}. Check that nvcc matches torch's CUDA "
                             "version (CUDA_HOME), or use the torch backend") from None


@functools.lru_cache(maxsize=None)
def available(name: str) -> bool:
    """Whether ``name``'s kernels build and load here (asked once: a failed build is logged
    once and not retried on every frame)."""
    if not torch.cuda.is_available():
        return False
    try:
        load(name)
        return True
    except CudaBuildError as e:
        log.warning("%s; using the PyTorch form", e)
        return False


@functools.lru_cache(maxsize=None)
def gsplat_available() -> bool:
    """Whether gsplat's CUDA code compiles and runs here: one tiny rasterization (gsplat
    compiles on its first call, which needs nvcc; a few minutes once). Logged once when not."""
    try:
        gsplat_check()
        return True
    except CudaBuildError as e:
        log.warning("%s; rendering uses the PyTorch rasterizer on the GPU", e)
        return False


def gsplat_check() -> None:
    """Raise a :class:`CudaBuildError` saying why gsplat cannot rasterize here."""
    if not torch.cuda.is_available():
        raise CudaBuildError("the gsplat backend needs a CUDA GPU; none is available (use backend='torch')")
    _set_cuda_home()
    try:
        from gsplat import rasterization

        dev = torch.device("cuda")
        rasterization(torch.zeros(1, 3, device=dev), torch.tensor([[1.0, 0, 0, 0]], device=dev),
                      torch.full((1, 3), 0.1, device=dev), torch.ones(1, device=dev), torch.ones(1, 3, device=dev),
                      torch.eye(4, device=dev)[None], torch.eye(3, device=dev)[None], 8, 8)
    except Exception as e:  # ImportError, nvcc missing, a compile error, a CUDA error
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CudaBuildError(f"gsplat's CUDA code cannot be compiled or run here ({first}); it needs the CUDA "
                             "toolkit's nvcc matching torch's CUDA version (set CUDA_HOME)") from None
