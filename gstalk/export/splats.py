"""Static splat files: standard 3DGS PLY (gstalk.gaussians.ply), ``.splat`` and the PlayCanvas
compressed PLY.

``.splat`` (antimatter15's web viewer format, also read by SuperSplat, gsplat.js, Spark and
Luma's viewer): no header, 32 bytes a splat, little-endian::

    float32 x, y, z            position
    float32 sx, sy, sz         standard deviations (exp of the PLY log scales)
    uint8   r, g, b, a         colour 0.5 + C0 * f_dc, opacity sigmoid(logit), times 255
    uint8   qw, qx, qy, qz     normalised quaternion, q * 128 + 128

Splats are ordered by size times opacity, largest first (what that viewer expects when it
streams a file). Only the DC colour survives; higher SH are dropped.

Compressed PLY (PlayCanvas engine, SuperSplat, splat-transform): splats sorted in Morton
order and grouped in chunks of 256; an element ``chunk`` holds per-chunk float bounds
(min/max of position, of log scale and of the DC colour), the element ``vertex`` four
packed uint32 a splat: position 11-10-11 bits and log scale 11-10-11 bits within the
chunk's bounds, rotation as the index of the largest quaternion component (2 bits) and
the other three in [-1/sqrt2, 1/sqrt2] at 10 bits each, colour 8-8-8 within the chunk's
bounds plus 8 bits of opacity. Higher SH go to an element ``sh`` of uchar ``f_rest_*``
(channel-major, as in the standard PLY), each quantised over [-4, 4].
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from gstalk.errors import InputError
from gstalk.gaussians.set import SH_C0, GaussianSet
from gstalk.io.atomic import atomic_path

SPLAT_DTYPE = np.dtype([("position", "<f4", 3), ("scale", "<f4", 3), ("rgba", "u1", 4), ("rot", "u1", 4)])
assert SPLAT_DTYPE.itemsize == 32

CHUNK = 256
CHUNK_PROPS = ["min_x", "min_y", "min_z", "max_x", "max_y", "max_z",
               "min_scale_x", "min_scale_y", "min_scale_z", "max_scale_x", "max_scale_y", "max_scale_z",
               "min_r", "min_g", "min_b", "max_r", "max_g", "max_b"]
VERTEX_PROPS = ["packed_position", "packed_rotation", "packed_scale", "packed_color"]


def _arrays(g: GaussianSet, what: str) -> dict[str, np.ndarray]:
    if len(g) == 0:
        raise InputError("there are no Gaussians to export")
    g.check_finite(what)
    q = g.quats.detach().cpu().double()
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return {
        "means": g.means.detach().cpu().numpy().astype(np.float32),
        "log_scales": g.log_scales.detach().cpu().numpy().astype(np.float32),
        "quats": q.numpy(),
        "opacity": torch.sigmoid(g.opacity_logits.detach().cpu().double()).numpy(),
        "rgb": (g.sh[:, 0].detach().cpu().double() * SH_C0 + 0.5).numpy(),
        "sh_rest": g.sh[:, 1:].detach().cpu().numpy().astype(np.float32),  # [N, K-1, 3]
    }


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def write_splat(g: GaussianSet, path: str | os.PathLike) -> Path:
    """Write ``g`` as a ``.splat`` file (32 bytes a splat), atomically."""
    a = _arrays(g, str(path))
    n = a["means"].shape[0]
    rec = np.zeros(n, SPLAT_DTYPE)
    rec["position"] = a["means"]
    rec["scale"] = np.exp(a["log_scales"])
    rec["rgba"][:, :3] = _u8(a["rgb"])
    rec["rgba"][:, 3] = _u8(a["opacity"])
    rec["rot"] = np.clip(np.round(a["quats"] * 128.0 + 128.0), 0, 255).astype(np.uint8)
    importance = np.exp(a["log_scales"].astype(np.float64).sum(1)) * a["opacity"]
    rec = rec[np.argsort(-importance, kind="stable")]
    with atomic_path(path) as tmp:
        rec.tofile(tmp)
    return Path(path)


# ---------------------------------------------------------------------- compressed PLY
def _morton_order(means: np.ndarray) -> np.ndarray:
    """Indices that sort points along a 3D Morton (Z-order) curve at 10 bits an axis."""
    lo, hi = means.min(0), means.max(0)
    q = ((means - lo) / np.maximum(hi - lo, 1e-12) * 1023.0).astype(np.uint64)

    def spread(v: np.ndarray) -> np.ndarray:
        v = v & np.uint64(0x3FF)
        v = (v | (v << np.uint64(16))) & np.uint64(0x030000FF)
        v = (v | (v << np.uint64(8))) & np.uint64(0x0300F00F)
        v = (v | (v << np.uint64(4))) & np.uint64(0x030C30C3)
        v = (v | (v << np.uint64(2))) & np.uint64(0x09249249)
        return v

    code = spread(q[:, 0]) | (spread(q[:, 1]) << np.uint64(1)) | (spread(q[:, 2]) << np.uint64(2))
    return np.argsort(code, kind="stable")


def _unorm(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    span = hi - lo
    t = np.where(span > 0, (x - lo) / np.where(span > 0, span, 1.0), 0.0)
    return np.clip(np.round(t * ((1 << bits) - 1)), 0, (1 << bits) - 1).astype(np.uint32)


def _pack_111011(v: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (_unorm(v[:, 0], lo[:, 0], hi[:, 0], 11) << 21) | (_unorm(v[:, 1], lo[:, 1], hi[:, 1], 10) << 11) \
        | _unorm(v[:, 2], lo[:, 2], hi[:, 2], 11)


def _pack_rotation(q: np.ndarray) -> np.ndarray:
    """Largest-component index (2 bits) + the other three, in (w, x, y, z) order, at 10 bits."""
    n = q.shape[0]
    largest = np.abs(q).argmax(1)
    q = q * np.where(q[np.arange(n), largest] < 0, -1.0, 1.0)[:, None]
    mask = np.ones_like(q, dtype=bool)
    mask[np.arange(n), largest] = False
    others = q[mask].reshape(n, 3)  # in [-1/sqrt2, 1/sqrt2]; times 1/sqrt2 gives [-0.5, 0.5]
    u = np.clip(np.round((others * math.sqrt(0.5) + 0.5) * 1023.0), 0, 1023).astype(np.uint32)
    return (largest.astype(np.uint32) << 30) | (u[:, 0] << 20) | (u[:, 1] << 10) | u[:, 2]


def write_compressed_ply(g: GaussianSet, path: str | os.PathLike) -> Path:
    """Write ``g`` as a PlayCanvas compressed PLY (16 bytes a splat + SH bytes), atomically."""
    a = _arrays(g, str(path))
    order = _morton_order(a["means"])
    a = {k: v[order] for k, v in a.items()}
    n = a["means"].shape[0]
    n_chunks = (n + CHUNK - 1) // CHUNK
    cid = np.arange(n) // CHUNK
    log_s = np.clip(a["log_scales"], -20.0, 20.0)
    chunk = np.zeros((n_chunks, 18), np.float32)
    for lo_col, hi_col, v in ((0, 3, a["means"]), (6, 9, log_s), (12, 15, a["rgb"])):
        mins = np.full((n_chunks, 3), np.inf)
        maxs = np.full((n_chunks, 3), -np.inf)
        np.minimum.at(mins, cid, v)
        np.maximum.at(maxs, cid, v)
        chunk[:, lo_col:lo_col + 3] = mins
        chunk[:, hi_col:hi_col + 3] = maxs
    lo = lambda c: chunk[cid, c:c + 3].astype(np.float64)  # noqa: E731
    vert = np.zeros((n, 4), np.uint32)
    vert[:, 0] = _pack_111011(a["means"], lo(0), lo(3))
    vert[:, 1] = _pack_rotation(a["quats"])
    vert[:, 2] = _pack_111011(log_s, lo(6), lo(9))
    rgb_lo, rgb_hi = lo(12), lo(15)
    col = [_unorm(a["rgb"][:, c], rgb_lo[:, c], rgb_hi[:, c], 8) for c in range(3)]
    alpha = np.clip(np.round(a["opacity"] * 255.0), 0, 255).astype(np.uint32)
    vert[:, 3] = (col[0] << 24) | (col[1] << 16) | (col[2] << 8) | alpha
    rest = a["sh_rest"]  # [N, K-1, 3] -> channel-major f_rest
    n_rest = 3 * rest.shape[1]
    header = ["ply", "format binary_little_endian 1.0", "comment Generated by gstalk",
              f"element chunk {n_chunks}", *[f"property float {p}" for p in CHUNK_PROPS],
              f"element vertex {n}", *[f"property uint {p}" for p in VERTEX_PROPS]]
    sh_bytes = b""
    if n_rest:
        flat = np.ascontiguousarray(rest.transpose(0, 2, 1)).reshape(n, n_rest)
        sh_bytes = np.clip(np.trunc((flat / 8.0 + 0.5) * 256.0), 0, 255).astype(np.uint8).tobytes()
        header += [f"element sh {n}", *[f"property uchar f_rest_{i}" for i in range(n_rest)]]
    header.append("end_header")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(("\n".join(header) + "\n").encode("ascii"))
            f.write(chunk.astype("<f4").tobytes())
            f.write(vert.astype("<u4").tobytes())
            f.write(sh_bytes)
    return Path(path)
