"""Camera paths for an avatar's frames: its tracked camera, an orbit around the head, or a
JSON path file (world-to-camera matrices in OpenCV axes, intrinsics in pixels at the output
size). Used by render, eval, export and the viewer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from gstalk.avatar.model import Avatar
from gstalk.errors import FileFormatError, InputError
from gstalk.render import Cameras, look_at


def pingpong(n_src: int, n: int) -> np.ndarray:
    if n_src <= 1:
        return np.zeros(n, int)
    period = 2 * (n_src - 1)
    k = np.arange(n) % period
    return np.where(k < n_src, k, period - k)


def cameras_for(av: Avatar, motion: dict, n: int, mode: str, size: int) -> Cameras:
    """'track'/'still': the tracked camera; 'orbit': a turn around the head; or a JSON path file
    with {"viewmats": [[4x4], ...], "K": [[3x3]]}: world-to-camera matrices (OpenCV axes), one a
    frame (fewer are played back and forth), and optionally the intrinsics in pixels at the
    output ``size`` (default: the tracked camera's, scaled to it)."""
    src = float(av.cfg.resolution)
    K = av.K.clone().float()
    K[:2] *= size / src
    if mode in ("track", "still"):
        return Cameras(av.viewmat.float()[None].expand(n, 4, 4).clone(), K[None].expand(n, 3, 3).clone(), size, size)
    if mode == "orbit":
        # one turn around the head (y up), starting from the tracked viewpoint
        centre = torch.as_tensor(np.median(motion["translation"], 0), dtype=torch.float32)
        cam_pos = (-av.viewmat[:3, :3].T @ av.viewmat[:3, 3]).float().cpu()
        rel = cam_pos - centre
        mats = []
        for k in range(n):
            a = 2 * math.pi * k / max(n, 1)
            ry = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
            mats.append(look_at(centre + ry @ rel, centre))
        return Cameras(torch.stack(mats), K[None].expand(n, 3, 3).clone(), size, size)
    p = Path(mode)
    if not p.is_file():
        if p.suffix.lower() == ".json":
            raise InputError(f"no such camera path file: {p}")
        raise InputError(f"--camera must be track, still, orbit or a JSON camera path file; {mode!r} is none")
    try:
        d = json.loads(p.read_text())
        vm = torch.tensor(d["viewmats"], dtype=torch.float32)
        if "K" in d:
            K = torch.tensor(d["K"], dtype=torch.float32)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise FileFormatError(f"{p}: expected {{\"viewmats\": [[4x4], ...]}} ({e})") from None
    if vm.dim() != 3 or vm.shape[1:] != (4, 4) or len(vm) == 0:
        raise FileFormatError(f"{p}: viewmats must be a list of 4x4 matrices")
    if K.shape != (3, 3):
        raise FileFormatError(f"{p}: K must be a 3x3 matrix (the camera intrinsics at the output size)")
    idx = torch.as_tensor(pingpong(len(vm), n) if len(vm) < n else np.arange(n))
    return Cameras(vm[idx], K[None].expand(n, 3, 3).clone(), size, size)
