"""Tiled pure-PyTorch Gaussian compositor: the CPU backend and the reference twin.

Front-to-back alpha compositing per pixel, as in 3D Gaussian Splatting:

    alpha_i = min(0.999, o_i * exp(-0.5 d^T Sigma_i^-1 d)),  skipped if < 1/255
    C = sum_i c_i alpha_i T_i,   T_i = prod_{j<i} (1 - alpha_j)

and a pixel stops at the first Gaussian that would take T to 1e-4 or below (that
Gaussian excluded), matching gsplat's classic mode. The image is cut into square tiles;
every Gaussian is listed in the tiles its screen radius touches, sorted by depth, and
tiles are processed in batches padded to the longest list in the batch, so memory is
bounded by ``budget`` elements per batch, not by the scene. Everything is ordinary
autograd, so it differentiates (and passes gradcheck in float64) on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gstalk.render.project import ALPHA_THRESHOLD, Projected

T_MIN = 1e-4


def _tile_lists(means2d: Tensor, radii: Tensor, depths: Tensor, tiles_x: int, tiles_y: int, tile_size: int):
    """Intersections of visible Gaussians with tiles, sorted by (tile, depth).

    Returns (gauss_sorted [M] indices into the N Gaussians, tile_counts [T], tile_starts [T]).
    """
    n_tiles = tiles_x * tiles_y
    vis = (radii > 0).all(dim=-1).nonzero(as_tuple=True)[0]
    dev = means2d.device
    if vis.numel() == 0:
        z = torch.zeros(n_tiles, dtype=torch.long, device=dev)
        return torch.zeros(0, dtype=torch.long, device=dev), z, z
    m = means2d.detach()[vis]
    r = radii[vis].to(m.dtype)
    x0 = torch.floor((m[:, 0] - r[:, 0]) / tile_size).clamp(0, tiles_x).long()
    x1 = (torch.floor((m[:, 0] + r[:, 0]) / tile_size) + 1).clamp(0, tiles_x).long()
    y0 = torch.floor((m[:, 1] - r[:, 1]) / tile_size).clamp(0, tiles_y).long()
    y1 = (torch.floor((m[:, 1] + r[:, 1]) / tile_size) + 1).clamp(0, tiles_y).long()
    w = (x1 - x0).clamp_min(0)
    count = w * (y1 - y0).clamp_min(0)
    total = int(count.sum())
    owner = torch.repeat_interleave(torch.arange(vis.numel(), device=dev), count)
    first = torch.cumsum(count, 0) - count
    j = torch.arange(total, device=dev) - first[owner]
    ow = w[owner]
    tile = (y0[owner] + j // ow) * tiles_x + (x0[owner] + j % ow)
    # depth rank of each visible Gaussian, then one sort on (tile, depth rank)
    order = torch.argsort(depths.detach()[vis], stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=dev)
    key = tile * vis.numel() + rank[owner]
    perm = torch.argsort(key)
    tile_sorted = tile[perm]
    gauss_sorted = vis[owner[perm]]
    counts = torch.bincount(tile_sorted, minlength=n_tiles)
    starts = torch.cumsum(counts, 0) - counts
    return gauss_sorted, counts, starts


def view_tiles(proj: Projected, cam: int, colors: Tensor, width: int, height: int, tile_size: int,
               tile_lists=_tile_lists):
    """What both compositors (this one and the compiled one, :mod:`gstalk.render.cpu_ext`)
    start from for camera ``cam``: tiles_x, tiles_y, the sorted tile lists (gauss_sorted,
    counts, starts, built by ``tile_lists``, :func:`_tile_lists`'s signature) and the
    features composited together [N, D + 1] (colour channels, then depth)."""
    means2d, depths, radii = proj.means2d[cam], proj.depths[cam], proj.radii[cam]
    tiles_x = (width + tile_size - 1) // tile_size
    tiles_y = (height + tile_size - 1) // tile_size
    gauss_sorted, counts, starts = tile_lists(means2d, radii, depths, tiles_x, tiles_y, tile_size)
    feats = torch.cat([colors, depths[:, None].to(colors.dtype)], dim=-1)
    return tiles_x, tiles_y, gauss_sorted, counts, starts, feats


def composite(proj: Projected, cam: int, opacities: Tensor, colors: Tensor, width: int, height: int,
              tile_size: int = 16, budget: int = 1 << 22) -> tuple[Tensor, Tensor, Tensor]:
    """Composite the Gaussians of camera ``cam``.

    Args:
        proj: projection of N Gaussians into C cameras.
        opacities: [N] in (0, 1).
        colors: [N, D] per-Gaussian features for this camera.
        budget: max elements (tiles x pixels x list length) per batch of tiles.

    Returns:
        colors [H, W, D] (no background), alpha [H, W, 1], accumulated depth [H, W, 1]
        (sum of weight x z, not yet divided by alpha).
    """
    means2d, conics = proj.means2d[cam], proj.conics[cam]
    dev, dt = means2d.device, means2d.dtype
    d = colors.shape[-1]
    tiles_x, tiles_y, gauss_sorted, counts, starts, feats = view_tiles(proj, cam, colors, width, height, tile_size)
    n_tiles = tiles_x * tiles_y
    p = tile_size * tile_size
    out = torch.zeros(n_tiles, p, d + 2, dtype=dt, device=dev)  # + depth + alpha
    busy = counts.nonzero(as_tuple=True)[0]
    if busy.numel():
        busy = busy[torch.argsort(counts[busy], descending=True)]
        busy_counts = counts[busy].tolist()
        local = torch.arange(tile_size, device=dev, dtype=dt) + 0.5
        ly, lx = torch.meshgrid(local, local, indexing="ij")
        lxy = torch.stack([lx.reshape(-1), ly.reshape(-1)], dim=-1)  # [P, 2]
        results, done_tiles = [], []
        i = 0
        while i < len(busy_counts):
            kmax = busy_counts[i]
            nb = max(1, budget // (p * kmax))
            tiles = busy[i:i + nb]
            i += nb
            ar = torch.arange(kmax, device=dev)
            slot = starts[tiles][:, None] + ar[None]  # [B, K]
            valid = ar[None] < counts[tiles][:, None]
            g = gauss_sorted[slot.clamp_max(gauss_sorted.numel() - 1)]  # [B, K]
            origin = torch.stack([tiles % tiles_x, tiles // tiles_x], dim=-1).to(dt) * tile_size  # [B, 2]
            pix = origin[:, None] + lxy[None]  # [B, P, 2]
            mu = means2d[g]  # [B, K, 2]
            con = conics[g]  # [B, K, 3]
            dx = pix[:, :, None, 0] - mu[:, None, :, 0]  # [B, P, K]
            dy = pix[:, :, None, 1] - mu[:, None, :, 1]
            sigma = 0.5 * (con[:, None, :, 0] * dx * dx + con[:, None, :, 2] * dy * dy) + con[:, None, :, 1] * dx * dy
            alpha = torch.clamp_max(opacities[g][:, None, :] * torch.exp(-sigma), 0.999)
            use = (sigma >= 0) & (alpha >= ALPHA_THRESHOLD) & valid[:, None, :]
            alpha = torch.where(use, alpha, torch.zeros_like(alpha))
            with torch.no_grad():  # early termination: a prefix of each pixel's list survives
                keep = torch.cumprod(1 - alpha, dim=-1) > T_MIN
            alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
            trans = torch.cumprod(1 - alpha, dim=-1)
            trans = torch.cat([torch.ones_like(trans[..., :1]), trans[..., :-1]], dim=-1)
            weight = alpha * trans  # [B, P, K]
            acc = torch.einsum("bpk,bkd->bpd", weight, feats[g])  # [B, P, D+1]
            results.append(torch.cat([acc, weight.sum(-1, keepdim=True)], dim=-1))
            done_tiles.append(tiles)
        out = out.index_copy(0, torch.cat(done_tiles), torch.cat(results))
    img = out.reshape(tiles_y, tiles_x, tile_size, tile_size, d + 2).permute(0, 2, 1, 3, 4)
    img = img.reshape(tiles_y * tile_size, tiles_x * tile_size, d + 2)[:height, :width]
    return img[..., :d], img[..., d + 1:], img[..., d:d + 1]
