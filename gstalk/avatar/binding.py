"""Binding Gaussians to mesh triangles (as GaussianAvatars does).

Every triangle has a local frame: origin at its centroid, an orthonormal rotation built
from its first edge and its normal, and a scale (the mean edge length). A bound Gaussian
stores position, rotation and scale in its parent triangle's frame; when the mesh moves
(pose, jaw, expression), the Gaussian follows:

    mean  = R_f (s_f * local_mean) + o_f
    rot   = R_f * local_rot            (quaternions)
    scale = s_f * exp(local_log_scale)
"""

from __future__ import annotations

import torch
from torch import Tensor



def triangle_frames(verts: Tensor, faces: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[B, V, 3] vertices -> origins [B, F, 3], rotations [B, F, 3, 3], scales [B, F]."""
    tri = verts[:, faces]  # [B, F, 3, 3]
    o = tri.mean(2)
    e0 = tri[:, :, 1] - tri[:, :, 0]
    e1 = tri[:, :, 2] - tri[:, :, 0]
    n = torch.linalg.cross(e0, e1)
    x = e0 / e0.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    z = n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    y = torch.linalg.cross(z, x)
    r = torch.stack([x, y, z], -1)  # columns are the local axes
    s = (e0.norm(dim=-1) + e1.norm(dim=-1) + (tri[:, :, 2] - tri[:, :, 1]).norm(dim=-1)) / 3
    return o, r, s


def rotmat_to_quat(r: Tensor) -> Tensor:
    """[..., 3, 3] rotation matrices -> [..., 4] (w, x, y, z) quaternions (robust branch choice)."""
    m = r
    t = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    cands = torch.stack([
        torch.stack([1 + t, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
        torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2],
                     m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
        torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0],
                     1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], m[..., 1, 2] + m[..., 2, 1]], -1),
        torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1],
                     1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]], -1),
    ], -2)  # [..., 4 candidates, 4]
    diag = torch.stack([t, m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]], -1)
    best = diag.argmax(-1)
    q = torch.gather(cands, -2, best[..., None, None].expand(*best.shape, 1, 4))[..., 0, :]
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.where(q[..., :1] < 0, -q, q)


def quat_multiply(a: Tensor, b: Tensor) -> Tensor:
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], -1)


def bind_to_world(local_means: Tensor, local_quats: Tensor, local_log_scales: Tensor, binding: Tensor,
                  origins: Tensor, rots: Tensor, scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Bound Gaussians [N] in frames [B, F] -> world means [B,N,3], quats [B,N,4], scales [B,N,3]."""
    o, r, s = origins[:, binding], rots[:, binding], scales[:, binding]  # [B, N, ...]
    means = (r @ (local_means[None, :, :, None] * s[..., None, None]))[..., 0] + o
    quats = quat_multiply(rotmat_to_quat(r), local_quats[None].expand(r.shape[0], -1, -1))
    sc = torch.exp(local_log_scales)[None] * s[..., None]
    return means, quats, sc


def world_to_local(means: Tensor, binding: Tensor, origins: Tensor, rots: Tensor, scales: Tensor) -> Tensor:
    """World positions [N, 3] of Gaussians bound to ``binding`` -> local positions (rest frames [1, F])."""
    o, r, s = origins[0, binding], rots[0, binding], scales[0, binding]
    return (r.transpose(-1, -2) @ (means - o)[..., None])[..., 0] / s[:, None]
