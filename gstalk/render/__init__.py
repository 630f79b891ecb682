"""Gaussian rasterization: ``rasterize`` (C views of one set) and ``rasterize_frames`` (B sets,
one view each), gsplat (CUDA) and PyTorch backends.

This package knows Gaussians and cameras, nothing about heads or audio.
"""

from gstalk.render.camera import Cameras, intrinsics_from_fov, look_at, orbit_cameras
from gstalk.render.rasterize import RenderOutput, rasterize, rasterize_frames, select_backend

__all__ = ["Cameras", "RenderOutput", "intrinsics_from_fov", "look_at", "orbit_cameras", "rasterize",
           "rasterize_frames", "select_backend"]
