"""What every way of making a dataset folder shares: the resumable stage record, the
per-frame stages after the frames are in place (landmarks, masks, background plate, signals,
preview) and the held-out split. :mod:`gstalk.prepare.video` (a phone clip) and
:mod:`gstalk.prepare.nerf` (a NeRF/3DGS talking-head folder) both end here."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from gstalk.config import PrepareOptions
from gstalk.errors import GstalkError
from gstalk.face.mediapipe_models import face_area
from gstalk.io.atomic import ensure_dir, write_json
from gstalk.io.dataset import read_image_file, save_npz, write_image_file

AUDIO_RATE = 16000
Progress = Callable[[str, int, int], None]


class NoFaceError(GstalkError):
    """No usable face in the clip."""


class ClipTooShortError(GstalkError):
    """The clip is too short to build an avatar from."""


def is_dataset_folder(folder: Path) -> bool:
    """Whether gstalk wrote ``folder`` (a dataset, finished or under way): its progress.json or
    its manifest says so."""
    for name, key, value in (("progress.json", "fingerprint", None), ("manifest.json", "format", "gstalk-dataset")):
        try:
            d = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and key in d and (value is None or d[key] == value):
            return True
    return False


def check_dataset_out(out: Path) -> bool:
    """``out`` is new, empty or a dataset folder of gstalk's (which is resumed or redone; files
    in it that gstalk did not write are kept); any other folder is refused (OutputError).
    Returns whether it held a dataset."""
    from gstalk.io.atomic import check_own_folder

    return check_own_folder(out, is_dataset_folder, "dataset")


class State:
    """progress.json: which stages are finished, for resuming. It is written as the folder is
    claimed, before any stage, so that a run killed in its first stage left a folder that is
    recognisably gstalk's (see :func:`is_dataset_folder`)."""

    def __init__(self, out: Path, fingerprint: str):
        self.path = out / "progress.json"
        self.data = {"fingerprint": fingerprint, "done": {}}
        if self.path.is_file():
            try:
                old = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                old = {}
            if old.get("fingerprint") == fingerprint:
                self.data = old
        if not self.data["done"]:
            write_json(self.path, self.data)

    @property
    def resumed(self) -> bool:
        return bool(self.data["done"])

    def done(self, stage: str) -> bool:
        return stage in self.data["done"]

    def get(self, stage: str):
        return self.data["done"].get(stage)

    @contextlib.contextmanager
    def abandoned_on_failure(self, created: bool):
        """A run that this call began in a folder it ``created`` and that fails (a GstalkError)
        before its first stage is finished leaves no folder: nothing in it could be resumed."""
        try:
            yield
        except GstalkError:
            if created and not self.data["done"]:
                shutil.rmtree(self.path.parent, ignore_errors=True)
            raise

    def mark(self, stage: str, info=True) -> None:
        self.data["done"][stage] = info
        write_json(self.path, self.data)


def _gaussian_smooth_runs(x: np.ndarray, valid: np.ndarray, sigma: float) -> np.ndarray:
    """Smooth [T, ...] along time inside each run of valid frames (never across gaps)."""
    from scipy.ndimage import gaussian_filter1d

    out = x.copy()
    if sigma <= 0:
        return out
    t = 0
    n = len(valid)
    while t < n:
        if not valid[t]:
            t += 1
            continue
        e = t
        while e < n and valid[e]:
            e += 1
        if e - t > 1:
            out[t:e] = gaussian_filter1d(x[t:e], sigma, axis=0, mode="nearest")
        t = e
    return out


def _interp_nan(x: np.ndarray) -> np.ndarray:
    """Fill NaN rows of [T, k] by linear interpolation (edges held)."""
    out = x.copy()
    t = np.arange(len(x))
    for j in range(x.shape[1]):
        ok = np.isfinite(x[:, j])
        out[:, j] = np.interp(t, t[ok], x[ok, j])
    return out


def holdout_split(n: int, holdout: float) -> dict:
    """Train on the first frames, test on the last ``holdout`` fraction (at least one frame)."""
    n_test = max(1, int(round(n * holdout))) if holdout > 0 else 0
    return {"train": [0, n - n_test], "test": [n - n_test, n]}


