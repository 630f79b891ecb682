"""Writing images and videos (PyAV for video, imageio for stills), atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from gstalk.errors import InputError, OutputError
from gstalk.io.atomic import atomic_path


def to_uint8(image) -> np.ndarray:
    """A float image in [0, 1] ([H, W, 3] tensor or array) to uint8 RGB."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy()
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_image(path: str | os.PathLike, image) -> Path:
    """Write an [H, W, 3] image (float in [0, 1] or uint8) as PNG/JPEG, atomically."""
    import imageio.v3 as iio

    arr = to_uint8(image)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise InputError(f"image must be [H, W, 3], got {arr.shape}")
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, arr)
    return Path(path)


def write_video(path: str | os.PathLike, frames: Iterable, fps: float = 25.0, crf: int = 18) -> Path:
    """Encode frames ([H, W, 3] float in [0, 1] or uint8) to an H.264 mp4, atomically.

    Frames are streamed: only one is held at a time. Odd sizes are padded by one pixel
    (yuv420p needs even dimensions).
    """
    import av

    n = 0
    with atomic_path(path) as tmp:
        try:
            container = av.open(str(tmp), mode="w")
        except (OSError, av.error.FFmpegError) as e:
            raise OutputError(f"cannot write video {path}: {e}") from None
        stream = None
        try:
            for frame in frames:
                arr = to_uint8(frame)
                if arr.ndim != 3 or arr.shape[2] != 3:
                    raise InputError(f"video frames must be [H, W, 3], got {arr.shape}")
                h, w = arr.shape[:2]
                if h % 2 or w % 2:
                    arr = np.pad(arr, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
                if stream is None:
                    from fractions import Fraction

                    stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
                    stream.width, stream.height = arr.shape[1], arr.shape[0]
                    stream.pix_fmt = "yuv420p"
                    stream.options = {"crf": str(crf), "preset": "medium"}
                elif (arr.shape[1], arr.shape[0]) != (stream.width, stream.height):
                    raise InputError("all video frames must have the same size")
                for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                    container.mux(packet)
                n += 1
            if stream is None:
                raise InputError("no frames to write")
            for packet in stream.encode():
                container.mux(packet)
        finally:
            container.close()
    return Path(path)


def probe_video(path: str | os.PathLike) -> dict:
    """Frame count, fps, width and height of a video file (decoded, not from metadata)."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(s))
        return {"frames": n, "fps": float(s.average_rate), "width": s.codec_context.width,
                "height": s.codec_context.height, "codec": s.codec_context.name}
