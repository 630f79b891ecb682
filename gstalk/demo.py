"""The built-in demo: a procedural Gaussian head rendered to an image, a turntable and a PLY.

Until the fitting pipeline lands, this exercises everything below it on any machine:
the Gaussian set, SH colour, the rasterizer (gsplat on CUDA, the PyTorch reference on
CPU), the PLY writer and the video encoder.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gstalk.config import DemoConfig, RenderImageConfig, resolve_device
from gstalk.errors import InputError
from gstalk.gaussians import GaussianSet, load_ply, save_ply
from gstalk.io.atomic import ensure_dir
from gstalk.io.media import write_image, write_video
from gstalk.render import orbit_cameras, rasterize


def _fibonacci_sphere(n: int) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64) + 0.5
    phi = torch.acos(1 - 2 * i / n)
    theta = math.pi * (1 + 5**0.5) * i
    return torch.stack([torch.cos(theta) * torch.sin(phi), torch.cos(phi), torch.sin(theta) * torch.sin(phi)], -1)


def _ellipsoid(n: int, center, radii, color, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = _fibonacci_sphere(n) * torch.tensor(radii, dtype=torch.float64) + torch.tensor(center, dtype=torch.float64)
    c = torch.tensor(color, dtype=torch.float64).expand(n, 3)
    return p, c, torch.full((n,), scale, dtype=torch.float64)


def demo_scene(sh_degree: int = 3, density: int = 1) -> GaussianSet:
    """A stylised head of Gaussians facing +z (skin, hair cap, eyes, nose, lips), y up, ~0.2 m tall.

    The skin gets a view-dependent sheen in its degree-1 SH terms so that SH evaluation
    shows in the turntable.
    """
    parts = [
        _ellipsoid(1800 * density, (0, 0, 0), (0.075, 0.1, 0.085), (0.85, 0.66, 0.55), 0.006),  # skin
        _ellipsoid(900 * density, (0, 0.03, -0.012), (0.08, 0.085, 0.085), (0.25, 0.15, 0.08), 0.007),  # hair
        _ellipsoid(120 * density, (-0.028, 0.018, 0.075), (0.012, 0.008, 0.006), (0.97, 0.97, 0.95), 0.0025),
        _ellipsoid(120 * density, (0.028, 0.018, 0.075), (0.012, 0.008, 0.006), (0.97, 0.97, 0.95), 0.0025),
        _ellipsoid(60 * density, (-0.028, 0.018, 0.081), (0.005, 0.005, 0.002), (0.15, 0.25, 0.45), 0.0018),
        _ellipsoid(60 * density, (0.028, 0.018, 0.081), (0.005, 0.005, 0.002), (0.15, 0.25, 0.45), 0.0018),
        _ellipsoid(150 * density, (0, -0.005, 0.088), (0.01, 0.025, 0.014), (0.82, 0.6, 0.5), 0.004),  # nose
        _ellipsoid(200 * density, (0, -0.05, 0.072), (0.025, 0.008, 0.01), (0.7, 0.25, 0.28), 0.003),  # lips
    ]
    pts = torch.cat([p for p, _, _ in parts])
    # hair only on the upper back: drop hair points in front of the face or below the ears
    keep = torch.ones(pts.shape[0], dtype=torch.bool)
    start = parts[0][0].shape[0]
    hair = slice(start, start + parts[1][0].shape[0])
    hp = pts[hair]
    keep[hair] = (hp[:, 1] > 0.045) | (hp[:, 2] < -0.02)
    cols = torch.cat([c for _, c, _ in parts])[keep].float()
    scales = torch.cat([s for _, _, s in parts])[keep].float()
    pts = pts[keep].float()
    g = GaussianSet.from_points(pts, cols, scale=0.005, opacity=0.9, sh_degree=sh_degree)
    g.log_scales = torch.log(scales)[:, None].expand(-1, 3).clone()
    if sh_degree >= 1:
        n_skin = parts[0][0].shape[0]
        g.sh[:n_skin, 2] = 0.25  # brighter where the z-term of the degree-1 basis is positive
    return g


@dataclass
class DemoResult:
    image: Path
    video: Path
    ply: Path
    gaussians: int
    size: int
    device: str
    backend: str
    ms_per_frame: float


def _turntable(g: GaussianSet, out: Path, size: int, frames: int, fps: float, radius: float,
               center, device: torch.device, stem: str) -> tuple[Path, Path, str, float]:
    g = g.to(device)
    cams = orbit_cameras(frames, radius, size, size, fov_y_deg=30.0, target=center, elevation_deg=10.0)
    backend = ""
    times: list[float] = []

    def frame_iter():
        nonlocal backend
        with torch.no_grad():
            for i in range(frames):
                t0 = time.perf_counter()
                r = rasterize(g, cams[i], background=1.0)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                backend = r.backend
                yield r.colors[0]

    video = write_video(out / f"{stem}_turntable.mp4", frame_iter(), fps=fps)
    with torch.no_grad():
        still = rasterize(g, cams[0], background=1.0).colors[0]
    image = write_image(out / f"{stem}.png", still)
    ms = 1000.0 * sorted(times)[len(times) // 2]
    return image, video, backend, ms


def run_demo(cfg: DemoConfig) -> DemoResult:
    device = resolve_device(cfg.device)
    if cfg.frames < 1:
        raise InputError("--frames must be at least 1")
    if cfg.sh_degree not in (0, 1, 2, 3):
        raise InputError("--sh-degree must be 0, 1, 2 or 3")
    size = cfg.size or (512 if device.type == "cuda" else 160)
    if size < 16:
        raise InputError("--size must be at least 16 pixels")
    out = ensure_dir(cfg.out)
    g = demo_scene(cfg.sh_degree, density=4 if device.type == "cuda" else 1)
    ply = save_ply(g, out / "demo_scene.ply")
    image, video, backend, ms = _turntable(g, out, size, cfg.frames, cfg.fps, 0.55, (0.0, 0.0, 0.0), device, "demo")
    return DemoResult(image, video, ply, len(g), size, str(device), backend, ms)


def render_ply_turntable(cfg: RenderImageConfig) -> DemoResult:
    device = resolve_device(cfg.device)
    g = load_ply(cfg.ply)
    if len(g) == 0:
        raise InputError(f"{cfg.ply} holds no Gaussians")
    if cfg.size < 16 or cfg.frames < 1:
        raise InputError("--size must be at least 16 and --frames at least 1")
    out = ensure_dir(cfg.out)
    center = g.means.median(dim=0).values
    extent = float((g.means - center).norm(dim=-1).quantile(0.95)) if len(g) > 1 else 1.0
    radius = cfg.radius or max(extent, 1e-3) / math.tan(math.radians(15.0)) * 1.1
    image, video, backend, ms = _turntable(g, out, cfg.size, cfg.frames, cfg.fps, radius, center.tolist(), device,
                                           cfg.ply.stem)
    return DemoResult(image, video, cfg.ply, len(g), cfg.size, str(device), backend, ms)


__all__ = ["DemoResult", "demo_scene", "render_ply_turntable", "run_demo"]
