"""Decoding phone clips with PyAV: rotation metadata, non-square pixels, variable frame
rate to a constant rate, and the audio track aligned to output frame 0.

Frames are streamed one at a time; nothing here holds the whole clip in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from gstalk.errors import FileFormatError, InputError


@dataclass
class VideoInfo:
    """What a clip holds, as displayed (after rotation and pixel aspect correction).

    width/height: display size in pixels; rotation: degrees counter-clockwise applied to the
    stored frames; sar: stored sample aspect ratio; duration: seconds from the first video
    frame to the end of the last; src_fps: average source rate; has_audio: an audio stream
    exists; start_time: timestamp (s) of the first video frame on the container clock
    (from the stream header; :func:`iter_frames` replaces it with the first decoded frame's).
    """

    path: Path
    width: int
    height: int
    stored_width: int
    stored_height: int
    rotation: int
    sar: float
    src_fps: float
    duration: float
    start_time: float
    has_audio: bool
    codec: str
    warnings: list[str] = field(default_factory=list)


def _open(path: str | os.PathLike, name: str | None = None):
    """The container at ``path``; errors name it as ``name`` (default: the path)."""
    import av

    p = Path(path)
    label = name or str(p)
    if not p.is_file():
        raise FileFormatError(f"no such file: {label}")
    try:
        return av.open(str(p))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
        raise FileFormatError(f"cannot read {label} as a media file ({str(e).replace(str(p), label)}). "
                              "Is it a complete video/audio file?") from None


def _stream_rotation(container, stream) -> int:
    """Rotation (degrees, multiple of 90, counter-clockwise to display) from the first frame."""
    import av

    try:
        for frame in container.decode(stream):
            return int(round(frame.rotation / 90.0)) * 90 % 360
    except av.error.FFmpegError:
        return 0
    return 0


def _declared_seconds(container, stream) -> float:
    """How long the file's header says ``stream`` is (NaN when it does not say)."""
    import av

    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return float("nan")


def _wav_header_seconds(path) -> float:
    """The length a WAV file's data chunk declares (FFmpeg reports the length of what is there);
    NaN where the standard library cannot read the header (float or compressed WAV)."""
    import wave

    try:
        with wave.open(str(path), "rb") as w:
            return w.getnframes() / w.getframerate()
    except (wave.Error, EOFError, OSError, ZeroDivisionError):
        return float("nan")


def probe(path: str | os.PathLike) -> VideoInfo:
    """Read the container's metadata (and the first frame, for rotation)."""
    c = _open(path)
    try:
        if not c.streams.video:
            raise FileFormatError(f"{path} has no video stream")
        s = c.streams.video[0]
        cc = s.codec_context
        sar = float(cc.sample_aspect_ratio) if cc.sample_aspect_ratio else 1.0
        sar = sar if sar > 0 else 1.0
        rate = float(s.average_rate or s.guessed_rate or 0) or 25.0
        start = float(s.start_time * s.time_base) if s.start_time is not None else 0.0
        duration = _declared_seconds(c, s)
        rot = _stream_rotation(c, s)
        w, h = cc.width, cc.height
        if w <= 0 or h <= 0:
            raise FileFormatError(f"{path}: video stream has no frame size; the file may be truncated")
        dw = int(round(w * sar)) if sar > 1 else w
        dh = int(round(h / sar)) if sar < 1 else h
        if rot in (90, 270):
            dw, dh = dh, dw
        return VideoInfo(path=Path(path), width=dw, height=dh, stored_width=w, stored_height=h, rotation=rot,
                         sar=sar, src_fps=rate, duration=duration, start_time=start,
                         has_audio=bool(c.streams.audio), codec=cc.name)
    finally:
        c.close()


def _display(img: np.ndarray, info: VideoInfo) -> np.ndarray:
    if info.sar != 1.0:
        import cv2

        w = int(round(img.shape[1] * info.sar)) if info.sar > 1 else img.shape[1]
        h = int(round(img.shape[0] / info.sar)) if info.sar < 1 else img.shape[0]
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    if info.rotation:
        img = np.ascontiguousarray(np.rot90(img, k=info.rotation // 90))
    return img


def iter_frames(path: str | os.PathLike, fps: float, info: VideoInfo | None = None,
                start_frame: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(index, rgb uint8 [H, W, 3])`` at a constant ``fps``, display-oriented.

    Output frame k shows the source frame nearest to time k / fps after the first source
    frame (variable frame rate becomes constant: frames are repeated or dropped). Frames
    before ``start_frame`` are decoded but not converted (for resuming).
    """
    import av

    if fps <= 0:
        raise InputError(f"fps must be positive, got {fps}")
    info = info or probe(path)
    c = _open(path)
    try:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        k = 0
        prev_t: float | None = None
        prev_frame = None
        intervals: list[float] = []
        t0 = None
        try:
            for frame in c.decode(s):
                if frame.pts is None and frame.time is None:
                    continue
                t = float(frame.time) if frame.time is not None else float(frame.pts * s.time_base)
                if t0 is None:
                    t0 = t
                    info.start_time = t0  # audio sample 0 is aligned to this frame
                t -= t0
                if prev_t is not None:
                    if t <= prev_t:  # out-of-order or duplicate timestamp: keep the first
                        continue
                    intervals.append(t - prev_t)
                    mid = 0.5 * (prev_t + t)
                    while k / fps < mid:
                        if k >= start_frame:
                            yield k, _display(prev_frame.to_ndarray(format="rgb24"), info)
                        k += 1
                prev_t, prev_frame = t, frame
        except av.error.FFmpegError as e:
            if prev_frame is None:
                raise FileFormatError(f"cannot decode {path}: {e}") from None
            info.warnings.append(f"decoding stopped early ({e}); the file may be truncated")
        if prev_frame is None:
            raise FileFormatError(f"{path}: no video frames could be decoded")
        last = float(np.median(intervals)) if intervals else 1.0 / info.src_fps
        n_total = max(k + 1, int(round((prev_t + last) * fps)))
        while k < n_total:
            if k >= start_frame:
                yield k, _display(prev_frame.to_ndarray(format="rgb24"), info)
            k += 1
    finally:
        c.close()


def read_audio(path: str | os.PathLike, sample_rate: int = 16000, start: float = 0.0,
               duration: float | None = None, name: str | None = None) -> np.ndarray | None:
    """Decode the first audio stream to float32 mono at ``sample_rate``.

    Sample 0 is at container time ``start`` (silence is padded where the audio starts
    later); the result is trimmed or zero-padded to ``duration`` seconds when given.
    Returns None when the file has no audio stream. Errors name the file as ``name``
    (default: the path; an upload's name for its temporary copy).
    """
    import av

    c = _open(path, name)
    try:
        if not c.streams.audio:
            return None
        s = c.streams.audio[0]
        res = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks: list[np.ndarray] = []
        first_t = None
        try:
            for frame in c.decode(s):
                if first_t is None and frame.time is not None:
                    first_t = float(frame.time)
                for out in res.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in res.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as e:
            if not chunks:
                raise FileFormatError(f"cannot decode the audio of {name or path}: {e}") from None
        audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
        # formats whose header gives the exact length (mp3 and the like only estimate it)
        declared = (_wav_header_seconds(path) if "wav" in c.format.name else
                    _declared_seconds(c, s) if any(f in c.format.name for f in ("mov", "mp4")) else float("nan"))
        got = audio.size / sample_rate
        if audio.size and declared - got > max(0.25, 0.05 * declared):
            from gstalk.errors import warn

            warn(f"{name or path}: the audio stops at {got:.2f} s of the {declared:.2f} s its header declares; the "
                 "file may be truncated (only what is there is used)")
        offset = int(round(((first_t or 0.0) - start) * sample_rate))
        if offset > 0:
            audio = np.concatenate([np.zeros(offset, np.float32), audio])
        elif offset < 0:
            audio = audio[-offset:]
        if duration is not None:
            n = int(round(duration * sample_rate))
            audio = audio[:n] if audio.size >= n else np.pad(audio, (0, n - audio.size))
        return audio
    finally:
        c.close()


def load_audio(path: str | os.PathLike, sample_rate: int = 16000, name: str | None = None) -> np.ndarray:
    """Any audio (or video-with-audio) file to float32 mono at ``sample_rate``; errors name
    it as ``name`` (default: the path)."""
    a = read_audio(path, sample_rate, name=name)
    label = name or path
    if a is None:
        raise FileFormatError(f"{label} has no audio stream")
    if a.size == 0:
        raise FileFormatError(f"{label}: the audio stream is empty")
    return a


def wav_bytes(audio: np.ndarray, sample_rate: int = 16000) -> bytes:
    """16-bit PCM mono WAV file contents."""
    import io
    import wave

    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def write_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int = 16000) -> Path:
    """16-bit PCM mono WAV, atomically."""
    from gstalk.io.atomic import write_bytes

    return write_bytes(path, wav_bytes(audio, sample_rate))


__all__ = ["VideoInfo", "iter_frames", "load_audio", "probe", "read_audio", "wav_bytes", "write_wav"]
