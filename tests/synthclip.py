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


def sdr_to_hdr(rgb: np.ndarray, transfer: str) -> np.ndarray:
    """[H, W, 3] uint16 R'G'B' of HDR video (BT.2020 primaries) that shows the sRGB picture
    ``rgb`` [H, W, 3] uint8 with its white at the reference white of ITU-R BT.2408: 75 % HLG
    signal, or 203 nits in PQ. The forward direction of what gstalk's decoder undoes, written
    from the standards' formulas (BT.2100's HLG OETF, SMPTE ST 2084's inverse EOTF)."""
    v = rgb.astype(np.float64) / 255.0
    lin = np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)
    to2020 = np.array([[0.6274, 0.3293, 0.0433], [0.0691, 0.9195, 0.0114], [0.0164, 0.0880, 0.8956]])
    lin = np.clip(lin @ to2020.T, 0.0, None)
    if transfer == "HLG":
        a, b, c = 0.17883277, 0.28466892, 0.55991073
        ref = (np.exp((0.75 - c) / a) + b) / 12.0  # scene light at 75 % signal
        e = np.clip(lin * ref, 0.0, 1.0)
        sig = np.where(e <= 1 / 12, np.sqrt(3 * e), a * np.log(np.maximum(12 * e - b, 1e-12)) + c)
    else:
        m1, m2, c1, c2, c3 = 2610 / 16384, 2523 / 4096 * 128, 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
        y = np.clip(lin * 203.0 / 10000.0, 0.0, 1.0) ** m1
        sig = ((c1 + c2 * y) / (1 + c3 * y)) ** m2
    return np.round(np.clip(sig, 0, 1) * 65535).astype(np.uint16)


def make_clip(path: Path, seconds: float = 3.0, size=(192, 256), rotation: int = 90, vfr: bool = True,
              audio: bool = True, seed: int = 0, face: bool = True, n_faces: int = 1,
              record_rotation: bool = True, hdr: str | None = None) -> SynthClip:
    """``hdr`` 'HLG' or 'PQ': 10-bit HEVC with BT.2020 colours and that transfer, as phones film
    HDR video (the picture is the same; :func:`sdr_to_hdr`)."""
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
    vs = container.add_stream("libx265" if hdr else "libx264", rate=1000)
    vs.time_base = Fraction(1, 1000)
    enc_w, enc_h = (h, w) if rotation in (90, 270) else (w, h)
    vs.width, vs.height, vs.pix_fmt = enc_w, enc_h, "yuv420p10le" if hdr else "yuv420p"
    vs.options = {"crf": "16"}
    if hdr:  # BT.2020 primaries and matrix (9), HLG (18) or PQ (16) transfer, limited range
        trc = {"HLG": (18, "arib-std-b67"), "PQ": (16, "smpte2084")}[hdr]
        vs.options = {"crf": "12", "x265-params": f"colorprim=bt2020:transfer={trc[1]}:colormatrix=bt2020nc:"
                                                  "log-level=error"}
        cc = vs.codec_context
        cc.color_primaries, cc.color_trc, cc.colorspace, cc.color_range = 9, trc[0], 9, 1
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
        if hdr:
            from av.video.reformatter import Colorspace

            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(sdr_to_hdr(stored, hdr)), format="rgb48le")
            frame = frame.reformat(format="yuv420p10le", dst_colorspace=Colorspace.BT2020)
            frame.colorspace, frame.color_range = 9, 1
        else:
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
