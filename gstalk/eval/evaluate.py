"""``gstalk eval AVATAR DATASET``: quality on the held-out tail of the clip, and lip sync on
other speakers' audio, with the deformation on and (as a baseline) off.

Held-out frames are rendered with the tracked head pose, jaw and expression and the clip's
own audio, and once more (``audio_driven``) with jaw and expression from the avatar's lip
model and blink from the audio-to-motion network on that audio, as new audio would drive
them (head pose still tracked; the avatar's other lip model as ``audio_driven_<model>``, and
``mean_mouth`` the control: the mouth held at the training frames' mean jaw and expression,
which ignores the audio); ``lip_yardstick`` puts them side by side (:func:`lip_yardstick`:
LMD and mouth PSNR, each paired against the mean mouth, the opening's correlation with the
ground truth); metrics: PSNR and SSIM
over the full frame and over the face box (the landmarks' bounding box, 10 % margin) and the
mouth box (a square 1.6 times the lips' extent, where the audio acts), mouth landmark
distance (LMD: the detector's lip landmarks on the render vs on the ground truth, pixels at
512), the mouth's motion (spread of the detector's mouth opening over the frames, render /
ground truth: damped lips give < 1; and its correlation with the ground truth's, which says
whether the lips open in time), blink error (eye-aspect blink signal of the render vs the
dataset's). Other speakers' audio drives the avatar with its lip model; the score is the
mouth-opening (measured by the detector on the render) vs speech-energy sync
(:mod:`gstalk.eval.sync`), next to the same score of the real person on their own clip
(``sync_ground_truth``; a real face scores well below 1). The gains of the deformation over
the switched-off render and over the render driven by other frames' audio are reported as
paired per-frame differences with their standard error, so that a clip's few held-out frames
say whether a difference is more than noise. Writes ``eval.json`` (with the per-frame
values) and a side-by-side video (ground truth | render | error).

An avatar fitted without audio (lip model 'none') gets the rows that need no speech: with the
deformation (driven by the tracked expression, blink and neck) and without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Callable

import numpy as np
import torch

from gstalk.avatar.io import load_avatar
from gstalk.avatar.model import Frame
from gstalk.avatar.render import render_frames
from gstalk.audio.features import check_speech
from gstalk.avatar.cameras import cameras_for
from gstalk.avatar.conditions import (LIP_MODELS, audio_drive, audio_features, frames_iter, head_expr, lip_model,
                                      plate_background, rest_expr)
from gstalk.errors import InputError
from gstalk.eval.sync import sync_score
from gstalk.render.metrics import psnr, ssim
from gstalk.face.regions import LIPS, blink_signal, mouth_opening
from gstalk.head.tracker import load_track
from gstalk.io.atomic import write_json
from gstalk.io.dataset import Dataset
from gstalk.render.camera import Cameras

Progress = Callable[[str, int, int], None]
GAIN_METRICS = ("psnr", "face_psnr", "mouth_psnr", "mouth_ssim", "lmd_px512", "blink_error")


def _nanmean(v: np.ndarray) -> float:
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def _paired(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean of ``a - b`` over the frames where both are finite, its standard error and the
    number of frames."""
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    sem = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()) if len(d) else float("nan"), "sem": sem, "frames": int(len(d))}


def _landmarks(frames: list[np.ndarray]) -> np.ndarray:
    from gstalk.face.mediapipe_models import FaceMesh

    mesh = FaceMesh(track=False)
    out = np.full((len(frames), 478, 3), np.nan, np.float32)
    try:
        for k, f in enumerate(frames):
            lmk, _ = mesh(f)
            if lmk is not None:
                out[k] = lmk
    finally:
        mesh.close()
    return out


