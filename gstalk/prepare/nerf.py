"""``gstalk import-dataset``: bring a folder prepared for the public NeRF/3DGS talking-head
projects (AD-NeRF, RAD-NeRF, ER-NeRF, TalkingGaussian, GaussianTalker layout) into a
gstalk dataset folder.

Read from the source folder (what is present is used; frames are required):

- ``ori_imgs/<i>.jpg``           frames (square; non-square ones are centre-cropped)
- ``parsing/<i>.png``            semantic parsing, colours as cv2 reads them (BGR):
                                 head (255,0,0), neck (0,255,0), torso (0,0,255), background white
- ``bc.jpg``                     background plate
- ``transforms_train.json``,
  ``transforms_val.json``        ``focal_len``, ``cx``, ``cy`` and per-frame ``img_id``,
                                 ``aud_id``, ``transform_matrix`` (camera-to-world): the split,
                                 and the poses kept as ``imported_poses.npz``
- ``aud.wav`` (or any *.wav)     the audio track
- ``aud_ds.npy``, ``aud_hu.npy``,
  ``aud_eo.npy``, ``aud.npy``    precomputed audio features (DeepSpeech, HuBERT, wav2vec/other),
                                 copied to ``features/`` as deepspeech.npy, hubert.npy, wav2vec.npy, other.npy
- ``au.csv``                     OpenFace output; its `` AU45_r`` column (leading space) becomes
                                 the blink signal, clip(AU45_r, 0, 2) / 2

gstalk's own 478-point landmarks, masks (face and mouth from landmarks, the rest from the
parsing when present), signals and preview are then computed as ``prepare`` would.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np

from gstalk import __version__
from gstalk.config import PrepareOptions
from gstalk.errors import FileFormatError, InputError
from gstalk.face.regions import BACKGROUND, HEAD_OTHER, LABELS, TORSO
from gstalk.io.atomic import ensure_dir, write_json
from gstalk.io.dataset import DATASET_FORMAT, DATASET_VERSION, Dataset, read_image_file, save_npz, write_image_file
from gstalk.io.video import load_audio, write_wav
from gstalk.prepare.common import AUDIO_RATE, Progress, State, check_dataset_out, finish_dataset, holdout_split

FEATURE_FILES = {"aud_ds.npy": "deepspeech", "aud_hu.npy": "hubert", "aud_eo.npy": "wav2vec", "aud.npy": "other"}


def _square(img: np.ndarray, res: int) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    img = img[y0:y0 + s, x0:x0 + s]
    if s != res:
        img = cv2.resize(img, (res, res), interpolation=cv2.INTER_AREA if s > res else cv2.INTER_LINEAR)
    return img


def _parsing_labels(path: Path, res: int) -> np.ndarray:
    import cv2

    seg = cv2.imread(str(path), cv2.IMREAD_COLOR)  # BGR, as the source projects read it
    if seg is None:
        raise FileFormatError(f"cannot read parsing image {path}")
    h, w = seg.shape[:2]
    s = min(h, w)
    seg = seg[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    seg = cv2.resize(seg, (res, res), interpolation=cv2.INTER_NEAREST)
    b, g, r = (seg[..., i].astype(int) for i in range(3))
    out = np.full((res, res), HEAD_OTHER, np.uint8)  # anything coloured but not listed: part of the person
    out[(b > 200) & (g > 200) & (r > 200)] = BACKGROUND
    out[(b < 60) & (g > 200) & (r < 60)] = TORSO  # neck
    out[(b < 60) & (g < 60) & (r > 200)] = TORSO  # torso
    return out


def _read_au45(path: Path) -> np.ndarray:
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise FileFormatError(f"{path} is not a CSV file ({e})") from None
    if not rows:
        raise FileFormatError(f"{path} is empty")
    header = [h.strip() for h in rows[0]]  # OpenFace writes ' AU45_r' with a leading space
    if "AU45_r" not in header:
        raise FileFormatError(f"{path} has no AU45_r column (columns: {', '.join(header[:8])}...)")
    j = header.index("AU45_r")
    try:
        return np.array([float(r[j]) for r in rows[1:] if len(r) > j], np.float32)
    except ValueError as e:
        raise FileFormatError(f"{path}: the AU45_r column holds something that is not a number ({e})") from None


def _split_and_poses(src: Path, out: Path, ids: list[int], opts: PrepareOptions,
                     warnings: list[str]) -> tuple[dict, dict, dict]:
    """The held-out split and the camera poses from ``transforms_*.json`` (kept beside the
    dataset in ``imported_poses.npz``): (split, intrinsics found, {img_id: (file, c2w)})."""
    n = len(ids)
    split = holdout_split(n, opts.holdout)
    meta = {}
    poses = {}
    for name in ("train", "val"):
        p = src / f"transforms_{name}.json"
        if p.is_file():
            try:
                d = json.loads(p.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise FileFormatError(f"{p} is not valid JSON ({e})") from None
            try:
                meta.update({k: float(d[k]) for k in ("focal_len", "cx", "cy") if k in d})
                for fr in d.get("frames", []):
                    m = np.asarray(fr["transform_matrix"], np.float64)
                    if m.shape != (4, 4):
                        raise ValueError(f"a transform_matrix of shape {m.shape}")
                    poses[int(fr["img_id"])] = (name, m)
            except (AttributeError, KeyError, TypeError, ValueError) as e:
                raise FileFormatError(f"{p} is not a transforms file of NeRF talking-head data (frames with img_id "
                                      f"and a 4x4 transform_matrix): {type(e).__name__} {e}") from None
    index_of = {i: k for k, i in enumerate(ids)}
    if poses:
        train = sorted(index_of[i] for i, (nm, _) in poses.items() if nm == "train" and i in index_of)
        val = sorted(index_of[i] for i, (nm, _) in poses.items() if nm == "val" and i in index_of)
        if train and val and max(train) < min(val):
            split = {"train": [0, min(val)], "test": [min(val), n]}
        else:
            warnings.append("transforms_train/val do not split the frames into a head and a tail; "
                            "holding out the last frames instead")
        mats = np.full((n, 4, 4), np.nan)
        for i, (_, m) in poses.items():
            if i in index_of:
                mats[index_of[i]] = m
        save_npz(out / "imported_poses.npz", c2w=mats, focal=np.float64(meta.get("focal_len", np.nan)),
                 cx=np.float64(meta.get("cx", np.nan)), cy=np.float64(meta.get("cy", np.nan)))
    return split, meta, poses


def _frames(src: Path, out: Path, ids: list[int], opts: PrepareOptions, prog: Progress,
            warnings: list[str]) -> tuple[int, int]:
    """``ori_imgs/<i>.jpg`` centre-cropped to squares at the working resolution; the source
    frames' (width, height)."""
    img_dir, res, n = src / "ori_imgs", opts.resolution, len(ids)
    fdir = ensure_dir(out / "frames")
    first = None
    for k, i in enumerate(ids):
        if (fdir / f"{k:06d}.jpg").is_file():
            continue
        img = read_image_file(img_dir / f"{i}.jpg")
        first = first or img.shape[:2]
        write_image_file(fdir / f"{k:06d}.jpg", _square(img, res), opts.jpeg_quality)
        prog("frames", k + 1, n)
    src_h, src_w = first or read_image_file(img_dir / f"{ids[0]}.jpg").shape[:2]
    if src_h != src_w:
        warnings.append(f"frames are {src_w}x{src_h}: centre-cropped to a square")
    return src_w, src_h


