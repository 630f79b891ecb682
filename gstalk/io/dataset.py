"""The dataset folder that ``gstalk prepare`` writes and tracking/training read.

Layout (all paths relative to the folder; documented in docs/dataset.md)::

    manifest.json        format, version, fps, resolution, counts, split, source, warnings
    frames/000000.jpg    RGB frames at the working resolution (square)
    masks/000000.png     uint8 labels: 0 background, 1 head (hair, ears), 2 neck/torso,
                         3 face (inside the face oval), 4 mouth interior
    background.png       static background plate
    audio.wav            16 kHz mono PCM, sample 0 at frame 0, length frames/fps (if any audio)
    landmarks.npz        lmk [T,478,3] smoothed, lmk_raw [T,478,3], valid [T] bool, n_faces [T]
                         (x, y in working-resolution pixels; NaN where no face was found)
    signals.npz          blink [T] (0 open .. 1 closed), mouth_open [T], ear [T]
    crop.npz             box [T,3]: source-frame x0, y0, size of each frame's square crop
    preview.mp4          landmarks and masks drawn over the frames, for checking

Every file is written atomically, and ``progress.json`` records finished stages so an
interrupted ``prepare`` resumes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from gstalk.errors import FileFormatError, InputError
from gstalk.io.atomic import write_bytes

DATASET_FORMAT = "gstalk-dataset"
DATASET_VERSION = 1


def encode_image(img: np.ndarray, ext: str = ".jpg", quality: int = 95) -> bytes:
    import cv2

    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, buf = cv2.imencode(ext, img, params)
    if not ok:
        raise InputError(f"could not encode an image of shape {img.shape} as {ext}")
    return buf.tobytes()


def write_image_file(path: str | os.PathLike, img: np.ndarray, quality: int = 95) -> Path:
    """uint8 RGB [H, W, 3] or grey/labels [H, W] to JPEG or PNG (by suffix), atomically."""
    p = Path(path)
    return write_bytes(p, encode_image(img, p.suffix.lower(), quality))


def read_image_file(path: str | os.PathLike, grey: bool = False) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED if grey else cv2.IMREAD_COLOR)
    if img is None:
        raise FileFormatError(f"cannot read image {path}")
    return img if grey else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def check_manifest(m: dict, path: Path) -> None:
    """The manifest fields readers rely on, by type and range (see :mod:`gstalk.io.schema`)."""
    from gstalk.io.schema import Bool, Int, Number, Record, check_fields

    fix = "re-run 'gstalk prepare' on the clip"
    missing = [k for k in ("num_frames", "fps", "resolution", "split") if k not in m]
    if missing:
        raise FileFormatError(f"{path} lacks {', '.join(missing)}; {fix}")
    span = Record({}, required=("train", "test"))
    check_fields(m, {"num_frames": Int(1, 10 ** 8), "fps": Number(1, 1000), "resolution": Int(16, 16384),
                     "split": span, "audio": Record({"present": Bool(), "sample_rate": Int(8000, 192000)})}, path, fix)
    n = m["num_frames"]
    for part in ("train", "test"):
        r = m["split"][part]
        if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in r)
                and 0 <= r[0] <= r[1] <= n):
            raise FileFormatError(f"{path}: 'split.{part}' must be [start, end] frames with 0 <= start <= end <= "
                                  f"num_frames ({n}), got {r!r}; {fix}")
    if m.get("audio", {}).get("present") and "sample_rate" not in m["audio"]:
        raise FileFormatError(f"{path}: 'audio.sample_rate' is missing; {fix}")


class Dataset:
    """Read access to a prepared dataset folder (frames are loaded one at a time)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        mf = self.root / "manifest.json"
        if not mf.is_file():
            raise FileFormatError(f"{self.root} is not a gstalk dataset (no manifest.json); "
                                  "create one with 'gstalk prepare clip.mp4 DATASET' or 'gstalk import-dataset'")
        try:
            self.manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise FileFormatError(f"{mf} is not valid JSON ({e})") from None
        if self.manifest.get("format") != DATASET_FORMAT:
            raise FileFormatError(f"{mf} is not a gstalk dataset manifest")
        v = self.manifest.get("version")
        if v != DATASET_VERSION:
            raise FileFormatError(f"{self.root} was written in dataset format version {v}; this gstalk reads "
                                  f"version {DATASET_VERSION}. Re-run 'gstalk prepare' on the clip.")
        check_manifest(self.manifest, mf)

    # --- sizes and timing
    @property
    def num_frames(self) -> int:
        return int(self.manifest["num_frames"])

    @property
    def fps(self) -> float:
        return float(self.manifest["fps"])

    @property
    def resolution(self) -> int:
        return int(self.manifest["resolution"])

    @property
    def has_audio(self) -> bool:
        return bool(self.manifest.get("audio", {}).get("present"))

    @property
    def train_indices(self) -> np.ndarray:
        a, b = self.manifest["split"]["train"]
        return np.arange(a, b)

    @property
    def test_indices(self) -> np.ndarray:
        a, b = self.manifest["split"]["test"]
        return np.arange(a, b)

    # --- per-frame data
    def frame_path(self, i: int) -> Path:
        return self.root / "frames" / f"{i:06d}.jpg"

    def mask_path(self, i: int) -> Path:
        return self.root / "masks" / f"{i:06d}.png"

    def frame(self, i: int) -> np.ndarray:
        """uint8 RGB [R, R, 3]."""
        self._check_index(i)
        return read_image_file(self.frame_path(i))

    def mask(self, i: int) -> np.ndarray:
        """uint8 labels [R, R] (see the module docstring)."""
        self._check_index(i)
        return read_image_file(self.mask_path(i), grey=True)

    def background(self) -> np.ndarray:
        return read_image_file(self.root / "background.png")

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.num_frames:
            raise InputError(f"frame {i} is outside the dataset's {self.num_frames} frames")

    # --- arrays
    def _npz(self, name: str) -> dict[str, np.ndarray]:
        return load_npz(self.root / name, "re-run 'gstalk prepare' to finish the dataset")

    def landmarks(self) -> dict[str, np.ndarray]:
        return self._npz("landmarks.npz")

    def signals(self) -> dict[str, np.ndarray]:
        return self._npz("signals.npz")

    def crops(self) -> np.ndarray:
        return self._npz("crop.npz")["box"]

    def audio(self) -> np.ndarray:
        """float32 mono at manifest audio.sample_rate, aligned to frame 0."""
        if not self.has_audio:
            raise FileFormatError(f"{self.root} has no audio track (the clip had none); audio-driven training "
                                  "needs a clip with speech")
        from gstalk.io.video import load_audio

        return load_audio(self.root / "audio.wav", int(self.manifest["audio"]["sample_rate"]))


def load_npz(path: str | os.PathLike, fix: str = "") -> dict[str, np.ndarray]:
    """The arrays of an npz archive (never unpickling), or :class:`FileFormatError` saying which
    file could not be read and, with ``fix``, what to do about it."""
    import zipfile

    p = Path(path)
    hint = f"; {fix}" if fix else ""
    if not p.is_file():
        raise FileFormatError(f"no such file: {p}{hint}")
    try:
        with open(p, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                raise ValueError("not a zip archive")
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # truncated, not npz, pickled objects
        raise FileFormatError(f"{p} cannot be read as a numpy .npz archive ({e}){hint}") from None


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Compressed npz, atomically."""
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return write_bytes(path, buf.getvalue())
