"""Image metrics of renders against photos ([H, W, 3] float in [0, 1]): kornia's PSNR and SSIM,
shared by training's progress and evaluation."""

from __future__ import annotations

import torch


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """kornia's PSNR of images in [0, 1] (infinite for equal ones; JSON writes it as null)."""
    import kornia

    return float(kornia.metrics.psnr(a, b, 1.0))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> float:
    """kornia's SSIM (mean over the image, ``window`` px Gaussian window)."""
    import kornia

    return float(kornia.metrics.ssim(a.permute(2, 0, 1)[None], b.permute(2, 0, 1)[None], window).mean())