def _audio_and_features(src: Path, out: Path, n: int, opts: PrepareOptions,
                        warnings: list[str]) -> tuple[dict, dict]:
    """``aud.wav`` (or the folder's first .wav) cut to the frames' length, and the audio
    feature arrays the folder holds, copied: (audio description, {kind: path})."""
    audio_info = {"present": False, "sample_rate": AUDIO_RATE, "samples": 0}
    wavs = [src / "aud.wav"] if (src / "aud.wav").is_file() else sorted(src.glob("*.wav"))
    if wavs:
        a = load_audio(wavs[0], AUDIO_RATE)
        need = int(round(n / opts.fps * AUDIO_RATE))
        a = a[:need] if a.size >= need else np.pad(a, (0, need - a.size))
        write_wav(out / "audio.wav", a, AUDIO_RATE)
        rms = float(np.sqrt(np.mean(a.astype(np.float64) ** 2)))
        audio_info = {"present": True, "sample_rate": AUDIO_RATE, "samples": int(a.size), "rms": rms,
                      "silent": rms < 1e-3}
    else:
        warnings.append("no audio (aud.wav) in the source folder")
    features = {}
    for fname, kind in FEATURE_FILES.items():
        if (src / fname).is_file():
            ensure_dir(out / "features")
            shutil.copyfile(src / fname, out / "features" / f"{kind}.npy")
            features[kind] = f"features/{kind}.npy"
    return audio_info, features


