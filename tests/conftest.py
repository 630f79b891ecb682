import os
import shutil

import pytest
import torch

from gstalk.gaussians import GaussianSet
from gstalk.render import Cameras, intrinsics_from_fov, look_at

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# the compiled CPU compositor needs a C++ compiler; with one (and not switched off), a failed
# build fails its tests
cpu_kernel = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None
                                or os.environ.get("GSTALK_CPU_KERNEL", "1") == "0",
                                reason="needs a C++ compiler (and GSTALK_CPU_KERNEL not 0)")


def front_camera(width: int = 40, height: int = 32, distance: float = 3.0, fov: float = 40.0,
                 dtype=torch.float32) -> Cameras:
    """One camera on +z looking at the origin, y up."""
    vm = look_at(torch.tensor([0.0, 0.0, distance]), torch.zeros(3)).to(dtype)
    return Cameras(vm[None], intrinsics_from_fov(width, height, fov, dtype=dtype)[None], width, height)


def small_scene(n: int = 30, sh_degree: int = 0, seed: int = 0, dtype=torch.float32) -> GaussianSet:
    g = GaussianSet.random(n, sh_degree=sh_degree, extent=0.6, seed=seed, dtype=dtype)
    g.log_scales = g.log_scales + 1.0  # a little larger so they overlap at small sizes
    return g
