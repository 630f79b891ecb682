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
from gstalk.io.dataset import DATASET_FORMAT, DATASET_VERSION, Dataset, save_npz, write_image_file
from gstalk.io.media import MAX_FPS, MAX_SIZE
from gstalk.face.regions import LABELS
from gstalk.io.video import iter_frames, probe, read_audio, standard_range, write_wav
from gstalk.prepare.common import (AUDIO_RATE, ClipTooShortError, NoFaceError, Progress, State, _interp_nan,
                                   _subject_boxes, check_dataset_out, finish_dataset, holdout_split)

def _fingerprint(clip: Path, opts: PrepareOptions) -> str:
    st = clip.stat()
    key = json.dumps({"clip": str(clip.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
                      "opts": asdict(opts)}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def check_options(opts: PrepareOptions, prefix: str = "") -> None:
    """:class:`InputError` naming the first option no dataset can be made with (its flag with
    ``prefix``, see :func:`gstalk.errors.check_ranges`)."""
    check_ranges(opts, {"fps": between(1, MAX_FPS), "resolution": between(32, MAX_SIZE), "crop_scale": ABOVE_0,
                        "crop_down": between(-1, 1), "holdout": between(0, 0.5), "min_face_fraction": between(0, 1),
                        "min_seconds": AT_LEAST_0, "smooth_seconds": AT_LEAST_0, "landmark_sigma": AT_LEAST_0,
                        "jpeg_quality": between(1, 100), "detect_size": between(64, MAX_SIZE)}, prefix=prefix)


def _scan(clip: Path, out: Path, opts: PrepareOptions, info, state: State, prog: Progress,
          log: Callable[[str], None]) -> None:
    """Stage 1: decode at the dataset's rate, find the face in every frame (the subject: the
    one that fills the picture most over the clip), extract the audio aligned to frame 0."""
    if state.done("scan"):
        return
    from gstalk.face.mediapipe_models import FaceDetector

    det = FaceDetector()
    turn = 0
    try:
        found, counts = _detect_all(clip, opts, info, det, prog)
        frac = float(np.mean([len(f) > 0 for f in found])) if found else 0.0
        turn = _sideways(clip, opts, info, det) if frac < opts.min_face_fraction else 0
        if turn:  # filmed sideways (or upside down) with no rotation in the file: turn it
            _turn(info, turn)
            found, counts = _detect_all(clip, opts, info, det, prog)
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
                          f"{100 * opts.min_face_fraction:.0f}%, in any of the four orientations); keep the face "
                          "in view and well lit")
    multi = float((counts_a > 1).mean())
    scan_warn = list(info.warnings)  # what the decoder had to say (it stopped early)
    if np.isfinite(info.duration) and info.duration - duration > max(0.5, 0.05 * info.duration):
        scan_warn.append(f"the video ends at {duration:.1f} s of the {info.duration:.1f} s its file declares: it may "
                         "be truncated (a copy that did not finish?); the dataset holds the part that decodes")
    if turn:
        scan_warn.append(f"the clip was prepared turned by {turn} degrees: its faces are upright that way, and its "
                         "file records no rotation")
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
                                   "start_time": info.start_time, "transfer": info.transfer or "SDR"}})
    for w in scan_warn:
        log(f"warning: {w}")


UPSCALE_WARN = 2.0  # a source crop upscaled more than this to the dataset's resolution is warned about


def _detect_all(clip: Path, opts: PrepareOptions, info, det, prog: Progress) -> tuple[list, list]:
    """Every frame's face boxes (in display pixels) and how many."""
    found, counts = [], []
    est = int(round(info.duration * opts.fps)) if np.isfinite(info.duration) else 0
    for k, img in iter_frames(clip, opts.fps, info, signal=True):  # (HDR is tone-mapped once small)
        small, s = _small(img, opts.detect_size)
        faces = det.detect(standard_range(small, info))
        counts.append(len(faces))
        found.append([[f.x / s, f.y / s, f.w / s, f.h / s, f.score] for f in faces])
        prog("scan", k + 1, max(est, k + 1))
    return found, counts


def _small(img: np.ndarray, detect_size: int) -> tuple[np.ndarray, float]:
    s = detect_size / max(img.shape[:2])
    if s >= 1:
        return img, 1.0
    import cv2

    return cv2.resize(img, (int(round(img.shape[1] * s)), int(round(img.shape[0] * s))),
                      interpolation=cv2.INTER_AREA), s


SIDEWAYS_SAMPLE = 16  # frames tried in each orientation when too few faces are found