def _box(pts: np.ndarray, size: int, margin: float) -> tuple[int, int, int, int] | None:
    """The bounding box of ``pts`` [P, 2] widened by ``margin`` of its size each side,
    clipped to the image; None if the points are missing or the box is under 8 pixels."""
    if not np.isfinite(pts).all():
        return None
    x0, y0 = np.floor(pts.min(0)).astype(int)
    x1, y1 = np.ceil(pts.max(0)).astype(int)
    mx, my = int(margin * (x1 - x0)), int(margin * (y1 - y0))
    x0, y0, x1, y1 = max(0, x0 - mx), max(0, y0 - my), min(size, x1 + mx), min(size, y1 + my)
    return (x0, y0, x1, y1) if x1 - x0 >= 8 and y1 - y0 >= 8 else None


def _square(pts: np.ndarray, size: int, scale: float) -> tuple[int, int, int, int] | None:
    """A square ``scale`` times the larger extent of ``pts`` around their centre (the mouth
    box: lips, and the chin and cheeks around them), clipped to the image."""
    if not np.isfinite(pts).all():
        return None
    c = pts.mean(0)
    h = max(4.0, scale * float((pts.max(0) - pts.min(0)).max()) / 2)
    return _box(np.array([c - h, c + h]), size, 0.0)


def _check_same_clip(av, motion: dict, track, avatar_dir, dataset_dir) -> None:
    """Refuse a dataset the avatar was not fitted to: its held-out frames would be another
    person's (or another tracking's), and every number a comparison of the wrong things."""
    n_av, n_ds = len(motion["translation"]), track.num_frames
    shape = av.shape.detach().cpu().numpy()
    other = np.asarray(track.shape, np.float32)
    same_shape = other.shape == shape.shape and np.allclose(other, shape, atol=1e-4)
    if n_av != n_ds or not same_shape:
        why = (f"the avatar was fitted to {n_av} tracked frames, the dataset has {n_ds}" if n_av != n_ds else
               "the dataset's tracked head shape is not the one the avatar was fitted to")
        raise InputError(f"{avatar_dir} was not fitted to {dataset_dir} ({why}); evaluate it on the dataset it was "
                         "trained on (re-tracking a dataset also needs a re-fit)")


def _render_test(av, motion, track, idx: np.ndarray, size: int, deform: bool, bg, drive: tuple,
                 audio_from: np.ndarray | None = None, audio_motion: str | None = None,
                 batch: int = 8) -> list[torch.Tensor]:
    """Renders of frames ``idx`` with their tracked motion. ``drive`` = (audio codes, {lip
    model: (jaw, expression)} from the audio, blink from the audio-to-motion network, the
    dataset's blink), all per frame of the clip; the audio code of frame ``audio_from[k]``
    instead of ``idx[k]``'s where given; with ``audio_motion`` (a lip model), jaw and
    expression from that lip model and blink from the network instead of the track (what new
    audio gets; the head pose stays the tracked one, so the frame can be compared with the
    ground truth)."""
    dev = av.means.device
    codes, lips, a2m_blink, blink = drive
    cam = cameras_for(av, motion, 1, "track", size)[0].to(dev)  # the training camera: the head pose moves
    idx = np.asarray(idx, np.int64)
    src = idx if audio_from is None else np.asarray(audio_from, np.int64)
    out = []
    with torch.no_grad():
        for s in range(0, len(idx), batch):  # posed and rasterized ``batch`` frames at a time
            t, a = idx[s:s + batch], src[s:s + batch]
            p = track.params(t, device=dev)
            b = blink[torch.as_tensor(t, device=blink.device)]
            if audio_motion:
                jaw, expr = lips[audio_motion]
                p.jaw, p.expr, p.eyelids, b = jaw[a], expr[a], None, a2m_blink[a]
            fr = Frame(p, audio=codes[a], blink=b, deform=deform)
            g = av.posed_batch(fr)[0]
            rgb = render_frames(av, g, Cameras.cat([cam] * len(t)), bg, at_train=True)  # the training camera
            out += list(rgb.clamp(0, 1).cpu())
    return out


