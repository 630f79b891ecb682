"""A small avatar folder made directly from the stand-in head (no clip, no training): for the
tests of things that read avatars (export, viewer). Its networks are randomised so that the
deformation and the audio-to-motion model do something."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gstalk.avatar.io import save_avatar
from gstalk.avatar.model import Avatar, AvatarConfig, concat_sets, init_gaussians, torso_gaussians
from gstalk.head.flame import STANDIN_PATH, load_head_model
from gstalk.head.tracker import VIEWMAT


def make_avatar(folder: Path, n_frames: int = 12, fps: float = 25.0, resolution: int = 64, seed: int = 0,
                n_expr: int = 4, torso: int = 40) -> Path:
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = load_head_model(STANDIN_PATH, n_shape=6, n_expr=n_expr)
    shape = torch.randn(head.n_shape, generator=g) * 0.5
    bound, region = init_gaussians(head, shape, per_triangle=1, sh_degree=1, seed=seed)
    bound.sh[:, 0] = torch.rand(len(bound), 3, generator=g) * 2 - 1   # varied colour
    bound.sh[:, 1:] = torch.randn(len(bound), 3, 3, generator=g) * 0.2  # and view dependence
    pts = torch.stack([torch.rand(torso, generator=g) * 0.3 - 0.15, -0.18 - torch.rand(torso, generator=g) * 0.1,
                       torch.rand(torso, generator=g) * 0.1 - 0.05], 1) + torch.tensor([0.0, 0.0, -0.6])
    tg, treg = torso_gaussians(pts, torch.rand(torso, 3, generator=g), 0.02, 1)
    gs = concat_sets(bound, tg)
    cfg = AvatarConfig(fps=fps, resolution=resolution, feature_kind="mel", window=16, feature_dim=83,
                       expr_cond=n_expr, head_model=head.reference(), n_shape=head.n_shape, n_expr=head.n_expr,
                       seed=seed)
    f = 1.6 * resolution
    K = torch.tensor([[f, 0, resolution / 2], [0, f, resolution / 2], [0, 0, 1.0]])
    av = Avatar(cfg, head, shape, gs, torch.cat([region, treg]), K, torch.as_tensor(VIEWMAT, dtype=torch.float32))
    with torch.no_grad():
        for mod in (av.field, av.a2m.head):
            for p in mod.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        av.a2m.out_std.fill_(4.0)  # audio moves the jaw (pitch) and the expressions visibly
        av.a2m.out_std[:3] = torch.tensor([2.0, 0.05, 0.05])
        av.a2m.out_mean[0] = 0.12
    t = np.arange(n_frames) / fps
    motion = {
        "global_rot": np.stack([0.05 * np.sin(2 * t), 0.2 * np.sin(3 * t), np.zeros_like(t)], 1),
        "neck": np.zeros((n_frames, 3)),
        "translation": np.stack([0.01 * np.sin(t), np.zeros_like(t), np.full_like(t, -0.6)], 1),
        "eyes": np.zeros((n_frames, 6)),
        "eyelids": np.zeros((n_frames, 2)),
        "jaw": np.stack([0.15 * (1 + np.sin(7 * t)), np.zeros_like(t), np.zeros_like(t)], 1),
        "expr": rng.normal(0, 0.5, (n_frames, n_expr)),
    }
    bg = np.full((resolution, resolution, 3), 200, np.uint8)
    return save_avatar(av, folder, motion, bg)


def tone_speech(path: Path, seconds: float = 0.6, sr: int = 16000) -> Path:
    """A short speech-like wav (voiced bursts) that passes gstalk's speech check."""
    from gstalk.demo import synth_speech
    from gstalk.io.video import write_wav

    audio, _ = synth_speech(seconds + 1.0, seed=1)  # its first syllable starts at 0.3 s
    start = int(0.3 * sr)
    return write_wav(path, audio[start: start + int(seconds * sr)], sr)
