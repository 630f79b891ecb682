"""Typed configuration: one dataclass per command; the CLI options are generated from these.

Field docstrings (the string literal under each field) become the ``--help`` text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro
from typing_extensions import Annotated

Positional = tyro.conf.Positional
Device = Literal["auto", "cpu", "cuda"]


@dataclass
class DemoConfig:
    """Render the built-in Gaussian scene: a still image, a turntable video and a PLY."""

    out: Path = Path("out/demo")
    """Folder for the outputs (created if missing)."""
    size: int = 0
    """Image size in pixels (square). 0 picks 512 on a GPU and 160 on a CPU."""
    frames: int = 48
    """Frames in the turntable video (one full turn)."""
    fps: float = 24.0
    """Frame rate of the turntable video."""
    device: Device = "auto"
    """Where to render: 'auto' uses CUDA when available."""
    sh_degree: int = 3
    """Spherical-harmonics degree of the scene's colours (0..3)."""


@dataclass
class RenderImageConfig:
    """Render a Gaussian PLY file from an orbit of cameras (turntable) to an mp4 and a PNG."""

    ply: Annotated[Path, tyro.conf.Positional]
    """A 3DGS PLY file (gstalk's or any splat tool's)."""
    out: Path = Path("out/render")
    """Folder for the outputs."""
    size: int = 256
    """Image size in pixels (square)."""
    frames: int = 48
    """Frames in the turntable video."""
    fps: float = 24.0
    radius: float = 0.0
    """Camera distance from the scene centre; 0 fits the scene's extent."""
    device: Device = "auto"


@dataclass
class PendingConfig:
    """A command whose capability has not landed yet; it says so and exits non-zero."""

    args: Annotated[tuple[str, ...], tyro.conf.Positional] = ()
    """Arguments (ignored until the command exists)."""


def resolve_device(device: Device):
    import torch

    from gstalk.errors import InputError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but no CUDA GPU is available (use --device cpu)")
    return torch.device(device)
