"""Rendering an avatar's posed Gaussians: from the training camera as trained, from any other
with what :mod:`gstalk.avatar.views` says other viewpoints show, composited over a
background."""

from __future__ import annotations

from torch import Tensor

from gstalk.avatar.model import Avatar
from gstalk.avatar.views import _for_cameras
from gstalk.gaussians.set import GaussianTensors
from gstalk.render import Cameras, RenderOutput, rasterize, rasterize_frames


def render_frame(av: Avatar, g: GaussianTensors, cam: Cameras, bg: Tensor) -> tuple[Tensor, Tensor, RenderOutput]:
    """Rasterize one frame's posed Gaussians over the background image ``bg`` [S, S, 3]:
    (rgb [S, S, 3], alpha [S, S, 1], the render output). From a camera elsewhere than the
    training camera, view-dependent colour is the training camera's (:func:`other_view`)."""
    g, degree = _for_cameras(av, g, cam)
    out = rasterize(g, cam, sh_degree=degree, background=0.0)
    return out.colors[0] + (1 - out.alphas[0]) * bg, out.alphas[0], out


def render_frames(av: Avatar, g: GaussianTensors, cams: Cameras, bg: Tensor) -> Tensor:
    """Rasterize B frames' posed Gaussians (:meth:`Avatar.posed_batch`), frame b by camera b,
    in one call, over the background image ``bg`` [S, S, 3]: rgb [B, S, S, 3] (view-dependent
    colour as in :func:`render_frame`)."""
    g, degree = _for_cameras(av, g, cams)
    out = rasterize_frames(g, cams, sh_degree=degree, background=0.0)
    return out.colors + (1 - out.alphas) * bg


# ---------------------------------------------------------------------- initialisation
