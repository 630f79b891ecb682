"""Writing images and videos (PyAV for video, imageio for stills), atomically."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from gstalk.errors import InputError, OutputError, between, check_value
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


#: The frame rates gstalk writes (frames per second).
MAX_FPS = 1000.0
#: The largest image side gstalk renders (pixels): a batch of 8 frames at 4096 px holds about
#: 2.7 GB of colour, alpha and depth images; much larger sizes fill a machine's memory.
MAX_SIZE = 4096


def check_size(size: int, least: int = 16, option: str = "--size") -> int:
    """``size`` if it is an image side gstalk renders (``least`` to MAX_SIZE pixels), else
    :class:`InputError`."""
    return int(check_value(size, between(least, MAX_SIZE, " pixels"), option))


def check_fps(fps: float) -> float:
    """``fps`` if it is a frame rate a video can have, else :class:`InputError`."""
    return float(check_value(fps, (lambda v: 0 < v <= MAX_FPS, f"above 0 and at most {MAX_FPS:g} frames/s"),
                             "the frame rate"))


VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv")  # containers that hold H.264 with AAC


def check_video_path(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` if an H.264 video can be written there (a name ending in one of
    :data:`VIDEO_SUFFIXES` that is not a folder), else :class:`InputError` naming ``flag``."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{flag} {p} is a folder; give a video file name, e.g. {p / 'talk.mp4'}")
    if p.suffix.lower() not in VIDEO_SUFFIXES:
        raise InputError(f"{flag} {p}: a video is written as {', '.join(VIDEO_SUFFIXES)}; "
                         f"'{p.suffix or '(no extension)'}' is none of them (e.g. {p.with_suffix('.mp4')})")
    return p


def write_video(path: str | os.PathLike, frames: Iterable, fps: float = 25.0, audio: np.ndarray | None = None,
                sample_rate: int = 16000, crf: int = 18, progress: Callable[[str, int, int], None] | None = None,
                n_frames: int | None = None) -> Path:
    """Encode frames ([H, W, 3] float in [0, 1] or uint8) to an H.264 mp4, atomically, with
    ``audio`` (mono float) muxed in as AAC and cut or padded to exactly frames / fps.

    Frames are streamed: a few are held at a time. They are encoded in a worker thread, so
    that the caller's next frames are made (rendered) while the last ones are encoded; a
    frame the caller hands over is not changed until it has been encoded and the next
    :data:`ENCODE_QUEUE` frames have been handed over. Odd sizes are padded by one pixel
    (yuv420p needs even dimensions).
    """
    import queue
    import threading

    import av

    check_video_path(path, "the video")
    check_fps(fps)
    prog = progress or (lambda *a: None)
    n = 0
    with atomic_path(path) as tmp:
        try:
            container = av.open(str(tmp), mode="w")
        except (OSError, av.error.FFmpegError) as e:
            raise OutputError(f"cannot write video {path}: {e}") from None
        stream = container.add_stream("libx264", rate=fps_fraction(fps))
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        astream = None
        if audio is not None:  # every stream must exist before the first packet is written
            astream = container.add_stream("aac", rate=sample_rate)
            astream.layout = "mono"
        todo: queue.Queue = queue.Queue(maxsize=ENCODE_QUEUE)
        failed: list[BaseException] = []

        def encode() -> None:
            try:
                while (arr := todo.get()) is not None:
                    for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                        container.mux(packet)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                failed.append(e)
                while todo.get() is not None:  # let the caller finish handing over
                    pass

        worker = threading.Thread(target=encode, name="gstalk-encode", daemon=True)
        worker.start()
        try:
            try:
                for frame in frames:
                    arr = to_uint8(frame)
                    if arr.ndim != 3 or arr.shape[2] != 3:
                        raise InputError(f"video frames must be [H, W, 3], got {arr.shape}")
                    h, w = arr.shape[:2]
                    if h % 2 or w % 2:
                        arr = np.pad(arr, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
                    if n == 0:
                        stream.width, stream.height = arr.shape[1], arr.shape[0]
                    elif (arr.shape[1], arr.shape[0]) != (stream.width, stream.height):
                        raise InputError("all video frames must have the same size")
                    if failed:
                        break
                    todo.put(arr)
                    n += 1
                    prog("render", n, n_frames or n)
            finally:
                todo.put(None)
                worker.join()
            if failed:
                raise failed[0]
            if n == 0:
                raise InputError("no frames to write")
            for packet in stream.encode():
                container.mux(packet)
            if astream is not None:
                _encode_audio(container, astream, audio, n / fps, sample_rate)
        finally:
            container.close()
    return Path(path)


#: Frames handed to the encoding thread that may wait for it (each one [H, W, 3] uint8).
ENCODE_QUEUE = 2


def _encode_audio(container, astream, audio: np.ndarray, seconds: float, sample_rate: int) -> None:
    import av

    need = int(round(seconds * sample_rate))
    a = np.zeros(need, np.float32)
    a[: min(need, len(audio))] = np.asarray(audio, np.float32)[:need]
    for j in range(0, need, 1024):
        af = av.AudioFrame.from_ndarray(a[None, j:j + 1024], format="flt", layout="mono")
        af.sample_rate = sample_rate
        af.pts = j
        for packet in astream.encode(af):
            container.mux(packet)
    for packet in astream.encode():
        container.mux(packet)


def fps_fraction(fps: float) -> Fraction:
    """A frame rate as the exact fraction the encoder wants (29.97 -> 30000/1001)."""
    return Fraction(fps).limit_denominator(1001)


def probe_video(path: str | os.PathLike) -> dict:
    """Frame count, fps, width and height of a video file (decoded, not from metadata)."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(s))
        return {"frames": n, "fps": float(s.average_rate), "width": s.codec_context.width,
                "height": s.codec_context.height, "codec": s.codec_context.name}