def import_nerf_dataset(src: str | Path, out: str | Path, opts: PrepareOptions | None = None,
                        progress: Progress | None = None, log=print) -> Dataset:
    """Convert a NeRF/3DGS talking-head data folder ``src`` into the gstalk dataset ``out``."""
    from gstalk.prepare.video import check_options

    opts = opts or PrepareOptions()
    check_options(opts)
    src, out = Path(src), Path(out)
    img_dir = src / "ori_imgs"
    if not src.exists():
        raise InputError(f"{src} does not exist: give the folder of a NeRF talking-head dataset (ori_imgs/, "
                         "transforms_train.json, aud.wav ...)")
    if not src.is_dir():
        raise InputError(f"{src} is a file, not a folder: give the folder of a NeRF talking-head dataset "
                         "(ori_imgs/, transforms_train.json, aud.wav ...)")
    check_dataset_out(out)  # before any work: never over files gstalk did not write
    if not img_dir.is_dir():
        raise FileFormatError(f"{src} has no ori_imgs/ folder: it does not look like a NeRF talking-head dataset "
                              "(expected ori_imgs/, transforms_train.json, aud.wav ...)")
    ids = sorted(int(p.stem) for p in img_dir.glob("*.jpg") if p.stem.isdigit())
    if not ids:
        raise FileFormatError(f"{img_dir} holds no numbered .jpg frames")
    n = len(ids)
    if n / opts.fps < opts.min_seconds:
        raise InputError(f"{src} has {n} frames ({n / opts.fps:.1f} s at {opts.fps:g} fps); "
                         f"need {opts.min_seconds:g} s")
    prog = progress or (lambda stage, i, total: None)
    created = not out.exists()
    ensure_dir(out)
    state = State(out, f"import:{src.resolve()}:{n}:{opts.resolution}")
    with state.abandoned_on_failure(created):
        return _build(src, out, ids, opts, state, prog, log)


def _build(src: Path, out: Path, ids: list[int], opts: PrepareOptions, state: State, prog, log) -> Dataset:
    n = len(ids)
    warnings: list[str] = []
    res = opts.resolution

    split, meta, poses = _split_and_poses(src, out, ids, opts, warnings)
    src_w, src_h = _frames(src, out, ids, opts, prog, warnings)
    audio_info, features = _audio_and_features(src, out, n, opts, warnings)
    # background and parsing
    if (src / "bc.jpg").is_file():
        write_image_file(out / "background.png", _square(read_image_file(src / "bc.jpg"), res))
    has_parsing = (src / "parsing").is_dir() and all((src / "parsing" / f"{i}.png").is_file() for i in ids)
    base = (lambda k: _parsing_labels(src / "parsing" / f"{ids[k]}.png", res)) if has_parsing else None
    blink = None
    if (src / "au.csv").is_file():
        au = _read_au45(src / "au.csv")
        if len(au) < n:
            warnings.append(f"au.csv has {len(au)} rows for {n} frames: blink from eye aspect ratio instead")
        else:
            blink = np.clip(au[:n], 0, 2) / 2

    finish_dataset(out, n, opts, state, prog, base_labels=base, blink=blink)
    manifest = {
        "format": DATASET_FORMAT, "version": DATASET_VERSION, "gstalk_version": __version__,
        "source": {"path": str(src.resolve()), "kind": "nerf-talking-head", "width": int(src_w),
                   "height": int(src_h), "rotation": 0, "imported": {"parsing": has_parsing, "au45": blink is not None,
                                                                     "poses": bool(poses), **meta}},
        "fps": opts.fps, "resolution": res, "num_frames": n, "duration": n / opts.fps,
        "audio": audio_info, "features": features, "split": split,
        "face_fraction": state.get("landmarks")["valid_fraction"],
        "landmark_fraction": state.get("landmarks")["valid_fraction"],
        "mask_labels": dict(LABELS), "warnings": warnings,
    }
    write_json(out / "manifest.json", manifest)
    return Dataset(out)