@dataclass
class Variant:
    """One way of rendering the held-out frames: with or without the deformation, the audio
    code of other frames (``audio_from``), or jaw and expression from a lip model (``lips``:
    'visemes', 'learned', or 'mean' for the still mouth) instead of the track."""

    name: str
    deform: bool = True
    audio_from: np.ndarray | None = None
    lips: str | None = None


def variants_for(av, speech: bool, own_lips: str, train_idx: np.ndarray, n_test: int) -> list[Variant]:
    """What eval renders: the tracked motion with and without the deformation and, for an
    avatar with speech, the control for the audio (other frames' audio codes), every lip
    model driven by the clip's own audio alone ('audio_driven' is the avatar's own, the
    others 'audio_driven_<model>') and the control for the lips: the mouth held at the
    training frames' mean jaw and expression (the best constant guess), 'mean_mouth'."""
    out = [Variant("deformation"), Variant("no_deformation", deform=False)]
    if not speech:
        return out
    shuffled = np.random.default_rng(0).choice(train_idx, n_test)
    out += [Variant("other_audio", audio_from=shuffled), Variant("audio_driven", lips=own_lips)]
    out += [Variant(f"audio_driven_{m}", lips=m) for m in LIP_MODELS if m != own_lips and
            (m != "visemes" or av.visemes.usable)]
    return out + [Variant("mean_mouth", lips="mean")]


