"""``gstalk prepare``: a raw phone clip to a dataset folder (see :mod:`gstalk.io.dataset`).

Stages, each resumable (``progress.json`` records what is done; per-frame outputs are
written atomically one file at a time, so an interrupted run picks up at the first
missing frame):

1. scan       decode at a constant rate, find the face in every frame (largest face when
              there are several), extract the audio aligned to frame 0;
2. crop       a square head-and-shoulders crop per frame: fixed size, centre smoothed
              over about a second so it follows slow motion without jitter;
3. frames     decode again, crop and resize to the working resolution, write JPEGs;
4. landmarks  478-point face mesh per frame (tracking mode), light temporal smoothing,
              frames without a face marked invalid (NaN), never filled in;
5. masks      person segmentation + landmark regions -> label masks; background plate;
6. signals    blink (eye aspect ratio) and mouth opening per frame;
7. preview    landmarks and masks drawn over the frames (preview.mp4);
and last the manifest, whose presence marks a finished dataset.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from gstalk import __version__
from gstalk.config import PrepareOptions
from gstalk.errors import ABOVE_0, AT_LEAST_0, GstalkError, between, check_ranges
from gstalk.io.atomic import ensure_dir, write_json
from gstalk.io.dataset import DATASET_FORMAT, DATASET_VERSION, Dataset, read_image_file, save_npz, write_image_file
from gstalk.io.media import MAX_FPS, MAX_SIZE
from gstalk.face.mediapipe_models import face_area
from gstalk.face.regions import LABELS
from gstalk.io.video import iter_frames, probe, read_audio, write_wav

AUDIO_RATE = 16000


class NoFaceError(GstalkError):
    """No usable face in the clip."""


class ClipTooShortError(GstalkError):
    """The clip is too short to build an avatar from."""


Progress = Callable[[str, int, int], None]


def _fingerprint(clip: Path, opts: PrepareOptions) -> str:
    st = clip.stat()
    key = json.dumps({"clip": str(clip.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
                      "opts": asdict(opts)}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class _State:
    """progress.json: which stages are finished, for resuming."""

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

    @property
    def resumed(self) -> bool:
        return bool(self.data["done"])

    def done(self, stage: str) -> bool:
        return stage in self.data["done"]

    def get(self, stage: str):
        return self.data["done"].get(stage)

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


def check_options(opts: PrepareOptions, prefix: str = "") -> None:
    """:class:`InputError` naming the first option no dataset can be made with (its flag with
    ``prefix``, see :func:`gstalk.errors.check_ranges`)."""
    check_ranges(opts, {"fps": between(1, MAX_FPS), "resolution": between(32, MAX_SIZE), "crop_scale": ABOVE_0,
                        "crop_down": between(-1, 1), "holdout": between(0, 0.5), "min_face_fraction": between(0, 1),
                        "min_seconds": AT_LEAST_0, "smooth_seconds": AT_LEAST_0, "landmark_sigma": AT_LEAST_0,
                        "jpeg_quality": between(1, 100), "detect_size": between(64, MAX_SIZE)}, prefix=prefix)


def prepare(clip: str | Path, out: str | Path, opts: PrepareOptions | None = None,
            progress: Progress | None = None, log: Callable[[str], None] = print) -> Dataset:
    """Build the dataset folder ``out`` from ``clip``; resume if ``out`` holds a partial run."""
    opts = opts or PrepareOptions()
    clip, out = Path(clip), Path(out)
    check_options(opts)
    info = probe(clip)  # raises FileFormatError for missing/corrupt files
    ensure_dir(out)
    state = _State(out, _fingerprint(clip, opts))
    if state.done("signals") and (state.done("preview") or not opts.preview):
        log(f"{out} is already prepared from this clip with these options: reusing it")
    elif state.resumed:
        log(f"resuming the unfinished preparation in {out}")
    warnings: list[str] = []
    prog = progress or (lambda stage, i, n: None)
    t_start = time.perf_counter()

    # ---------------------------------------------------------------- 1. scan
    if not state.done("scan"):
        from gstalk.face.mediapipe_models import FaceDetector

        det = FaceDetector()
        found, counts = [], []
        est = int(round(info.duration * opts.fps)) if np.isfinite(info.duration) else 0
        try:
            for k, img in iter_frames(clip, opts.fps, info):
                s = opts.detect_size / max(img.shape[:2])
                small = img
                if s < 1:
                    import cv2

                    small = cv2.resize(img, (int(round(img.shape[1] * s)), int(round(img.shape[0] * s))),
                                       interpolation=cv2.INTER_AREA)
                else:
                    s = 1.0
                faces = det.detect(small)
                counts.append(len(faces))
                found.append([[f.x / s, f.y / s, f.w / s, f.h / s, f.score] for f in faces])
                prog("scan", k + 1, max(est, k + 1))
        finally:
            det.close()
        boxes = _subject_boxes(found)
        n = len(boxes)
        duration = n / opts.fps
        if duration < opts.min_seconds:
            raise ClipTooShortError(f"{clip} is {duration:.2f} s long; gstalk needs at least {opts.min_seconds:g} s "
                                    "of video (10 s to 5 min works best)")
        boxes_a, counts_a = boxes, np.asarray(counts, np.int32)
        frac = float(np.isfinite(boxes_a[:, 0]).mean())
        if frac == 0:
            raise NoFaceError(f"no face was found in {clip}; film one person facing the camera")
        if frac < opts.min_face_fraction:
            raise NoFaceError(f"a face was found in only {100 * frac:.0f}% of the frames of {clip} (need "
                              f"{100 * opts.min_face_fraction:.0f}%); keep the face in view and well lit")
        multi = float((counts_a > 1).mean())
        scan_warn = []
        if multi > 0.05:
            scan_warn.append(f"several faces in {100 * multi:.0f}% of frames: following the one that fills "
                             "the picture most over the clip")
        audio_info = {"present": False, "sample_rate": AUDIO_RATE, "samples": 0}
        if info.has_audio:
            audio = read_audio(clip, AUDIO_RATE, start=info.start_time, duration=duration)
            rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) if audio is not None and audio.size else 0.0
            write_wav(out / "audio.wav", audio, AUDIO_RATE)
            silent = rms < 1e-3
            audio_info = {"present": True, "sample_rate": AUDIO_RATE, "samples": int(audio.size),
                          "rms": rms, "silent": silent}
            if silent:
                scan_warn.append("the audio track is silent: fine for tracking; an avatar trained on it is driven by "
                                 "tracked expressions, not speech")
        else:
            scan_warn.append("the clip has no audio track: fine for tracking; an avatar trained on it is driven by "
                             "tracked expressions, not speech")
        save_npz(out / "scan.npz", boxes=boxes_a, n_faces=counts_a)
        state.mark("scan", {"num_frames": n, "face_fraction": frac, "audio": audio_info, "warnings": scan_warn,
                            "source": {"width": info.width, "height": info.height, "rotation": info.rotation,
                                       "sar": info.sar, "src_fps": info.src_fps, "codec": info.codec,
                                       "start_time": info.start_time}})
        for w in scan_warn:
            log(f"warning: {w}")
    scan = state.get("scan")
    warnings += scan["warnings"]
    n = int(scan["num_frames"])
    src_w, src_h = scan["source"]["width"], scan["source"]["height"]

    # ---------------------------------------------------------------- 2. crop
    if not state.done("crop"):
        with np.load(out / "scan.npz") as z:
            boxes = z["boxes"]
        filled = _interp_nan(boxes[:, :4])
        cx = filled[:, 0] + filled[:, 2] / 2
        cy = filled[:, 1] + filled[:, 3] / 2
        face = np.maximum(filled[:, 2], filled[:, 3])
        size = float(np.median(face)) * opts.crop_scale
        size = min(size, src_w, src_h)
        sigma = max(opts.smooth_seconds * opts.fps, 1.0)
        from scipy.ndimage import gaussian_filter1d

        cx = gaussian_filter1d(cx, sigma, mode="nearest")
        cy = gaussian_filter1d(cy + opts.crop_down * np.median(face), sigma, mode="nearest")
        x0 = np.clip(cx - size / 2, 0, src_w - size)
        y0 = np.clip(cy - size / 2, 0, src_h - size)
        save_npz(out / "crop.npz", box=np.stack([x0, y0, np.full(n, size)], 1).astype(np.float32))
        state.mark("crop")
    with np.load(out / "crop.npz") as z:
        crop = z["box"]

    # ---------------------------------------------------------------- 3. frames
    res = opts.resolution
    fdir = ensure_dir(out / "frames")
    if not state.done("frames"):
        import cv2

        first_missing = 0
        while first_missing < n and (fdir / f"{first_missing:06d}.jpg").is_file():
            first_missing += 1
        for k, img in iter_frames(clip, opts.fps, probe(clip), start_frame=first_missing):
            if k >= n:
                break
            x0, y0, s = crop[k]
            m = np.array([[res / s, 0, -x0 * res / s], [0, res / s, -y0 * res / s]], np.float32)
            interp = cv2.INTER_AREA if s > res else cv2.INTER_LINEAR
            frame = cv2.warpAffine(img, m, (res, res), flags=interp, borderMode=cv2.BORDER_REPLICATE)
            write_image_file(fdir / f"{k:06d}.jpg", frame, opts.jpeg_quality)
            prog("frames", k + 1, n)
        missing = [k for k in range(n) if not (fdir / f"{k:06d}.jpg").is_file()]
        if missing:
            raise GstalkError(f"{len(missing)} frames could not be decoded the second time (first: {missing[0]}); "
                              "the clip may be damaged")
        state.mark("frames")

    # the crop is centred on the subject's face (its landmarks' centre lay within 0.16 of the
    # crop's size from the middle on every frame of aoc_8s and hill_8s)
    lmk, valid = finish_dataset(out, n, opts, state, prog, subject=(res / 2, res / 2, 0.3 * res))
    manifest = {
        "format": DATASET_FORMAT, "version": DATASET_VERSION, "gstalk_version": __version__,
        "source": {"path": str(clip.resolve()), **scan["source"]},
        "fps": opts.fps, "resolution": res, "num_frames": n,
        "duration": n / opts.fps,
        "audio": scan["audio"],
        "split": holdout_split(n, opts.holdout),
        "face_fraction": scan["face_fraction"],
        "landmark_fraction": state.get("landmarks")["valid_fraction"],
        "mask_labels": dict(LABELS),
        "options": asdict(opts),
        "warnings": warnings,
        "prepare_seconds": round(time.perf_counter() - t_start, 2),
    }
    write_json(out / "manifest.json", manifest)
    return Dataset(out)


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


def finish_dataset(out: Path, n: int, opts: PrepareOptions, state: "_State", prog: Progress,
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
