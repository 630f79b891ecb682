"""Typed configuration: one dataclass per command; the CLI options are generated from these.

Field docstrings (the string literal under each field) become the ``--help`` text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
class PrepareOptions:
    """How a clip becomes a dataset folder (see docs/dataset.md)."""

    fps: float = 25.0
    """Constant output frame rate; variable-rate clips are resampled to it."""
    resolution: int = 512
    """Working resolution of the square crop, in pixels."""
    crop_scale: float = 3.2
    """Crop size as a multiple of the detected face box (head and shoulders)."""
    crop_down: float = 0.25
    """Shift of the crop centre below the face centre, in face heights (towards the shoulders)."""
    holdout: float = 1 / 11
    """Fraction of frames at the end held out for evaluation."""
    min_face_fraction: float = 0.5
    """Fail if a face is found in fewer frames than this."""
    min_seconds: float = 2.0
    """Fail on clips shorter than this."""
    smooth_seconds: float = 0.6
    """Time scale of the crop-centre smoothing (larger = steadier crop)."""
    landmark_sigma: float = 0.7
    """Temporal Gaussian smoothing of landmarks, in frames (0 = off)."""
    jpeg_quality: int = 95
    preview: bool = True
    """Write preview.mp4 (landmarks and masks over the frames)."""
    detect_size: int = 384
    """Longest side of the downscaled frame used for face detection."""


@dataclass
class PrepareConfig:
    """Turn a phone clip into a dataset folder: frames, audio, landmarks, masks, signals."""

    clip: Annotated[Path, tyro.conf.Positional]
    """The video (mp4/mov/webm/mkv)."""
    out: Annotated[Path, tyro.conf.Positional]
    """The dataset folder to create (an unfinished one is resumed)."""
    opts: Annotated[PrepareOptions, tyro.conf.arg(name="")] = field(default_factory=PrepareOptions)


@dataclass
class ImportConfig:
    """Import a folder laid out for the NeRF/3DGS talking-head projects (ori_imgs/, parsing/,
    transforms_train/val.json, aud.wav, aud_*.npy, au.csv) as a gstalk dataset."""

    src: Annotated[Path, tyro.conf.Positional]
    """The source folder (e.g. ER-NeRF's data/<name>)."""
    out: Annotated[Path, tyro.conf.Positional]
    """The gstalk dataset folder to create."""
    opts: Annotated[PrepareOptions, tyro.conf.arg(name="")] = field(default_factory=PrepareOptions)


@dataclass
class TrackOptions:
    """How the head model is fitted to a dataset's landmarks."""

    flame: Path | None = None
    """A FLAME-format model (official generic_model.pkl / flame2023.pkl, or .npz). Default:
    $GSTALK_FLAME if set, otherwise gstalk's open stand-in head."""
    embedding: Path | None = None
    """A landmark embedding file (MICA-style .npz or DECA .npy); default: the model's own or a
    derived one."""
    n_shape: int = 100
    """Identity coefficients to fit (capped at what the model has)."""
    n_expr: int = 50
    """Expression coefficients to fit (capped at what the model has)."""
    keyframes: int = 16
    """Frames used to fit the identity shape."""
    iters_rigid: int = 250
    iters_shape: int = 300
    iters_all: int = 400
    init_fov_deg: float = 28.0
    """Initial vertical field of view of the (cropped) camera; refined during tracking."""
    min_fov_deg: float = 10.0
    max_fov_deg: float = 60.0
    """The focal length stays within these vertical fields of view."""
    focal_search: bool = True
    """Choose the focal length by a grid search on keyframes (else start from init_fov_deg)."""
    w_focal_prior: float = 0.01
    """Pull of the focal length toward the initial field of view (log scale)."""
    huber_px: float = 2.0
    """Landmark errors above this many pixels count linearly (robust to outliers)."""
    w_shape: float = 1e-3
    w_expr: float = 1e-3
    w_jaw: float = 1e-2
    w_neck: float = 1.0
    w_eyes: float = 1e-2
    w_smooth: float = 1.0
    """Weight of temporal smoothness (first and second differences) on per-frame parameters."""
    device: Device = "auto"
    preview: bool = True
    """Write track_preview.mp4 (mesh and landmarks over the frames)."""


@dataclass
class TrackConfig:
    """Fit the head model (FLAME or the stand-in) to every frame of a dataset: track.npz."""

    dataset: Annotated[Path, tyro.conf.Positional]
    """A dataset folder made by 'gstalk prepare'."""
    opts: Annotated[TrackOptions, tyro.conf.arg(name="")] = field(default_factory=TrackOptions)


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
