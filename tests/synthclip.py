"""A synthetic phone clip built from the real face photo that scikit-image ships.

The astronaut photo moves, scales and rotates by a known similarity transform per frame;
the clip is stored with display-rotation metadata and a variable frame rate, with a
synthesized audio track (tone bursts), so tests can check prepare against the truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np


@dataclass
class SynthClip:
    path: Path
    times: np.ndarray  # [F] presentation time (s) of each stored frame
    transforms: np.ndarray  # [F, 2, 3] photo -> displayed frame (pixels)
    display_size: tuple[int, int]  # (width, height) as displayed
    duration: float
    audio_rate: int
    bursts: list[tuple[float, float]]  # (start, end) seconds of each tone burst


def similarity(scale: float, angle_deg: float, tx: float, ty: float, center) -> np.ndarray:
    a = np.radians(angle_deg)
    c, s = scale * np.cos(a), scale * np.sin(a)
    cx, cy = center
    # rotate/scale about the photo's centre, then put it at (tx, ty)
    return np.array([[c, -s, tx - (c * cx - s * cy)], [s, c, ty - (s * cx + c * cy)]], np.float64)


def make_clip(path: Path, seconds: float = 3.0, size=(192, 256), rotation: int = 90, vfr: bool = True,
              audio: bool = True, seed: int = 0, face: bool = True, n_faces: int = 1,
              record_rotation: bool = True) -> SynthClip:
    import av
    import cv2
    from skimage import data

    rng = np.random.default_rng(seed)
    photo = data.astronaut()  # 512 x 512, face around (220, 150)
    w, h = size  # displayed size (portrait)
    # variable frame rate: intervals between 28 and 52 ms
    times = [0.0]
    while times[-1] < seconds - 0.06:
        times.append(times[-1] + (rng.uniform(0.028, 0.052) if vfr else 1 / 25))
    times = np.asarray(times)
    u = times / seconds
    transforms = []
    container = av.open(str(path), "w")
    vs = container.add_stream("libx264", rate=1000)
    vs.time_base = Fraction(1, 1000)
    enc_w, enc_h = (h, w) if rotation in (90, 270) else (w, h)
    vs.width, vs.height, vs.pix_fmt = enc_w, enc_h, "yuv420p"
    vs.options = {"crf": "16"}
    if rotation and record_rotation:  # without it: a phone clip whose rotation was lost (shown sideways)
        vs.set_display_rotation(rotation)
    aus = None
    rate = 16000
    bursts = [(0.5, 0.8), (1.6, 1.75), (2.3, 2.7)]
    if audio:
        aus = container.add_stream("aac", rate=44100)
        aus.layout = "mono"
    for i, t in enumerate(times):
        m = similarity(0.42 + 0.05 * np.sin(2 * np.pi * u[i]), 6 * np.sin(2 * np.pi * 1.3 * u[i]),
                       w * 0.5 + 18 * np.sin(2 * np.pi * u[i]), h * 0.5 + 10 * np.cos(2 * np.pi * u[i]),
                       (256, 200))
        transforms.append(m)
        disp = cv2.warpAffine(photo if face else np.full_like(photo, 128), m.astype(np.float32), (w, h),
                              borderMode=cv2.BORDER_CONSTANT, borderValue=(40, 60, 90))
        if n_faces > 1:  # a second, smaller copy of the face in a corner
            m2 = similarity(0.2, 0, w * 0.8, h * 0.12, (256, 200))
            small = cv2.warpAffine(photo, m2.astype(np.float32), (w, h), borderValue=(0, 0, 0))
            cover = cv2.warpAffine(np.ones(photo.shape[:2], np.uint8), m2.astype(np.float32), (w, h)) > 0
            disp[cover] = small[cover]
        stored = np.ascontiguousarray(np.rot90(disp, k=-(rotation // 90))) if rotation else disp
        frame = av.VideoFrame.from_ndarray(stored, format="rgb24")
        frame.pts = int(round(t * 1000))
        for p in vs.encode(frame):
            container.mux(p)
    for p in vs.encode():
        container.mux(p)
    if aus is not None:
        sr = 44100
        tt = np.arange(int(seconds * sr)) / sr
        sig = np.zeros_like(tt)
        for a, b in bursts:
            on = (tt >= a) & (tt < b)
            sig[on] = 0.5 * np.sin(2 * np.pi * 440 * tt[on])
        sig = sig.astype(np.float32)
        step = 1024
        for j in range(0, len(sig), step):
            chunk = sig[j:j + step]
            af = av.AudioFrame.from_ndarray(chunk[None], format="flt", layout="mono")
            af.sample_rate = sr
            af.pts = j
            for p in aus.encode(af):
                container.mux(p)
        for p in aus.encode():
            container.mux(p)
    container.close()
    return SynthClip(path=Path(path), times=times, transforms=np.asarray(transforms), display_size=(w, h),
                     duration=float(times[-1] + 0.04), audio_rate=rate, bursts=bursts)