def frame_metrics(renders: list[torch.Tensor], gts: list[torch.Tensor], face_boxes, mouth_boxes, gt_lm: np.ndarray,
                  gt_blink: np.ndarray, size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-frame metrics of renders against the ground truth (PSNR and SSIM over the frame,
    the face box and the mouth box; mouth landmark distance; blink error) and the
    detector's landmarks on the renders."""
    pf = {"psnr": np.array([psnr(r, g) for r, g in zip(renders, gts)]),
          "ssim": np.array([ssim(r, g) for r, g in zip(renders, gts)])}
    for key, boxes in (("face", face_boxes), ("mouth", mouth_boxes)):
        bp, bs = np.full(len(gts), np.nan), np.full(len(gts), np.nan)
        for k, ((r, g), box) in enumerate(zip(zip(renders, gts), boxes)):
            if box is not None:
                x0, y0, x1, y1 = box
                bp[k] = psnr(r[y0:y1, x0:x1], g[y0:y1, x0:x1])
                bs[k] = ssim(r[y0:y1, x0:x1], g[y0:y1, x0:x1])
        pf[f"{key}_psnr"], pf[f"{key}_ssim"] = bp, bs
    r_lm = _landmarks([(r.numpy() * 255).astype(np.uint8) for r in renders])
    pf["lmd_px512"] = np.linalg.norm(r_lm[:, LIPS, :2] - gt_lm[:, LIPS, :2], axis=-1).mean(-1) * (512 / size)
    rb, _ = blink_signal(np.nan_to_num(r_lm), np.isfinite(r_lm[:, 0, 0]))
    pf["blink_error"] = np.abs(rb - gt_blink)
    return pf, r_lm


CORR_LEVEL = 0.9  # the opening correlation's interval (two-sided)


def _lag1(x: np.ndarray) -> float:
    x = x - x.mean()
    d = float((x * x).sum())
    return float((x[1:] * x[:-1]).sum() / d) if d > 0 else 0.0


def corr_interval(a: np.ndarray, b: np.ndarray, level: float = CORR_LEVEL) -> tuple[float, float]:
    """The ``level`` confidence interval of the correlation of ``a`` and ``b`` over frames
    (Fisher's z). Neighbouring frames of a mouth go together, so the frames count as fewer:
    Bartlett's effective number for two series with lag-one autocorrelations r_a and r_b,
    n (1 - r_a r_b) / (1 + r_a r_b). NaN where the correlation is undefined or fewer than four
    effective frames remain. The held-out tail of an 8 s clip is 18 frames, whose correlation
    is known only to within about +-0.4."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 4 or a.std() <= 0 or b.std() <= 0:
        return float("nan"), float("nan")
    r = float(np.clip(np.corrcoef(a, b)[0, 1], -0.999999, 0.999999))
    rr = float(np.clip(_lag1(a) * _lag1(b), -0.9, 0.9))
    n_eff = min(len(a), len(a) * (1 - rr) / (1 + rr))
    if n_eff < 4:
        return float("nan"), float("nan")
    half = NormalDist().inv_cdf(0.5 + level / 2) / math.sqrt(n_eff - 3)
    return math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)


def corr_text(r: float, ci) -> str:
    """A correlation with its interval, for tables: '+0.24 [-0.20, +0.59]'; '[?]' where too few
    independent frames leave it undefined, '-' where the correlation itself is."""
    if r is None or not np.isfinite(r):
        return "-"
    lo, hi = (None, None) if ci is None else ci
    ok = lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi)
    return f"{r:+.2f} " + (f"[{lo:+.2f}, {hi:+.2f}]" if ok else "[?]")


def mouth_motion(r_lm: np.ndarray, gt_lm: np.ndarray) -> dict:
    """How far the render's lips move (the spread of the detector's mouth opening over the
    frames, as a fraction of the ground truth's: damped lips < 1) and whether they open when
    the real ones do (the correlation of the two openings: near 0 for lips out of time; NaN
    for a mouth that keeps still, where it is undefined), with its :data:`CORR_LEVEL`
    interval (:func:`corr_interval`)."""
    ok = np.isfinite(r_lm[:, 0, 0]) & np.isfinite(gt_lm[:, 0, 0])
    ro, go = mouth_opening(r_lm[ok]), mouth_opening(gt_lm[ok])
    enough = ok.sum() > 2 and go.std() > 0
    moves = enough and ro.std() > 1e-6 * go.std()
    return {"render_face_found": float(np.isfinite(r_lm[:, 0, 0]).mean()),
            "mouth_motion_ratio": float(ro.std() / go.std()) if enough else float("nan"),
            "mouth_opening_corr": float(np.corrcoef(ro, go)[0, 1]) if moves else float("nan"),
            "mouth_opening_corr_ci": list(corr_interval(ro, go)) if moves else [float("nan")] * 2}


YARDSTICK = ("lmd_px512", "mouth_psnr")  # the lips' per-frame metrics, paired against the mean mouth


def lip_yardstick(result: dict, per_frame: dict, own_lips: str) -> dict:
    """The lips from audio against the still mouth: for the tracked motion and every lip
    model (driven by the clip's own held-out audio alone), the held-out LMD and mouth PSNR,
    the opening's correlation with the ground truth and how far the lips move, each next to
    the mean mouth as a paired difference over the frames with its standard error.
    ``default_beats_mean_mouth``: the avatar's own lip model's LMD is below the mean mouth's
    by more than one standard error."""
    rows = {"tracked": "deformation", **{m: ("audio_driven" if m == own_lips else f"audio_driven_{m}")
                                         for m in LIP_MODELS}, "mean_mouth": "mean_mouth"}
    rows = {k: v for k, v in rows.items() if v in per_frame}
    out: dict = {"default": own_lips, "rows": {}}
    for row, name in rows.items():
        r = {k: result[name][k] for k in YARDSTICK + ("mouth_opening_corr", "mouth_opening_corr_ci",
                                                      "mouth_motion_ratio")}
        if row != "mean_mouth":
            r["minus_mean_mouth"] = {k: _paired(per_frame[name][k], per_frame["mean_mouth"][k]) for k in YARDSTICK}
        out["rows"][row] = r
    g = out["rows"].get(own_lips, {}).get("minus_mean_mouth", {}).get("lmd_px512")
    out["default_beats_mean_mouth"] = bool(g and np.isfinite(g["sem"]) and g["mean"] < -g["sem"])
    return out


def _sync_other_audio(av, motion, others, ds, size: int, bg, prog: Progress) -> dict:
    """Other speakers' audio through the avatar's lip model: the render's mouth opening (by
    the detector) against the audio's speech energy (:func:`sync_score`), with the
    deformation and without it."""
    syncs = {}
    for name_a, audio in others:
        n = max(1, int(round(len(audio) / 16000 * ds.fps)))
        cams = cameras_for(av, motion, n, "track", size)
        for name, deform in (("deformation", True), ("no_deformation", False)):
            frames = [f.copy() for f in frames_iter(av, motion, n, ds.fps, cams, audio, None, "still", deform, bg,
                                                    uint8=True)]
            mlm = _landmarks(frames)
            mouth = mouth_opening(np.nan_to_num(mlm))
            mouth[~np.isfinite(mlm[:, 0, 0])] = np.nan
            syncs.setdefault(name_a, {})[name] = sync_score(mouth, audio, ds.fps)
            prog("eval sync", 1, 1)
    return syncs


def evaluate(avatar_dir: str | Path, dataset_dir: str | Path, audios: list[str | Path] = (), size: int = 0,
             out: str | Path | None = None, device: str = "auto", progress: Progress | None = None) -> dict:
    import cv2

    from gstalk.config import resolve_device
    from gstalk.io.media import check_size, write_video
    from gstalk.io.video import load_audio

    if size:  # the face detector finds no landmarks on smaller renders
        check_size(size, 32)
    prog = progress or (lambda *a: None)
    dev = resolve_device(device)
    av, motion = load_avatar(avatar_dir, dev)
    speech = av.cfg.lip_motion != "none"
    if audios and not speech:
        lip_model(av)  # refuses, saying why, before any work
    others = []  # other speakers' audio: an unreadable or silent file stops here, before any work
    for a in audios:
        audio = load_audio(a)
        check_speech(audio, str(a))
        others.append((Path(a).name, audio))
    ds = Dataset(dataset_dir)
    track = load_track(ds.root / "track.npz")
    _check_same_clip(av, motion, track, avatar_dir, ds.root)
    size = size or min(ds.resolution, 512 if dev.type == "cuda" else 256)
    idx = ds.test_indices
    if len(idx) == 0:
        raise InputError(f"{ds.root} has no held-out frames (split test is empty)")
    bg = plate_background(av, motion, size)
    bg = torch.ones(size, size, 3, device=dev) if bg is None else bg
    gts = [torch.from_numpy(cv2.resize(ds.frame(int(t)), (size, size), interpolation=cv2.INTER_AREA)).float() / 255
           for t in idx]
    all_lm = ds.landmarks()
    clip_audio = ds.audio() if speech else None
    lm = all_lm["lmk"][idx] * (size / ds.resolution)
    face_boxes = [_box(lm[k, :, :2], size, 0.1) for k in range(len(idx))]
    mouth_boxes = [_square(lm[k, LIPS, :2], size, 1.6) for k in range(len(idx))]
    result: dict = {"avatar": str(avatar_dir), "dataset": str(dataset_dir), "size": size, "frames": int(len(idx)),
                    "notes": list(av.notes)}
    own_lips = lip_model(av) if speech else "none"
    if speech:  # the clip's audio, encoded once for every variant
        feats = audio_features(av, clip_audio, ds.num_frames, ds.fps, log=result["notes"].append)
        codes, lips, a2m_blink = audio_drive(av, feats, rest_expr(motion))
        # the still mouth: the training frames' mean jaw and expression (the held-out frames' own
        # would tell the control what the lips should do there)
        tr = np.asarray(ds.train_indices)
        mean_jaw = torch.as_tensor(np.asarray(motion["jaw"], np.float32)[tr].mean(0), device=dev)
        mean_expr = np.asarray(motion["expr"], np.float32)[tr].mean(0)
        lips["mean"] = (mean_jaw.expand(ds.num_frames, -1),
                        head_expr(av, torch.zeros(ds.num_frames, 0, device=dev), mean_expr))
    else:  # fitted without audio: the field saw zero audio codes
        lips, a2m_blink = {}, None
        codes = torch.zeros(ds.num_frames, av.cfg.code_dim, device=dev)
    result["lip_model"] = own_lips
    g_lm = _landmarks([(g.numpy() * 255).astype(np.uint8) for g in gts])
    gt_blink = ds.signals()["blink"]
    drive = (codes, lips, a2m_blink, torch.as_tensor(np.nan_to_num(gt_blink), device=dev).float())
    variants = variants_for(av, speech, own_lips, ds.train_indices, len(idx))
    per_frame: dict[str, dict[str, np.ndarray]] = {}
    side = None
    for vi, v in enumerate(variants):
        renders = _render_test(av, motion, track, idx, size, v.deform, bg, drive, v.audio_from, v.lips)
        prog("eval held-out", vi + 1, len(variants))
        pf, r_lm = frame_metrics(renders, gts, face_boxes, mouth_boxes, g_lm, gt_blink[idx], size)
        per_frame[v.name] = pf
        result[v.name] = {**{k: _nanmean(x) for k, x in pf.items()}, **mouth_motion(r_lm, g_lm)}
        if v.name == "deformation":
            side = [torch.cat([g, r, (r - g).abs().mul(3).clamp(0, 1)], 1) for r, g in zip(renders, gts)]
    # the gains as paired per-frame differences (with minus without; for LMD and blink error,
    # lower is better), with their standard error over the frames: a gain within about two
    # standard errors of zero is not shown by this clip
    for base in ("no_deformation", "other_audio") if speech else ("no_deformation",):
        result[f"gain_over_{base}"] = {k: _paired(per_frame["deformation"][k], per_frame[base][k])
                                       for k in GAIN_METRICS}
    if speech:
        other = [n for n in per_frame if n.startswith("audio_driven_")]
        if other:  # the avatar's lip model against the other one
            result[f"lips_gain_over_{other[0][len('audio_driven_'):]}"] = {
                k: _paired(per_frame["audio_driven"][k], per_frame[other[0]][k]) for k in GAIN_METRICS}
        result["lips_gain_over_mean_mouth"] = {k: _paired(per_frame["audio_driven"][k], per_frame["mean_mouth"][k])
                                               for k in GAIN_METRICS}
        result["lip_yardstick"] = lip_yardstick(result, per_frame, own_lips)
    result["per_frame"] = {name: {k: [None if not np.isfinite(x) else round(float(x), 5) for x in v]
                                  for k, v in pf.items()} for name, pf in per_frame.items()}
    syncs = _sync_other_audio(av, motion, others, ds, size, bg, prog)
    result["sync_other_audio"] = syncs
    # what a real face scores: the filmed person's own mouth (detector landmarks on every frame
    # of the clip) against the clip's own audio; people do not shut the mouth in every pause,
    # so a render far above this exaggerates, one far below it lags or barely moves
    result["sync_ground_truth"] = None  # no speech to measure it against
    if speech:
        own_mouth = mouth_opening(np.nan_to_num(all_lm["lmk"]))
        own_mouth[~np.asarray(all_lm["valid"], bool)] = np.nan
        result["sync_ground_truth"] = sync_score(own_mouth, clip_audio, ds.fps)
    for name in ("deformation", "no_deformation") if speech else ():  # no speech: nothing to sync
        vals = [v[name] for v in syncs.values() if math.isfinite(v[name])]  # NaN: undefined, left out
        result[name]["sync_other_audio"] = float(np.mean(vals)) if vals else float("nan")
    out_dir = Path(out) if out else Path(avatar_dir) / "eval"
    write_json(out_dir / "eval.json", result)
    if side:
        write_video(out_dir / "side_by_side.mp4", side, ds.fps)
    result["files"] = {"json": str(out_dir / "eval.json"), "video": str(out_dir / "side_by_side.mp4")}
    return result