def _subject_boxes(found: list[list[list[float]]]) -> np.ndarray:
    """The filmed person's detector box [x, y, w, h, score] on every frame (NaN where absent)
    from all boxes found per frame: boxes are linked into tracks from frame to frame (the
    nearest track whose last box lies within half a face of it and is of similar size), and
    the subject is the track that fills the most of the picture over the clip (box area summed
    over its frames). A face that passes through, or one the detector finds on only some
    frames, does not pull the crop off the subject on the frames where the subject is missed."""
    tracks: list[dict] = []
    for k, faces in enumerate(found):
        taken: set[int] = set()
        for b in sorted(faces, key=lambda b: -b[2] * b[3]):
            cx, cy, w = b[0] + b[2] / 2, b[1] + b[3] / 2, max(b[2], b[3])
            best, best_d = None, np.inf
            for ti, t in enumerate(tracks):
                lx, ly, lw = t["last"]
                d = float(np.hypot(cx - lx, cy - ly))
                if ti not in taken and d < 0.5 * max(w, lw) and 0.5 < w / lw < 2 and d < best_d:
                    best, best_d = ti, d
            if best is None:
                tracks.append({"boxes": {}, "area": 0.0})
                best = len(tracks) - 1
            t = tracks[best]
            t["boxes"][k], t["last"] = b, (cx, cy, w)
            t["area"] += b[2] * b[3]
            taken.add(best)
    out = np.full((len(found), 5), np.nan, np.float32)
    if tracks:
        for k, b in max(tracks, key=lambda t: t["area"])["boxes"].items():
            out[k] = b
    return out


def _face_ref(lmk: np.ndarray) -> tuple[float, float, float]:
    """(centre x, centre y, width) of a face's landmarks."""
    c = lmk[:, :2].mean(0)
    return float(c[0]), float(c[1]), float(np.ptp(lmk[:, 0]))


def _follow_subject(faces: list[np.ndarray], last: tuple[float, float, float] | None,
                    centre: tuple[float, float, float] | None) -> np.ndarray | None:
    """The filmed person's face among ``faces``: the one nearest to where it was on the last
    frame it was found (``last`` = x, y, width), if its centre lies within half a face width of
    that and its width is between half and twice that; failing that (the first frame, a jump,
    or after frames without the subject), the largest face whose centre lies within ``centre``
    = (x, y, radius), where the crop puts the subject (any face when ``centre`` is None). None
    when no face qualifies: a stranger alone in view, away from where the subject is framed, is
    not the subject, and its landmarks must not stand in for theirs."""
    if not faces:
        return None
    if last is not None:
        lx, ly, lw = last
        best, best_d = None, np.inf
        for a in faces:
            x, y, w = _face_ref(a)
            d = float(np.hypot(x - lx, y - ly))
            if d < 0.5 * lw and 0.5 * lw < w < 2 * lw and d < best_d:
                best, best_d = a, d
        if best is not None:
            return best
    if centre is not None:
        cx, cy, r = centre
        faces = [a for a, (x, y, _) in zip(faces, map(_face_ref, faces)) if np.hypot(x - cx, y - cy) < r]
    return max(faces, key=face_area) if faces else None