def _sideways(clip: Path, opts: PrepareOptions, info, det) -> int:
    """0, or the turn (90, 180 or 270 degrees counter-clockwise) under which the detector finds
    a face in most of a sample of frames where the clip as stored shows too few: a phone clip
    whose rotation was lost (re-encoded, or filmed with the orientation lock on)."""
    n = max(1, int(info.duration * opts.fps)) if np.isfinite(info.duration) else SIDEWAYS_SAMPLE
    step = max(1, n // SIDEWAYS_SAMPLE)
    hits = np.zeros(4, int)
    tried = 0
    for k, img in iter_frames(clip, opts.fps, info, signal=True):
        if k % step:
            continue
        small = standard_range(_small(img, opts.detect_size)[0], info)
        for turn in range(4):
            hits[turn] += len(det.detect(np.ascontiguousarray(np.rot90(small, turn)))) > 0
        tried += 1
        if tried >= SIDEWAYS_SAMPLE:
            break
    best = int(np.argmax(hits))
    if best and hits[best] >= max(2 * hits[0] + 1, opts.min_face_fraction * tried):
        return 90 * best
    return 0


def _turn(info, turn: int) -> None:
    """Display ``info``'s frames turned by ``turn`` more degrees (counter-clockwise)."""
    info.rotation = (info.rotation + turn) % 360
    if turn in (90, 270):
        info.width, info.height = info.height, info.width


def _crop(out: Path, opts: PrepareOptions, n: int, src_w: int, src_h: int, state: State) -> None:
    """Stage 2: a square head-and-shoulders crop per frame, of one size, its centre smoothed
    over ``smooth_seconds``."""
    if state.done("crop"):
        return
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
    warn = []
    if opts.resolution > UPSCALE_WARN * size:
        smaller = max(64, int(2 ** np.floor(np.log2(size))))
        warn.append(f"the head is {size:.0f} px across in the source, upscaled {opts.resolution / size:.1f}x to the "
                    f"dataset's {opts.resolution} px: the avatar will be soft. Film closer or at a higher resolution, "
                    f"or prepare at --resolution {smaller}")
    state.mark("crop", {"size": size, "warnings": warn})


def _frames(clip: Path, out: Path, opts: PrepareOptions, n: int, crop: np.ndarray, state: State,
            prog: Progress) -> None:
    """Stage 3: decode again, crop and resize to the working resolution, write the JPEGs
    (resumed at the first missing one)."""
    res = opts.resolution
    fdir = ensure_dir(out / "frames")
    if state.done("frames"):
        return
    import cv2

    first_missing = 0
    while first_missing < n and (fdir / f"{first_missing:06d}.jpg").is_file():
        first_missing += 1
    info = probe(clip)
    recorded = state.get("scan")["source"]["rotation"]  # the scan may have found the clip sideways
    _turn(info, (recorded - info.rotation) % 360)
    for k, img in iter_frames(clip, opts.fps, info, start_frame=first_missing, signal=True):
        if k >= n:
            break
        x0, y0, s = crop[k]
        m = np.array([[res / s, 0, -x0 * res / s], [0, res / s, -y0 * res / s]], np.float32)
        interp = cv2.INTER_AREA if s > res else cv2.INTER_LINEAR
        frame = standard_range(cv2.warpAffine(img, m, (res, res), flags=interp, borderMode=cv2.BORDER_REPLICATE),
                               info)
        write_image_file(fdir / f"{k:06d}.jpg", frame, opts.jpeg_quality)
        prog("frames", k + 1, n)
    missing = [k for k in range(n) if not (fdir / f"{k:06d}.jpg").is_file()]
    if missing:
        raise GstalkError(f"{len(missing)} frames could not be decoded the second time (first: {missing[0]}); "
                          "the clip may be damaged")
    state.mark("frames")


def prepare(clip: str | Path, out: str | Path, opts: PrepareOptions | None = None,
            progress: Progress | None = None, log: Callable[[str], None] = print) -> Dataset:
    """Build the dataset folder ``out`` from ``clip``; resume if ``out`` holds a partial run."""
    opts = opts or PrepareOptions()
    clip, out = Path(clip), Path(out)
    check_options(opts)
    info = probe(clip)  # raises FileFormatError for missing/corrupt files
    check_dataset_out(out)
    created = not out.exists()
    ensure_dir(out)
    state = State(out, _fingerprint(clip, opts))
    with state.abandoned_on_failure(created):
        return _build(clip, out, opts, info, state, progress, log)


def _build(clip: Path, out: Path, opts: PrepareOptions, info, state: State, progress, log) -> Dataset:
    if state.done("signals") and (state.done("preview") or not opts.preview):
        log(f"{out} is already prepared from this clip with these options: reusing it")
    elif state.resumed:
        log(f"resuming the unfinished preparation in {out}")
    warnings: list[str] = []
    prog = progress or (lambda stage, i, n: None)
    t_start = time.perf_counter()

    _scan(clip, out, opts, info, state, prog, log)
    scan = state.get("scan")
    warnings += scan["warnings"]
    n = int(scan["num_frames"])
    src_w, src_h = scan["source"]["width"], scan["source"]["height"]

    _crop(out, opts, n, src_w, src_h, state)
    crop_info = state.get("crop")
    if isinstance(crop_info, dict):  # (a folder from before the crop recorded its warnings holds True)
        warnings += crop_info["warnings"]
        if not state.done("frames"):
            for w in crop_info["warnings"]:
                log(f"warning: {w}")
    with np.load(out / "crop.npz") as z:
        crop = z["box"]

    _frames(clip, out, opts, n, crop, state, prog)
    res = opts.resolution
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


