"""A small avatar folder made directly from the stand-in head (no clip, no training): for the
tests of things that read avatars (export, viewer). Its networks are randomised so that the
deformation and the audio-to-motion model do something."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gstalk.avatar.io import save_avatar
from gstalk.avatar.synthetic import standin_avatar


def make_avatar(folder: Path, n_frames: int = 12, fps: float = 25.0, resolution: int = 64, seed: int = 0,
                n_expr: int = 4, torso: int = 40) -> Path:
    rng = np.random.default_rng(seed)
    av = standin_avatar(resolution=resolution, n_shape=6, n_expr=n_expr, expr_cond=n_expr, shape_std=0.5,
                        torso=torso, seed=seed)
    av.cfg.fps = fps
    with torch.no_grad():
        av.a2m.out_std.fill_(0.4)  # audio moves the jaw (pitch) and the expressions visibly
        av.a2m.out_std[:3] = torch.tensor([0.2, 0.005, 0.005])
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