def finish_dataset(out: Path, n: int, opts: PrepareOptions, state: "State", prog: Progress,
                   base_labels: Callable[[int], np.ndarray] | None = None,
                   blink: np.ndarray | None = None,
                   subject: tuple[float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stages after the frames exist in ``out/frames``: landmarks, masks + background,
    signals and preview. ``subject`` = (x, y, radius) in pixels: where the crop puts the
    filmed person's face (see ``_follow_subject``). ``base_labels(k)`` may supply person/torso labels (from an
    imported parsing) instead of the person segmenter; ``blink`` may replace the
    eye-aspect-ratio blink signal."""
    fdir = out / "frames"
    # ---------------------------------------------------------------- 4. landmarks
    if not state.done("landmarks"):
        from gstalk.face.mediapipe_models import FaceMesh

        raw = np.full((n, 478, 3), np.nan, np.float32)
        nf = np.zeros(n, np.int32)
        mesh = FaceMesh(track=True)
        last = None
        try:
            for k in range(n):
                faces = mesh.faces(read_image_file(fdir / f"{k:06d}.jpg"))
                nf[k] = len(faces)
                lmk = _follow_subject(faces, last, subject)
                if lmk is not None:
                    raw[k] = lmk
                    last = _face_ref(lmk)
                prog("landmarks", k + 1, n)
        finally:
            mesh.close()
        valid = np.isfinite(raw[:, 0, 0])
        frac = float(valid.mean())
        if frac < opts.min_face_fraction:
            raise NoFaceError(f"face landmarks were found in only {100 * frac:.0f}% of the cropped frames; "
                              "keep the face in view, unobstructed and well lit")
        lmk = _gaussian_smooth_runs(np.nan_to_num(raw), valid, opts.landmark_sigma)
        lmk[~valid] = np.nan
        save_npz(out / "landmarks.npz", lmk=lmk, lmk_raw=raw, valid=valid, n_faces=nf)
        state.mark("landmarks", {"valid_fraction": frac})
    with np.load(out / "landmarks.npz") as z:
        lmk, valid = z["lmk"], z["valid"]

    # ---------------------------------------------------------------- 5. masks + background
    mdir = ensure_dir(out / "masks")
    if not state.done("masks"):
        from gstalk.face.mediapipe_models import PersonSegmenter
        from gstalk.face.regions import label_mask

        seg = PersonSegmenter() if base_labels is None else None
        try:
            for k in range(n):
                if (mdir / f"{k:06d}.png").is_file():
                    continue
                if seg is not None:
                    labels = label_mask(seg(read_image_file(fdir / f"{k:06d}.jpg")), lmk[k] if valid[k] else None)
                else:
                    labels = label_mask(None, lmk[k] if valid[k] else None, base=base_labels(k))
                write_image_file(mdir / f"{k:06d}.png", labels)
                prog("masks", k + 1, n)
        finally:
            if seg is not None:
                seg.close()
        if not (out / "background.png").is_file():
            write_image_file(out / "background.png", _background_plate(out, n, opts.resolution))
        state.mark("masks")

    # ---------------------------------------------------------------- 6. signals
    if not state.done("signals"):
        from gstalk.face.regions import LEFT_EYE_EAR, RIGHT_EYE_EAR, blink_signal, eye_aspect_ratio, mouth_opening

        ear_blink, ear_info = blink_signal(lmk, valid)
        ear = 0.5 * (eye_aspect_ratio(lmk, LEFT_EYE_EAR) + eye_aspect_ratio(lmk, RIGHT_EYE_EAR))
        save_npz(out / "signals.npz", blink=ear_blink if blink is None else blink.astype(np.float32),
                 mouth_open=np.where(valid, mouth_opening(lmk), np.nan).astype(np.float32),
                 ear=np.where(valid, ear, np.nan).astype(np.float32))
        state.mark("signals", {**ear_info, "blink_source": "eye aspect ratio" if blink is None else "imported"})

    # ---------------------------------------------------------------- 7. preview
    if opts.preview and not state.done("preview"):
        from gstalk.io.media import write_video

        write_video(out / "preview.mp4", (_overlay(out, k, lmk[k] if valid[k] else None) for k in range(n)),
                    fps=opts.fps)
        state.mark("preview")
    return lmk, valid


def _background_plate(out: Path, n: int, res: int, max_frames: int = 48) -> np.ndarray:
    """Per-pixel median of the frames where the pixel is background; never-seen pixels inpainted."""
    import cv2

    idx = np.unique(np.linspace(0, n - 1, min(n, max_frames)).round().astype(int))
    stack = np.empty((len(idx), res, res, 3), np.float32)
    for j, k in enumerate(idx):
        img = read_image_file(out / "frames" / f"{k:06d}.jpg").astype(np.float32)
        lab = read_image_file(out / "masks" / f"{k:06d}.png", grey=True)
        person = cv2.dilate((lab > 0).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
        img[person] = np.nan
        stack[j] = img
    with np.errstate(all="ignore"):
        import warnings as _w

        with _w.catch_warnings():
            _w.simplefilter("ignore", RuntimeWarning)
            plate = np.nanmedian(stack, axis=0)
    hole = ~np.isfinite(plate[..., 0])
    plate = np.nan_to_num(plate).clip(0, 255).astype(np.uint8)
    if hole.any():
        plate = cv2.inpaint(plate, hole.astype(np.uint8), 5, cv2.INPAINT_TELEA)
    return plate


_LABEL_COLOURS = np.array([[0, 0, 0], [255, 200, 0], [0, 120, 255], [0, 220, 0], [255, 0, 80]], np.float32)


def _overlay(out: Path, k: int, lmk: np.ndarray | None) -> np.ndarray:
    import cv2

    img = read_image_file(out / "frames" / f"{k:06d}.jpg").astype(np.float32)
    lab = read_image_file(out / "masks" / f"{k:06d}.png", grey=True)
    col = _LABEL_COLOURS[np.clip(lab, 0, 4)]
    a = np.where(lab[..., None] > 0, 0.35, 0.0)
    img = (img * (1 - a) + col * a).clip(0, 255).astype(np.uint8)
    if lmk is not None:
        r = max(1, img.shape[0] // 256)
        for x, y in lmk[:, :2]:
            cv2.circle(img, (int(round(x)), int(round(y))), r, (255, 255, 255), -1)
    else:
        cv2.putText(img, "no face", (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 0, 0), 2)
    return img
