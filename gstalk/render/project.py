"""Per-Gaussian maths in plain PyTorch: covariances, perspective (EWA) projection, SH colour.

These follow the formulation of 3D Gaussian Splatting (Kerbl et al. 2023) and the
conventions of gsplat 1.5 (low-pass ``eps2d`` added to the 2D covariance, Jacobian
evaluated at a mean clamped to 1.3x the field of view, radius 3.33 sigma), so that the
reference backend and the gsplat backend give the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Real spherical-harmonic basis constants (degrees 0..3), the usual 3DGS ordering.
_C0 = 0.28209479177387814
_C1 = 0.4886025119029199
_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
       -0.4570457994644658, 1.445305721320277, -0.5900435899266435)


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """[..., 4] quaternions (w, x, y, z), normalised here, to [..., 3, 3] rotation matrices."""
    q = quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(quats.shape[:-1] + (3, 3))


def covariance_3d(quats: Tensor, scales: Tensor) -> Tensor:
    """[N, 3, 3] world covariance R S S^T R^T from quaternions [N, 4] and std-devs [N, 3]."""
    m = quat_to_rotmat(quats) * scales[..., None, :]
    return m @ m.transpose(-1, -2)


def eval_sh(degree: int, coeffs: Tensor, dirs: Tensor) -> Tensor:
    """Colour from SH: ``coeffs`` [..., K, 3] (K >= (degree+1)^2), ``dirs`` [..., 3] unit.

    Returns the raw SH sum [..., 3] (the renderer adds 0.5 and clamps at 0).
    """
    out = _C0 * coeffs[..., 0, :]
    if degree < 1:
        return out
    x, y, z = (d[..., None] for d in dirs.unbind(-1))
    out = out - _C1 * y * coeffs[..., 1, :] + _C1 * z * coeffs[..., 2, :] - _C1 * x * coeffs[..., 3, :]
    if degree < 2:
        return out
    xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
    out = (out + _C2[0] * xy * coeffs[..., 4, :] + _C2[1] * yz * coeffs[..., 5, :]
           + _C2[2] * (2 * zz - xx - yy) * coeffs[..., 6, :] + _C2[3] * xz * coeffs[..., 7, :]
           + _C2[4] * (xx - yy) * coeffs[..., 8, :])
    if degree < 3:
        return out
    return (out + _C3[0] * y * (3 * xx - yy) * coeffs[..., 9, :] + _C3[1] * xy * z * coeffs[..., 10, :]
            + _C3[2] * y * (4 * zz - xx - yy) * coeffs[..., 11, :]
            + _C3[3] * z * (2 * zz - 3 * xx - 3 * yy) * coeffs[..., 12, :]
            + _C3[4] * x * (4 * zz - xx - yy) * coeffs[..., 13, :] + _C3[5] * z * (xx - yy) * coeffs[..., 14, :]
            + _C3[6] * x * (xx - 3 * yy) * coeffs[..., 15, :])


def sh_colors(coeffs: Tensor, means: Tensor, cam_centers: Tensor, degree: int) -> Tensor:
    """Per-camera RGB [C, N, 3] of SH ``coeffs`` [N, K, 3] seen from ``cam_centers`` [C, 3]."""
    dirs = means[None] - cam_centers[:, None]
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    rgb = eval_sh(degree, coeffs[None].expand(dirs.shape[0], -1, -1, -1), dirs)
    return torch.clamp_min(rgb + 0.5, 0.0)


@dataclass
class Projected:
    """Screen-space Gaussians for C cameras.

    means2d [C, N, 2] pixel coordinates; conics [C, N, 3] (a, b, c) of the inverse 2D
    covariance [[a, b], [b, c]]; depths [C, N] camera-space z; radii [C, N, 2] int
    half-extent in pixels (0 where culled); covars2d [C, N, 2, 2] after the low-pass.
    """

    means2d: Tensor
    conics: Tensor
    depths: Tensor
    radii: Tensor
    covars2d: Tensor

    @property
    def visible(self) -> Tensor:
        return (self.radii > 0).all(dim=-1)


ALPHA_THRESHOLD = 1.0 / 255.0
"""Contributions below this alpha are skipped (and Gaussians below this opacity culled)."""


def project(means: Tensor, covars: Tensor, viewmats: Tensor, Ks: Tensor, width: int, height: int,
            eps2d: float = 0.3, near: float = 0.01, far: float = 1e10,
            opacities: Tensor | None = None) -> Projected:
    """EWA-project Gaussians ([N, 3] means, [N, 3, 3] covariances) into C cameras.

    With ``opacities`` [N], the screen radius shrinks to where a Gaussian's alpha falls
    below :data:`ALPHA_THRESHOLD`, and Gaussians fainter than that are culled.
    """
    r = viewmats[:, :3, :3]  # [C, 3, 3]
    t = viewmats[:, :3, 3]  # [C, 3]
    means_c = torch.einsum("cij,nj->cni", r, means) + t[:, None]  # [C, N, 3]
    covars_c = torch.einsum("cij,njk,clk->cnil", r, covars, r)  # [C, N, 3, 3]
    tx, ty, tz = means_c.unbind(-1)
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    # Jacobian of the perspective map, at the mean clamped to 1.3x the field of view
    # (Gaussians far outside the image would otherwise get huge 2D footprints).
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    safe_z = torch.where(tz.abs() < 1e-8, torch.full_like(tz, 1e-8), tz)
    lim_xp, lim_xn = (width - cx) / fx + 0.3 * tan_x, cx / fx + 0.3 * tan_x
    lim_yp, lim_yn = (height - cy) / fy + 0.3 * tan_y, cy / fy + 0.3 * tan_y
    jx = safe_z * torch.minimum(torch.maximum(tx / safe_z, -lim_xn), lim_xp)
    jy = safe_z * torch.minimum(torch.maximum(ty / safe_z, -lim_yn), lim_yp)
    zero = torch.zeros_like(tz)
    jac = torch.stack([fx / safe_z, zero, -fx * jx / safe_z**2,
                       zero, fy / safe_z, -fy * jy / safe_z**2], dim=-1).reshape(tz.shape + (2, 3))
    cov2d = jac @ covars_c @ jac.transpose(-1, -2)
    cov2d = cov2d + eps2d * torch.eye(2, dtype=cov2d.dtype, device=cov2d.device)
    means2d = torch.stack([fx * tx / safe_z + cx, fy * ty / safe_z + cy], dim=-1)
    a, b, c = cov2d[..., 0, 0], 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0]), cov2d[..., 1, 1]
    det = a * c - b * b
    det_safe = det.clamp_min(1e-10)
    conics = torch.stack([c / det_safe, -b / det_safe, a / det_safe], dim=-1)
    with torch.no_grad():
        extend = torch.full_like(tz, 3.33)
        valid = (det > 0) & (tz > near) & (tz < far)
        if opacities is not None:
            op = opacities.detach()[None].expand_as(tz)
            valid = valid & (op >= ALPHA_THRESHOLD)
            extend = torch.minimum(extend, torch.sqrt(2.0 * torch.log(op.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD)))
        radius = torch.ceil(extend[..., None] * torch.sqrt(torch.stack([a, c], dim=-1).detach().clamp_min(0)))
        m2 = means2d.detach()
        inside = ((m2[..., 0] + radius[..., 0] > 0) & (m2[..., 0] - radius[..., 0] < width)
                  & (m2[..., 1] + radius[..., 1] > 0) & (m2[..., 1] - radius[..., 1] < height))
        radii = torch.where((valid & inside)[..., None], radius, torch.zeros_like(radius)).to(torch.int32)
    return Projected(means2d=means2d, conics=conics, depths=tz, radii=radii, covars2d=cov2d)


def splat_arrays(g) -> tuple:
    """What splat viewers (viser) take of activated Gaussians ``g`` (a GaussianTensors), as
    float32 numpy, in one device-to-host copy: centres [N, 3], world covariances [N, 3, 3],
    one RGB a Gaussian [N, 3] (:func:`gstalk.gaussians.set.splat_rgb`), opacities [N, 1]."""
    import numpy as np

    from gstalk.gaussians.set import splat_rgb

    cov = covariance_3d(g.quats.detach(), g.scales.detach()).reshape(-1, 9)
    packed = torch.cat([g.means.detach(), cov, splat_rgb(g), g.opacities.detach()[:, None]], 1)
    packed = packed.float().cpu().numpy()
    n = packed.shape[0]
    parts = (packed[:, :3], packed[:, 3:12].reshape(n, 3, 3), packed[:, 12:15], packed[:, 15:16])
    return tuple(np.ascontiguousarray(p) for p in parts)
