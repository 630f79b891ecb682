"""The compiled CPU compositor (``csrc/raster_cpu.cpp``, built by :mod:`gstalk.kernels.cpu`):
the same tiled front-to-back compositing as :func:`gstalk.render.reference.composite`, in C++
with a hand-written backward pass, tiles in parallel on torch's CPU threads, each tile walked
Gaussian by Gaussian over the pixels of its footprint; and the tile lists it reads. Where the
module cannot be built, rendering on the CPU uses the PyTorch compositor, which stays the
reference the tests compare this against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gstalk.kernels.cpu import DTYPES, available, load
from gstalk.render.project import ALPHA_THRESHOLD, Projected
from gstalk.render.reference import T_MIN, view_tiles


class _Composite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, opacities, feats, gauss_sorted, starts, counts, width, height, tile_size):
        ext = load()
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
        per_hit = load().composite_backward(grad, t_final, stop_at, means2d, conics, opacities, feats,
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
    return load().tile_lists(m.contiguous(), radii.to(torch.int32).contiguous(),
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


__all__ = ["DTYPES", "available", "composite", "tile_lists"]
