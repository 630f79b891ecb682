"""What the half-precision deformation field changes in a fitted avatar's frames, and its speed.

    python scripts/bench_precision.py AVATAR [--audio speech.wav] [--frames 25] [--size 512]

Renders the same frames twice as ``gstalk render`` does (batches of 8 over the avatar's
background): with the field in float32 and with ``--precision half`` (float16 on a GPU,
bfloat16 on a CPU; ``--half`` picks one). Prints, over the frames as 8-bit images, the PSNR of the half-precision
frames against the float32 ones, the largest difference in any pixel and the share of pixel
values that changed at all; and the frames per second of each (the first batch of each is a
warm-up and not timed). Without ``--audio`` the avatar is driven by its training track.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gstalk.avatar.io import load_avatar  # noqa: E402
from gstalk.config import resolve_device  # noqa: E402
from gstalk.avatar.cameras import cameras_for  # noqa: E402
from gstalk.avatar.conditions import frames_iter, plate_background, training_expressions  # noqa: E402
from gstalk.errors import GstalkError  # noqa: E402
from gstalk.eval.bench import device_name  # noqa: E402
from gstalk.io.video import load_audio  # noqa: E402


def render_all(av, motion, n, fps, cams, audio, expressions, bg, batch):
    """uint8 frames [n, S, S, 3] on the host, and seconds per frame after the first batch."""
    frames, t0 = [], None
    for k, f in enumerate(frames_iter(av, motion, n, fps, cams, audio, expressions, "track", True, bg, batch)):
        frames.append((f.clamp(0, 1) * 255).round().to(torch.uint8).cpu())
        if k == batch - 1:  # the first batch built the field's cache (and warmed the GPU)
            t0 = time.perf_counter()
    dt = (time.perf_counter() - t0) / max(1, n - batch) if t0 is not None and n > batch else float("nan")
    return torch.stack(frames), dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("avatar", type=Path)
    ap.add_argument("--audio", type=Path, default=None)
    ap.add_argument("--frames", type=int, default=25)
    ap.add_argument("--size", type=int, default=0, help="0: the avatar's resolution")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--half", default="half", choices=["half", "float16", "bfloat16"],
                    help="the reduced precision to compare ('half': float16 on a GPU, bfloat16 on a CPU)")
    a = ap.parse_args()
    dev = resolve_device(a.device)
    av, motion = load_avatar(a.avatar, dev)
    fps, size = av.cfg.fps, a.size or av.cfg.resolution
    audio = load_audio(a.audio) if a.audio else None
    expressions = None if audio is not None else training_expressions(motion)
    n = a.frames if audio is not None else min(a.frames, len(motion["jaw"]))
    cams = cameras_for(av, motion, n, "track", size)
    bg = plate_background(av, motion, size)
    print(f"device: {device_name(dev)}  (torch {torch.__version__})")
    print(f"avatar: {a.avatar} ({av.num_gaussians} Gaussians), {n} frames at {size}x{size}, "
          f"driven by {'audio ' + str(a.audio) if audio is not None else 'its training track'}")
    results = {}
    for prec in ("float32", "half"):
        av.set_precision(a.half if prec == "half" else prec)
        frames, dt = render_all(av, motion, n, fps, cams, audio, expressions, bg, a.batch)
        results[prec] = (frames, dt, str(av.frozen_field().dtype).removeprefix("torch."))
    ref, got = results["float32"][0].float(), results["half"][0].float()
    diff = got - ref
    mse = diff.square().mean(dim=(1, 2, 3)) / 255 ** 2
    psnr = torch.where(mse > 0, -10 * torch.log10(mse.clamp_min(1e-20)), torch.full_like(mse, float("inf")))
    print(f"half precision is {results['half'][2]}")
    finite = psnr[torch.isfinite(psnr)]
    mean = float(finite.mean()) if len(finite) else float("inf")
    print(f"  PSNR against float32: mean {mean:.1f} dB over the frames that differ, lowest {float(psnr.min()):.1f} dB "
          f"({int(torch.isinf(psnr).sum())} of {n} frames identical)")
    print(f"  largest pixel difference {float(diff.abs().max()):.0f}/255; values changed: "
          f"{100 * float((diff != 0).float().mean()):.3f} %, by more than 1/255: "
          f"{100 * float((diff.abs() > 1).float().mean()):.4f} %")
    for prec in ("float32", "half"):
        dt = results[prec][1]
        print(f"  {prec:<8} {1000 * dt:8.1f} ms/frame  {1 / dt if np.isfinite(dt) else float('nan'):7.1f} frames/s")


if __name__ == "__main__":
    try:
        main()
    except GstalkError as e:  # a missing or unreadable avatar or audio: one line, not a traceback
        sys.exit(f"bench_precision: {e}")
