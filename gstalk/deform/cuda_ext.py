"""Building and loading gstalk's CUDA kernels (``csrc/``) with torch's extension loader.

Kernels are compiled on first use, only when ``torch.cuda.is_available()``; the build is
cached by torch (``TORCH_EXTENSIONS_DIR``). Every kernel has a PyTorch twin that runs
everywhere and that tests compare it against.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from gstalk.errors import GstalkError

CSRC = Path(__file__).resolve().parents[2] / "csrc"


class CudaBuildError(GstalkError):
    """A CUDA kernel could not be built or loaded."""


def _load(name: str, sources: list[str]):
    if not torch.cuda.is_available():
        raise CudaBuildError(f"the {name} CUDA kernels need a CUDA GPU; use the torch backend")
    from torch.utils.cpp_extension import load

    try:
        return load(name=name, sources=[str(CSRC / s) for s in sources], extra_cuda_cflags=["-O3", "--use_fast_math"],
                    verbose=False)
    except Exception as e:  # compiler missing, wrong CUDA toolkit, ...
        raise CudaBuildError(f"building the {name} CUDA kernels failed: {e}. Check that nvcc matches torch's CUDA "
                             "version, or use the torch backend") from None


@functools.lru_cache(maxsize=None)
def load_hashgrid_ext():
    return _load("gstalk_hashgrid", ["hashgrid.cpp", "hashgrid_kernels.cu"])
