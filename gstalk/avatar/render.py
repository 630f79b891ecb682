"""Rendering an avatar's posed Gaussians: from the training camera as trained, from any other
with what :mod:`gstalk.avatar.views` says other viewpoints show, composited over a
background."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gstalk.avatar.model import Avatar
from gstalk.avatar.views import _for_cameras
from gstalk.gaussians.set import GaussianTensors
from gstalk.render import Cameras, RenderOutput, rasterize, rasterize_frames


class HostFrames:
    """Rendered batches [B, S, S, 3] (float in [0, 1], on any device) to uint8 frames on the
    host: converted to uint8 on the device, then copied to the host once per batch; on a GPU
    into pinned memory (an asynchronous copy), in a ring of ``ring`` buffers that are reused,
    so a consumer may hold the frames of the ``ring - 1`` batches before the newest (a video
    encoder's queue) while the next batch is copied."""

    def __init__(self, ring: int = 4):
        self.ring = ring
        self._bufs: list[Tensor] = []
        self._next = 0

    def __call__(self, rgb: Tensor) -> np.ndarray:
        u8 = rgb.clamp(0, 1).mul(255).add_(0.5).to(torch.uint8)  # rounds as gstalk.io.media.to_uint8 does
        if u8.device.type != "cuda":
            return u8.cpu().numpy()
        if not self._bufs or self._bufs[0].shape != u8.shape:
            self._bufs = [torch.empty(u8.shape, dtype=torch.uint8, pin_memory=True) for _ in range(self.ring)]
        buf = self._bufs[self._next]
        self._next = (self._next + 1) % self.ring
        buf.copy_(u8, non_blocking=True)
        torch.cuda.current_stream(u8.device).synchronize()
        return buf.numpy()


def render_frame(av: Avatar, g: GaussianTensors, cam: Cameras, bg: Tensor) -> tuple[Tensor, Tensor, RenderOutput]:
    """Rasterize one frame's posed Gaussians over the background image ``bg`` [S, S, 3]:
    (rgb [S, S, 3], alpha [S, S, 1], the render output). From a camera elsewhere than the
    training camera, view-dependent colour is the training camera's (:func:`other_view`)."""
    g, degree = _for_cameras(av, g, cam)
    out = rasterize(g, cam, sh_degree=degree, background=0.0)
    return out.colors[0] + (1 - out.alphas[0]) * bg, out.alphas[0], out


def render_frames(av: Avatar, g: GaussianTensors, cams: Cameras, bg: Tensor, at_train: bool | None = None) -> Tensor:
    """Rasterize B frames' posed Gaussians (:meth:`Avatar.posed_batch`), frame b by camera b,
    in one call, over the background image ``bg`` [S, S, 3]: rgb [B, S, S, 3] (view-dependent
    colour as in :func:`render_frame`; ``at_train``: whether every camera is at the training
    camera's centre, where the caller knows it)."""
    g, degree = _for_cameras(av, g, cams, at_train)
    out = rasterize_frames(g, cams, sh_degree=degree, background=0.0)
    return out.colors + (1 - out.alphas) * bg


# ---------------------------------------------------------------------- initialisation
