"""The audio encoder (1D convolutions over a frame's feature window) and the temporal
smoother (attention over neighbouring frames' codes), so that lips move smoothly."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class AudioEncoder(nn.Module):
    """``[B, W, D]`` feature windows -> ``[B, code_dim]`` codes.

    Strided 1D convolutions along the window (time) halve it until a few steps remain,
    then a linear layer mixes what is left.
    """

    def __init__(self, in_dim: int, window: int, code_dim: int = 32, hidden: int = 64):
        super().__init__()
        self.in_dim, self.window, self.code_dim = in_dim, window, code_dim
        layers: list[nn.Module] = [nn.Conv1d(in_dim, hidden, 3, padding=1), nn.LeakyReLU(0.02)]
        w = window
        while w > 4:
            layers += [nn.Conv1d(hidden, hidden, 3, stride=2, padding=1), nn.LeakyReLU(0.02)]
            w = (w + 1) // 2
        self.conv = nn.Sequential(*layers)
        self.out = nn.Linear(hidden * w, code_dim)
        # variance-preserving init (PyTorch's default shrinks the signal about 3x a layer, so a
        # fresh encoder gives every frame nearly the same code and the field cannot tell them apart)
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, a=0.02, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.out.weight, std=1 / math.sqrt(hidden * w))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1:] != (self.window, self.in_dim):
            raise ValueError(f"audio windows must be [B, {self.window}, {self.in_dim}], got {tuple(x.shape)}")
        h = self.conv(x.transpose(1, 2))  # [B, hidden, w]
        return self.out(h.flatten(1))


class TemporalSmoother(nn.Module):
    """Attention over the codes of ``2k+1`` neighbouring frames: ``[T, C]`` -> ``[T, C]``.

    At initialisation the attention is uniform (a moving average); training learns where to
    look. Sequence edges are padded by repeating the first/last code.
    """

    def __init__(self, code_dim: int, k: int = 4):
        super().__init__()
        self.k = k
        self.att = nn.Sequential(nn.Conv1d(code_dim, 16, 3, padding=1), nn.LeakyReLU(0.02),
                                 nn.Conv1d(16, 1, 3, padding=1))
        nn.init.zeros_(self.att[-1].weight)
        nn.init.zeros_(self.att[-1].bias)

    def neighbours(self, codes: Tensor) -> Tensor:
        """[T, C] -> [T, 2k+1, C] windows of neighbouring codes."""
        k = self.k
        padded = torch.cat([codes[:1].expand(k, -1), codes, codes[-1:].expand(k, -1)])
        return padded.unfold(0, 2 * k + 1, 1).transpose(1, 2)  # [T, 2k+1, C]

    def attend(self, win: Tensor) -> Tensor:
        """[B, 2k+1, C] neighbourhoods -> [B, C] attention-weighted codes."""
        w = torch.softmax(self.att(win.transpose(1, 2))[:, 0], dim=-1)  # [B, 2k+1]
        return (w[..., None] * win).sum(1)

    def forward(self, codes: Tensor) -> Tensor:
        return self.attend(self.neighbours(codes))


UNSEEN_STD = 1e6  # the normalisation of a feature constant over the training frames: ignored


class AudioModel(nn.Module):
    """Encoder + smoother, with the feature normalisation kept as buffers."""

    def __init__(self, in_dim: int, window: int, code_dim: int = 32, smooth_k: int = 4):
        super().__init__()
        self.encoder = AudioEncoder(in_dim, window, code_dim)
        self.smoother = TemporalSmoother(code_dim, smooth_k)
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))

    def set_normalisation(self, windows: Tensor) -> None:
        flat = windows.reshape(-1, windows.shape[-1])
        self.mean.copy_(flat.mean(0))
        # a feature that never varied in training (a viseme the clip never uses) taught the
        # encoder nothing: new audio that has it must not feed it in at 1000x (the std floor
        # it used to get), so it is ignored; rare ones are amplified at most 10x
        std = flat.std(0)
        self.std.copy_(torch.where(std < 1e-3, torch.full_like(std, UNSEEN_STD), std.clamp_min(0.1)))

    def forward(self, windows: Tensor, smooth: bool = True) -> Tensor:
        """[T, W, D] consecutive frames' windows -> [T, code_dim]."""
        codes = self.encoder((windows - self.mean) / self.std)
        return self.smoother(codes) if smooth and codes.shape[0] > 1 else codes

    def codes_at(self, windows: Tensor, frames: Tensor) -> Tensor:
        """Smoothed codes of some ``frames`` [B] of a sequence's ``windows`` [T, W, D] (encodes
        only those frames and their neighbours)."""
        k = self.smoother.k
        idx = (frames[:, None] + torch.arange(-k, k + 1, device=frames.device)[None]).clamp(0, windows.shape[0] - 1)
        codes = self.encoder((windows[idx.reshape(-1)] - self.mean) / self.std)
        return self.smoother.attend(codes.reshape(len(frames), 2 * k + 1, -1))
