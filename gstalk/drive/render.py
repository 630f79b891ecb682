"""``gstalk render AVATAR --audio speech.wav``: drive an avatar with new audio (or a tracked
expression sequence) and write an H.264 mp4 with the sound muxed in.

The conditions of each frame come from :mod:`gstalk.avatar.conditions` (lip model, head
motion, posing) and the camera from :mod:`gstalk.avatar.cameras` (tracked, still, orbit or a
JSON path). Frame k shows time k / fps and the audio is cut to exactly ``frames / fps``
seconds, so picture and sound stay in sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gstalk.avatar.cameras import cameras_for
from gstalk.avatar.conditions import frames_iter, lip_model, load_driver, plate_background
from gstalk.avatar.io import load_avatar
from gstalk.io.media import check_size, write_video

Progress = Callable[[str, int, int], None]


@dataclass
class DriveResult:
    video: Path
    frames: int
    fps: float
    seconds: float
    render_fps: float


def drive(avatar_dir: str | Path, out: str | Path, audio_path: str | Path | None = None,
          expressions_path: str | Path | None = None, camera: str = "track", head: str = "track",
          size: int = 0, fps: float = 0.0, device: str = "auto", deform: bool = True,
          progress: Progress | None = None, compile_field: bool = False, lips: str | None = None,
          precision: str = "float32", log: Callable[[str], None] | None = None) -> DriveResult:
    import time

    from gstalk.config import resolve_device

    dev = resolve_device(device)
    av, motion = load_avatar(avatar_dir, dev)
    for note in av.notes if log is not None else ():
        log(note)
    av.set_precision(precision)
    if compile_field:
        av.compile_field(mode="reduce-overhead" if dev.type == "cuda" else None)
    fps = fps or av.cfg.fps
    size = size or av.cfg.resolution
    check_size(size)
    audio, expressions, n, fps = load_driver(audio_path, expressions_path, fps)
    if audio is not None:
        lip_model(av, lips)  # refuse an unknown or missing lip model before any work
    cams = cameras_for(av, motion, n, camera, size)
    bg = plate_background(av, motion, size) if camera in ("track", "still") else None
    t0 = time.perf_counter()
    frames = frames_iter(av, motion, n, fps, cams, audio, expressions, head, deform, bg, lips=lips, log=log,
                         uint8=True)
    path = write_video(Path(out), frames, fps, audio, n_frames=n, progress=progress)
    dt = time.perf_counter() - t0
    return DriveResult(path, n, fps, n / fps, n / dt)
