"""Coordinate conventions of exported files, and the exact conversion between them.

gstalk's world is **RUB**: x right, y up, z toward the viewer ("back"), metres; the head
faces +z (the FLAME convention), and the camera is an OpenCV camera (x right, y down,
z forward) placed by the track. Exporters write one of:

``rub``  gstalk's own axes, unchanged. Also glTF's convention (y up, +z front), so meshes
         and GLB files always use it.
``rdf``  x right, y down, z forward: the axes of scenes trained by the original 3D Gaussian
         Splatting code from COLMAP poses, which splat viewers (antimatter15's .splat
         viewer, SuperSplat, the PlayCanvas engine) are tuned to show. Converting RUB to
         RDF is a 180 degree turn about x: (x, y, z) -> (x, -y, -z).

A turn about a coordinate axis by 180 degrees is diagonal, so the conversion is exact for
every Gaussian parameter: positions and quaternions are turned, scales and opacities are
unchanged, and each real spherical-harmonic coefficient only changes sign according to
the parity of its basis polynomial in y and z.
"""

from __future__ import annotations

import torch

from gstalk.errors import InputError
from gstalk.gaussians.set import GaussianSet

AXES = ("rdf", "rub")

# Exponent parities (x, y, z) of each real SH basis polynomial in the 3DGS order,
# degrees 0..3 (only the parity decides the sign under an axis flip).
_SH_PARITY = [
    (0, 0, 0),                                   # 1
    (0, 1, 0), (0, 0, 1), (1, 0, 0),             # y, z, x
    (1, 1, 0), (0, 1, 1), (0, 0, 0), (1, 0, 1), (0, 0, 0),   # xy, yz, 3z^2-1, xz, x^2-y^2
    (0, 1, 0), (1, 1, 1), (0, 1, 0), (0, 0, 1), (1, 0, 0), (0, 0, 1), (1, 0, 0),
]

# quaternion (w, x, y, z) of the 180 degree turn about x
_FLIP_X_QUAT = (0.0, 1.0, 0.0, 0.0)


def _signs(flip: tuple[int, int, int], k: int, like: torch.Tensor) -> torch.Tensor:
    out = []
    for px, py, pz in _SH_PARITY[:k]:
        out.append((flip[0] ** px) * (flip[1] ** py) * (flip[2] ** pz))
    return torch.tensor(out, dtype=like.dtype, device=like.device)


def convert_axes(g: GaussianSet, axes: str) -> GaussianSet:
    """``g`` (gstalk RUB world) expressed in ``axes`` ('rub' returns it unchanged)."""
    if axes not in AXES:
        raise InputError(f"unknown axes {axes!r}: one of {', '.join(AXES)}")
    if axes == "rub":
        return g
    flip = (1, -1, -1)
    d = torch.tensor(flip, dtype=g.means.dtype, device=g.means.device)
    # q' = q_flip * q, with q_flip = (0, 1, 0, 0): (w, x, y, z) -> (-x, w, -z, y)
    w, x, y, z = g.quats.unbind(-1)
    quats = torch.stack([-x, w, -z, y], -1)
    sh = g.sh * _signs(flip, g.sh.shape[1], g.sh)[None, :, None]
    return GaussianSet(g.means * d, quats, g.log_scales.clone(), g.opacity_logits.clone(), sh,
                       binding=g.binding, extra=dict(g.extra))


def flip_viewmat(viewmat: torch.Tensor, axes: str) -> torch.Tensor:
    """The world-to-camera matrix that sees the converted scene as ``viewmat`` saw the original."""
    if axes == "rub":
        return viewmat
    d = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=viewmat.dtype, device=viewmat.device))
    return viewmat @ d
