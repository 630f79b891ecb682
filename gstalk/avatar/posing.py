"""The per-Gaussian posing step: triangle binding and the deformation outputs applied to every
Gaussian of every frame.

``pose_gaussians_torch`` is the reference (differentiable, any device); the fused CUDA kernel
``csrc/pose_kernels.cu`` does the same in one pass a Gaussian and serves inference on a GPU
(render, drive, viewer, export). ``pose_gaussians`` picks between them. For Gaussian i bound to
triangle f (``binding[i] = f``; -1 = free, such as the torso):

    mean  = R_f (s_f * local_mean) + o_f + R_f R0_f^T d_mean     (offsets are in rest space)
    quat  = quat(R_f) * local_quat * d_quat
    scale = s_f * exp(local_log_scale + d_log_scale)

and for free Gaussians mean = local_mean + d_mean, quat = local_quat * d_quat,
scale = exp(local_log_scale + d_log_scale). Without deformation the d terms are left out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gstalk.avatar.binding import quat_multiply, rotmat_to_quat
from gstalk.kernels import cuda


def pose_gaussians_torch(tri_o: Tensor, tri_r: Tensor, tri_s: Tensor, rest_r: Tensor, local_means: Tensor,
                         local_quats: Tensor, local_log_scales: Tensor, binding: Tensor,
                         d_means: Tensor | None = None, d_quats: Tensor | None = None,
                         d_log_scales: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Frames [B, F] and N Gaussians -> world means [B, N, 3], quats [B, N, 4], scales [B, N, 3]."""
    B = tri_o.shape[0]
    bound = binding >= 0
    f = binding.clamp_min(0).long()
    o, r, s = tri_o[:, f], tri_r[:, f], tri_s[:, f]  # [B, N, ...]
    b3 = bound[None, :, None]
    lm = local_means[None].expand(B, -1, -1)
    means = torch.where(b3, (r @ (lm * s[..., None])[..., None])[..., 0] + o, lm)
    lq = local_quats[None].expand(B, -1, -1)
    quats = torch.where(bound[None, :, None], quat_multiply(rotmat_to_quat(r), lq), lq)
    log_s = local_log_scales[None]
    if d_log_scales is not None:
        log_s = log_s + d_log_scales
    scales = torch.exp(log_s) * torch.where(b3, s[..., None], torch.ones_like(s[..., None]))
    if d_means is not None:
        rel = r @ rest_r[f].transpose(-1, -2)[None]  # rest space -> posed, per bound Gaussian
        means = means + torch.where(b3, (rel @ d_means[..., None])[..., 0], d_means)
        quats = quat_multiply(quats, d_quats)
    return means, quats, scales


def cuda_kernel_available() -> bool:
    """Whether the fused kernel builds and loads here (asked once, :mod:`gstalk.kernels`)."""
    return cuda.available("pose")


def pose_gaussians(tri_o: Tensor, tri_r: Tensor, tri_s: Tensor, rest_r: Tensor, local_means: Tensor,
                   local_quats: Tensor, local_log_scales: Tensor, binding: Tensor, d_means: Tensor | None = None,
                   d_quats: Tensor | None = None, d_log_scales: Tensor | None = None,
                   backend: str = "auto", binding_i32: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The fused CUDA kernel for CUDA tensors when no gradient is needed ('auto'), else the twin.
    ``backend`` 'torch' or 'cuda' forces one; ``binding_i32``: ``binding`` as contiguous int32
    (the kernel's; converted here when not given)."""
    args = (tri_o, tri_r, tri_s, rest_r, local_means, local_quats, local_log_scales)
    deform = (d_means, d_quats, d_log_scales) if d_means is not None else ()
    if backend == "auto":
        grads = torch.is_grad_enabled() and any(t.requires_grad for t in args + deform)
        use_cuda = tri_o.is_cuda and not grads and cuda_kernel_available()
    else:
        use_cuda = backend == "cuda"
    if not use_cuda:
        return pose_gaussians_torch(*args, binding, d_means, d_quats, d_log_scales)
    f32 = [t.detach().float().contiguous() for t in args]
    d32 = [t.detach().float().contiguous() for t in deform] if deform else [None, None, None]
    b32 = binding_i32 if binding_i32 is not None else binding.to(torch.int32).contiguous()
    means, quats, scales = cuda.load("pose").pose(*f32, b32, *d32)
    return means, quats, scales


__all__ = ["cuda_kernel_available", "pose_gaussians", "pose_gaussians_torch"]
