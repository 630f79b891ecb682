"""Monocular FLAME tracking from 2D face landmarks, in explicit stages (as VHAP and
metrical-tracker do):

1. rigid: the camera focal length (shared) and every frame's head rotation and
   translation, on the neutral head;
2. identity: the shape coefficients over keyframes (spread in time and pose), with those
   frames' pose and expression;
3. all frames at once, batched: expression, jaw, neck, eyes, eyelids, pose, with temporal
   smoothness (first and second differences) on every per-frame quantity;
4. silhouette (when the dataset has masks): every skull and face vertex must project inside
   the person mask. The term is the squared distance from each projected vertex to the mask
   (in 1/256 of the image height), read from a distance transform by bilinear sampling so
   that it is differentiable; it is one-sided because hair and ears extend the mask beyond the head
   model, and it works with the landmark term and the same smoothness. It corrects heads that
   the landmarks leave too wide, too large or too far off the face's outline.

The camera is fixed for the clip: OpenCV camera at the world origin looking along world
-z with image y = world -y (``viewmat = diag(1, -1, -1, 1)``); the head model's own frame
is y up and facing +z, so a frontal head has rotation 0 and a negative z translation.
Only the vertices under the landmarks are posed, so all frames fit together on a CPU.
Frames without landmarks take no data term: the smoothness terms interpolate them, and
they are flagged in the track.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gstalk.config import TrackOptions
from gstalk.errors import ABOVE_0, AT_LEAST_0, AT_LEAST_1, GstalkError, InputError, between, check_ranges
from gstalk.face import regions as R
from gstalk.head.embedding import LandmarkEmbedding, load_embedding
from gstalk.head.flame import HeadModel, load_head_model
from gstalk.head.lbs import FlameParams, VertexSubset, axis_angle_to_matrix, flame_forward, matrix_to_axis_angle

TRACK_FORMAT = "gstalk-track"
TRACK_VERSION = 1
VIEWMAT = np.diag([1.0, -1.0, -1.0, 1.0])
CHUNK = 256  # frames whose landmark and silhouette terms are computed at once (memory, not the result)
Progress = Callable[[str, int, int], None]


class TrackingError(GstalkError):
    """Tracking cannot proceed on this data."""


def landmark_weights(indices: np.ndarray) -> np.ndarray:
    """Per-landmark weights: lips and eyes count double, the face outline less (it slides
    over the surface as the head turns), irises for gaze."""
    w = np.ones(len(indices))
    heavy = set(R.INNER_LIPS + R.OUTER_LIPS + R.LEFT_EYE_EAR + R.RIGHT_EYE_EAR)
    oval = set(R.FACE_OVAL)
    for k, i in enumerate(indices):
        if i in heavy:
            w[k] = 2.0
        elif i in oval:
            w[k] = 0.3
    return w


@dataclass
class Track:
    """Per-frame FLAME parameters and the clip's camera (see :func:`save_track`)."""

    shape: np.ndarray  # [S]
    expr: np.ndarray  # [T, E]
    jaw: np.ndarray  # [T, 3]
    neck: np.ndarray  # [T, 3]
    eyes: np.ndarray  # [T, 6]
    eyelids: np.ndarray  # [T, 2]
    global_rot: np.ndarray  # [T, 3]
    translation: np.ndarray  # [T, 3]
    K: np.ndarray  # [3, 3]
    viewmat: np.ndarray  # [4, 4]
    width: int
    height: int
    valid: np.ndarray  # [T] landmarks were found (False: interpolated)
    residual_px: np.ndarray  # [T] mean landmark reprojection error
    model: dict
    embedding_source: str = ""
    fps: float = 25.0

    @property
    def num_frames(self) -> int:
        return self.expr.shape[0]

    def params(self, frames=None, device="cpu") -> FlameParams:
        sl = slice(None) if frames is None else frames
        t = lambda a: torch.as_tensor(np.asarray(a[sl]), dtype=torch.float32, device=device)  # noqa: E731
        n = len(self.expr[sl])
        return FlameParams(shape=torch.as_tensor(self.shape, dtype=torch.float32, device=device)[None].expand(n, -1),
                           expr=t(self.expr), jaw=t(self.jaw), neck=t(self.neck), eyes=t(self.eyes),
                           eyelids=t(self.eyelids), global_rot=t(self.global_rot), translation=t(self.translation))


def save_track(track: Track, path: str | os.PathLike) -> Path:
    from gstalk.io.dataset import save_npz

    d = asdict(track)
    meta = {"format": TRACK_FORMAT, "version": TRACK_VERSION, "model": d.pop("model"),
            "embedding_source": d.pop("embedding_source"), "width": d.pop("width"), "height": d.pop("height"),
            "fps": d.pop("fps")}
    return save_npz(path, meta=np.array(json.dumps(meta)), **{k: np.asarray(v) for k, v in d.items()})


# each array's shape: S identity and E expression directions, T frames
TRACK_SHAPES = {"shape": ("S",), "expr": ("T", "E"), "jaw": ("T", 3), "neck": ("T", 3), "eyes": ("T", 6),
                "eyelids": ("T", 2), "global_rot": ("T", 3), "translation": ("T", 3), "K": (3, 3), "viewmat": (4, 4),
                "valid": ("T",), "residual_px": ("T",)}


def check_track(arrays: dict, meta: dict, path: Path) -> None:
    """A track's description and arrays by type, range and shape (:mod:`gstalk.io.schema`)."""
    from gstalk.errors import FileFormatError
    from gstalk.io.schema import Int, Number, Record, Text, check_arrays, check_fields

    fix = "re-run 'gstalk track'"
    rules = {"model": Record({"name": Text()}, required=("name",)), "embedding_source": Text(),
             "width": Int(1, 100_000), "height": Int(1, 100_000), "fps": Number(1, 1000)}
    missing = [k for k in rules if k not in meta]
    if missing:
        raise FileFormatError(f"{path}: the track description lacks {', '.join(missing)}; {fix}")
    check_fields(meta, rules, path, fix)
    check_arrays(arrays, TRACK_SHAPES, path, fix, may_be_nan=("residual_px",))  # NaN: frames without landmarks


def load_track(path: str | os.PathLike) -> Track:
    from gstalk.errors import FileFormatError
    from gstalk.io.dataset import load_npz

    p = Path(path)
    if not p.is_file():
        raise FileFormatError(f"no track at {p}; run 'gstalk track DATASET' first")
    arrays = load_npz(p, "give the track.npz that 'gstalk track' wrote")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except (KeyError, json.JSONDecodeError):
        raise FileFormatError(f"{p} is not a gstalk track (no track description)") from None
    if not isinstance(meta, dict) or meta.get("format") != TRACK_FORMAT or meta.get("version") != TRACK_VERSION:
        got = meta if not isinstance(meta, dict) else f"{meta.get('format')} v{meta.get('version')}"
        raise FileFormatError(f"{p} is a track of format {got}; this gstalk reads v{TRACK_VERSION}. "
                              "Re-run 'gstalk track'.")
    names = {f.name for f in fields(Track)} - {"model", "embedding_source", "width", "height", "fps"}
    if set(arrays) != names:
        raise FileFormatError(f"{p} does not hold a gstalk track's arrays (missing "
                              f"{sorted(names - set(arrays))[:3]}, unexpected {sorted(set(arrays) - names)[:3]})")
    check_track(arrays, meta, p)
    return Track(**arrays, model=meta["model"], embedding_source=meta["embedding_source"], width=meta["width"],
                 height=meta["height"], fps=meta["fps"])


def _huber(x: torch.Tensor, delta: float) -> torch.Tensor:
    a = x.abs()
    return torch.where(a < delta, 0.5 * x * x, delta * (a - 0.5 * delta))


class _Fitter:
    def __init__(self, model: HeadModel, emb: LandmarkEmbedding, lmk2d: np.ndarray, valid: np.ndarray,
                 width: int, height: int, opts: TrackOptions, device):
        self.model, self.opts, self.dev = model, opts, device
        _, vids, local_faces = emb.remapped(model.faces.cpu())
        self.vids = VertexSubset.of(model, vids.to(device))  # gathered once, posed thousands of times
        # each landmark's barycentric weights on those vertices, as one [L, V'] matrix
        rows = torch.arange(len(local_faces))[:, None].expand(-1, 3)
        self.lmk_from_vertices = torch.zeros(len(local_faces), len(vids)).index_put_(
            (rows, local_faces), emb.bary.float(), accumulate=True).to(device)
        idx = emb.landmark_indices.numpy()
        if lmk2d.shape[1] < idx.max() + 1:
            raise InputError(f"the embedding uses detector landmark {idx.max()}, but only {lmk2d.shape[1]} landmarks "
                             "per frame were given")
        self.target = torch.as_tensor(lmk2d[:, idx, :2], dtype=torch.float32, device=device)  # [T, L, 2]
        self.valid = torch.as_tensor(valid, device=device)
        self.target = torch.nan_to_num(self.target)
        self.w = torch.as_tensor(landmark_weights(idx), dtype=torch.float32, device=device)
        self.T = lmk2d.shape[0]
        self.width, self.height = width, height
        self.cx, self.cy = width / 2, height / 2

    def landmarks3d(self, p: FlameParams) -> torch.Tensor:
        v = flame_forward(self.model, p, vertex_ids=self.vids).vertices  # [B, V', 3]
        b, n = v.shape[:2]  # one [L, V'] x [V', B*3] product (a batched one with 3 columns is slow)
        return (self.lmk_from_vertices @ v.transpose(0, 1).reshape(n, b * 3)).reshape(-1, b, 3).transpose(0, 1)

    def project(self, x: torch.Tensor, focal: torch.Tensor) -> torch.Tensor:
        # world -> OpenCV camera: (x, -y, -z)
        z = (-x[..., 2]).clamp_min(1e-3)
        u = focal * x[..., 0] / z + self.cx
        v = focal * (-x[..., 1]) / z + self.cy
        return torch.stack([u, v], -1)

    def data_term(self, p: FlameParams, focal: torch.Tensor, frames: torch.Tensor,
                  n_valid: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The robust landmark error of ``frames``, summed and divided by ``n_valid`` (default:
        their own count of frames with landmarks; a chunk of a clip passes the clip's, so that
        the chunks' terms add up to the clip's), and each frame's mean distance in pixels."""
        uv = self.project(self.landmarks3d(p), focal)
        err = uv - self.target[frames]
        per = (_huber(err, self.opts.huber_px).sum(-1) * self.w).sum(-1) / self.w.sum()
        dist = err.norm(dim=-1).mean(-1)
        m = self.valid[frames].float()
        return (per * m).sum() / (m.sum().clamp_min(1) if n_valid is None else max(n_valid, 1.0)), dist


def _smooth(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] < 3:
        return x.new_zeros(())
    v = x[1:] - x[:-1]
    a = x[2:] - 2 * x[1:-1] + x[:-2]
    return 0.1 * (v * v).sum(-1).mean() + (a * a).sum(-1).mean()


def silhouette_vertices(model: HeadModel, emb: LandmarkEmbedding) -> torch.Tensor:
    """Indices of the head-model vertices that must lie inside the person's silhouette: skull
    and face (the stand-in's regions), or for other models every vertex above the chin."""
    names = model.meta.get("region_names")
    vr = model.meta.get("vertex_region")
    if names is not None and vr is not None:
        names = [str(n) for n in np.asarray(names)]
        keep = np.isin(np.asarray(vr), [names.index(n) for n in ("face", "skull") if n in names])
        return torch.as_tensor(np.flatnonzero(keep))
    v = model.v_template.cpu()
    idx = list(emb.landmark_indices.numpy())
    chin_face = int(emb.face_idx[idx.index(152)]) if 152 in idx else None
    chin_y = float(v[model.faces[chin_face]].mean(0)[1]) if chin_face is not None else float(v[:, 1].median())
    return torch.nonzero(v[:, 1] > chin_y).flatten()


def mask_distance(person: np.ndarray, size: int = 128) -> np.ndarray:
    """[H, W] bool person mask -> [size, size] distance from each pixel to the mask (0 inside),
    in 1/256 of the image height (so the silhouette weight does not depend on the resolution)."""
    import cv2

    m = cv2.resize(person.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
    return cv2.distanceTransform((m == 0).astype(np.uint8), cv2.DIST_L2, 3) * (256.0 / size)


def mask_distances(person, n: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """``person(t)`` -> [H, W] bool person mask of frame t (read one at a time, so a long
    clip's full-size masks are never all in memory): ([n, size, size] float16 distance maps,
    [n] bool the mask holds anyone)."""
    out = np.zeros((n, size, size), np.float16)
    found = np.zeros(n, bool)
    for t in range(n):
        m = person(t)
        found[t] = bool(m.any())
        out[t] = mask_distance(m, size)
    return out, found


def _initial_head(fit: "_Fitter", emb: LandmarkEmbedding, valid: np.ndarray, f0: float,
                  n_shape: int) -> tuple[np.ndarray, np.ndarray]:
    """A first guess of where the head is in each frame, from the landmarks' scale (the eye
    corners' distance) and centre: (uv [T, 2], the pixel the head origin projects to; depth [T])."""
    with torch.no_grad():
        neutral = fit.landmarks3d(FlameParams(shape=torch.zeros(1, n_shape, device=fit.dev)))[0]  # [L, 3]
    tgt = fit.target.cpu().numpy()
    idx = list(emb.landmark_indices.numpy())
    try:
        a, b = idx.index(33), idx.index(263)
        span_model = float((neutral[a] - neutral[b]).norm())
        span_img = np.linalg.norm(tgt[:, a] - tgt[:, b], axis=-1)
    except ValueError:  # embedding without eye corners: use the landmark spread
        span_model = float(neutral[:, :2].std(0).norm())
        span_img = np.linalg.norm(tgt.std(1), axis=-1)
    span_img = np.where(valid, span_img, np.nanmedian(span_img[valid]))
    depth = f0 * span_model / np.maximum(span_img, 1e-3)
    centre = np.where(valid[:, None], tgt.mean(1), np.nanmedian(tgt[valid].mean(1), axis=0))
    tx = (centre[:, 0] - fit.cx) * depth / f0
    ty = -(centre[:, 1] - fit.cy) * depth / f0
    nc = neutral.mean(0).cpu().numpy()
    trans0 = np.stack([tx - nc[0], ty - nc[1], -depth - nc[2]], 1)
    d0 = -trans0[:, 2]
    return np.stack([fit.cx + f0 * trans0[:, 0] / d0, fit.cy - f0 * trans0[:, 1] / d0], 1), d0


class _Unknowns:
    """What tracking solves for: one identity and focal length, and per frame the head's pose,
    expression, jaw, neck, eyes and eyelids. The translation is kept in image terms (where the
    head origin projects, in pixels, and depth over focal), so that changing the weakly
    observed focal length changes only the perspective, not the head's place or size."""

    def __init__(self, fit: "_Fitter", model: HeadModel, T: int, uv0: np.ndarray, d0: np.ndarray, f0: float,
                 fixed_focal: bool, opts: TrackOptions, height: int):
        dev = fit.dev
        z = lambda *s: torch.zeros(*s, device=dev).requires_grad_(True)  # noqa: E731
        self.fit, self.model = fit, model
        self.log_f = torch.tensor(math.log(f0), device=dev, requires_grad=not fixed_focal)
        self.f_prior = math.log(f0)
        self.fixed_focal = fixed_focal
        self.f_lo = math.log(height / (2 * math.tan(math.radians(opts.max_fov_deg) / 2)))
        self.f_hi = math.log(height / (2 * math.tan(math.radians(opts.min_fov_deg) / 2)))
        self.rot = z(T, 3)
        self.head_uv = torch.as_tensor(uv0, dtype=torch.float32, device=dev).clone().requires_grad_(True)
        self.log_s = torch.as_tensor(np.log(d0 / f0), dtype=torch.float32, device=dev).clone().requires_grad_(True)
        self.shape, self.expr, self.jaw = z(1, model.n_shape), z(T, model.n_expr), z(T, 3)
        self.neck, self.eyes, self.lids = z(T, 3), z(T, 6), z(T, 2)

    def focal_px(self) -> torch.Tensor:
        return self.log_f.clamp(self.f_lo, self.f_hi).exp()

    def focal_group(self) -> list[dict]:
        return [] if self.fixed_focal else [{"params": [self.log_f], "lr": 0.03}]

    def focal_prior(self, opts: TrackOptions) -> torch.Tensor:
        return opts.w_focal_prior * (self.log_f - self.f_prior) ** 2

    def translation(self, frames) -> torch.Tensor:
        s_, f_, uv = self.log_s[frames].exp(), self.focal_px(), self.head_uv[frames]
        return torch.stack([(uv[:, 0] - self.fit.cx) * s_, -(uv[:, 1] - self.fit.cy) * s_, -f_ * s_], -1)

    def params(self, frames, with_expr: bool = True) -> FlameParams:
        n = len(frames)
        e = lambda t: t[frames] if with_expr else None  # noqa: E731
        return FlameParams(shape=self.shape.expand(n, -1), expr=e(self.expr), jaw=e(self.jaw), neck=e(self.neck),
                           eyes=e(self.eyes), eyelids=e(self.lids) if self.model.eyelids is not None else None,
                           global_rot=self.rot[frames], translation=self.translation(frames))

    def smoothness(self) -> torch.Tensor:
        """Temporal smoothness of everything per frame (stage 3 on)."""
        return (0.2 * _smooth(self.expr) + _smooth(self.jaw) * 10 + _smooth(self.neck) * 10 + _smooth(self.eyes)
                + _smooth(self.lids) + _smooth(self.rot) * 10 + _smooth(self.head_uv) * 1e-3
                + _smooth(self.log_s[:, None]) * 100)

    def priors(self, opts: TrackOptions) -> torch.Tensor:
        """The pull of every per-frame parameter towards neutral (stage 3 on)."""
        sq = lambda t: (t**2).sum(-1).mean()  # noqa: E731
        return (opts.w_expr * sq(self.expr) + opts.w_jaw * sq(self.jaw) + opts.w_neck * sq(self.neck)
                + opts.w_eyes * sq(self.eyes) + opts.w_shape * (self.shape**2).sum() + opts.w_expr * sq(self.lids))


def _run(stage: str, iters: int, groups: list[dict], loss_fn, chunk_fn, frames: torch.Tensor, prog) -> None:
    """Adam on ``loss_fn()`` (the terms over all of the parameters) plus, where given, the sum
    over chunks of ``frames`` of ``chunk_fn(chunk)`` (each chunk's backward pass run before
    the next is computed: memory of :data:`CHUNK` frames)."""
    if iters <= 0:
        return
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters, eta_min=0.05 * groups[0]["lr"])
    chunks = torch.split(frames, CHUNK) if chunk_fn is not None else ()
    for i in range(iters):
        opt.zero_grad()
        for f in chunks:
            chunk_fn(f).backward()
        loss_fn().backward()
        opt.step()
        sched.step()
        if i % 10 == 0 or i == iters - 1:
            prog(stage, i + 1, iters)


def _keyframes(u: _Unknowns, valid: np.ndarray, k: int, dev) -> torch.Tensor:
    """Frames that fix the identity: spread evenly over the clip, and the most turned quarter."""
    vidx = np.flatnonzero(valid)
    k = min(k, len(vidx))
    pose_mag = u.rot.detach().norm(dim=-1).cpu().numpy()[vidx]
    even = vidx[np.linspace(0, len(vidx) - 1, max(k - k // 4, 1)).round().astype(int)]
    extreme = vidx[np.argsort(-pose_mag)[: k // 4]]
    return torch.as_tensor(np.unique(np.concatenate([even, extreme])), device=dev)


def _silhouette_term(u: _Unknowns, model: HeadModel, emb: LandmarkEmbedding, person_masks, valid: np.ndarray,
                     width: int, height: int, dev):
    """chunk -> the squared distance outside the person masks of the head's silhouette
    vertices, the chunk's share of the clip's term (masks read one frame at a time)."""
    T = len(valid)
    masks = person_masks if callable(person_masks) else (lambda t: person_masks[t])
    dist_maps, found = mask_distances(masks, T)
    dmap = torch.as_tensor(dist_maps, device=dev)[:, None]  # [T, 1, s, s] float16
    sil_v = VertexSubset.of(model, silhouette_vertices(model, emb).to(dev))
    has_mask = torch.as_tensor(found & valid, device=dev).float()
    n_mask = float(has_mask.sum().clamp_min(1))

    def term(frames):
        v = flame_forward(model, u.params(frames), vertex_ids=sil_v).vertices
        uv = u.fit.project(v, u.focal_px())
        grid = torch.stack([uv[..., 0] / width * 2 - 1, uv[..., 1] / height * 2 - 1], -1)[:, None]  # [B,1,V,2]
        d = torch.nn.functional.grid_sample(dmap[frames].float(), grid, mode="bilinear", padding_mode="border",
                                            align_corners=False)[:, 0, 0]  # [B, V], 1/256 of the height
        return ((d ** 2).mean(-1) * has_mask[frames]).sum() / n_mask

    return term


def fit_landmarks(lmk2d: np.ndarray, valid: np.ndarray, width: int, height: int, model: HeadModel,
                  emb: LandmarkEmbedding, opts: TrackOptions | None = None, progress: Progress | None = None,
                  device: str | torch.device = "cpu", focal: float | None = None, fps: float = 25.0,
                  person_masks=None) -> Track:
    """Fit FLAME parameters to a landmark track ``lmk2d`` [T, >=478, 2] (pixels); with
    ``person_masks`` (``person_masks(t)`` -> [H, W] bool, same pixels, or a [T, H, W] array),
    refine against them (stage 4).

    Stages: the focal length's search (:func:`_search_focal`), then 1 rigid (every frame's
    pose on the neutral head), 2 identity (on keyframes), 3 every frame's pose, expression,
    jaw, neck, eyes and eyelids, smooth in time, 4 the silhouette. The stages over every frame
    step on the whole clip's loss, but compute its landmark and silhouette terms
    :data:`CHUNK` frames at a time (gradients accumulated), so that memory does not grow
    with the clip; the result is the full-batch one."""
    opts = opts or TrackOptions()
    prog = progress or (lambda s, i, n: None)
    T = lmk2d.shape[0]
    valid = np.asarray(valid, bool) & np.isfinite(lmk2d[..., :2]).all(axis=(1, 2))
    if T == 0:
        raise TrackingError("no frames to track")
    if valid.mean() < 0.5:
        raise TrackingError(f"landmarks are missing in {100 * (1 - valid.mean()):.0f}% of frames; tracking needs a "
                            "face in most frames (re-run prepare on a clip where the face stays in view)")
    dev = torch.device(device)
    model = model.to(dev)
    fit = _Fitter(model, emb, lmk2d, valid, width, height, opts, dev)
    all_frames = torch.arange(T, device=dev)
    # the landmark error after a rigid + identity fit on a few frames is lowest near the true
    # focal (perspective shows as the head turns): search it on a grid, refine it below
    fixed_focal = focal is not None
    if focal is None and opts.focal_search:
        focal = _search_focal(lmk2d, valid, width, height, model, emb, opts, prog)
    f0 = focal if focal is not None else height / (2 * math.tan(math.radians(opts.init_fov_deg) / 2))
    uv0, d0 = _initial_head(fit, emb, valid, f0, model.n_shape)
    u = _Unknowns(fit, model, T, uv0, d0, f0, fixed_focal, opts, height)
    n_valid = float(valid.sum())

    def landmarks(frames, with_expr=True):  # a chunk's share of the clip's landmark term
        return fit.data_term(u.params(frames, with_expr), u.focal_px(), frames, n_valid)[0]

    # 1: rigid (the focal is not fitted on the neutral head)
    _run("rigid", opts.iters_rigid, [{"params": [u.rot], "lr": 0.02}, {"params": [u.head_uv], "lr": 0.5},
                                     {"params": [u.log_s], "lr": 0.005}],
         lambda: opts.w_smooth * (_smooth(u.rot) + 1e-4 * _smooth(u.head_uv) + 100 * _smooth(u.log_s[:, None]))
         + u.focal_prior(opts), lambda f: landmarks(f, with_expr=False), all_frames, prog)

    # 2: identity over keyframes
    keys = _keyframes(u, valid, opts.keyframes, dev)

    def loss_shape():
        d, _ = fit.data_term(u.params(keys), u.focal_px(), keys)
        sq = lambda t: (t[keys] ** 2).sum(-1).mean()  # noqa: E731
        reg = (opts.w_shape * (u.shape**2).sum() + opts.w_expr * sq(u.expr) + opts.w_jaw * sq(u.jaw)
               + opts.w_neck * sq(u.neck))
        return d + reg + u.focal_prior(opts)

    _run("identity", opts.iters_shape,
         [{"params": [u.shape], "lr": 0.05}, {"params": [u.expr, u.jaw], "lr": 0.02},
          {"params": [u.rot, u.neck], "lr": 0.005}, {"params": [u.head_uv], "lr": 0.2},
          {"params": [u.log_s], "lr": 0.002}] + u.focal_group(), loss_shape, None, all_frames, prog)

    # 3: all frames, everything per frame, smooth in time
    def loss_all():
        return u.priors(opts) + opts.w_smooth * u.smoothness()

    _run("expression", opts.iters_all,
         [{"params": [u.expr, u.lids], "lr": 0.03}, {"params": [u.jaw, u.eyes], "lr": 0.01},
          {"params": [u.rot, u.neck], "lr": 0.003}, {"params": [u.head_uv], "lr": 0.1},
          {"params": [u.log_s], "lr": 0.001}, {"params": [u.shape], "lr": 0.005}] + u.focal_group(),
         loss_all, landmarks, all_frames, prog)

    # 4: stage 3's terms plus the silhouette against the person masks
    if person_masks is not None and opts.iters_silhouette > 0:
        sil = _silhouette_term(u, model, emb, person_masks, valid, width, height, dev)
        _run("silhouette", opts.iters_silhouette,
             [{"params": [u.shape], "lr": 0.01}, {"params": [u.expr, u.jaw], "lr": 0.005},
              {"params": [u.rot, u.neck], "lr": 0.002}, {"params": [u.head_uv], "lr": 0.05},
              {"params": [u.log_s], "lr": 0.001}], loss_all,
             lambda f: landmarks(f) + opts.w_silhouette * sil(f), all_frames, prog)

    with torch.no_grad():
        dist = torch.cat([fit.data_term(u.params(f), u.focal_px(), f)[1] for f in torch.split(all_frames, CHUNK)])
        fval = float(u.focal_px())
    K = np.array([[fval, 0, fit.cx], [0, fval, fit.cy], [0, 0, 1]], np.float32)
    c = lambda t: t.detach().cpu().numpy().astype(np.float32)  # noqa: E731
    return Track(shape=c(u.shape[0]), expr=c(u.expr), jaw=c(u.jaw), neck=c(u.neck), eyes=c(u.eyes),
                 eyelids=c(u.lids), global_rot=c(u.rot), translation=c(u.translation(all_frames)), K=K,
                 viewmat=VIEWMAT.astype(np.float32), width=width, height=height, valid=valid,
                 residual_px=np.where(valid, c(dist), np.nan).astype(np.float32), model=model.reference(),
                 embedding_source=emb.source, fps=fps)


def _search_focal(lmk2d, valid, width, height, model, emb, opts: TrackOptions, prog) -> float:
    """The focal length is weakly observed (perspective shows only as the head turns) and
    gradient descent stalls along it; fit the keyframes from a few starting fields of view
    and keep the focal of the best fit."""
    from dataclasses import replace

    vidx = np.flatnonzero(valid)
    frames = vidx[np.linspace(0, len(vidx) - 1, min(opts.keyframes, len(vidx))).round().astype(int)]
    fits = []
    fovs = (opts.init_fov_deg, 18.0, 45.0)
    for i, fov in enumerate(fovs):
        sub = replace(opts, init_fov_deg=fov, focal_search=False, iters_all=200)
        tr = fit_landmarks(lmk2d[frames], valid[frames], width, height, model, emb, sub)
        fits.append((float(np.nanmean(tr.residual_px)), float(tr.K[0, 0])))
        prog("focal", i + 1, len(fovs))
    # another start wins only by a clear margin: when the head hardly turns, the error
    # does not tell focal lengths apart and the default field of view is the better guess
    best = fits[0]
    for err, f in fits[1:]:
        if err < best[0] * 0.99:
            best = (err, f)
    return best[1]


def head_rotation(track: Track) -> np.ndarray:
    """[T, 3, 3] world orientation of the head (global rotation then neck)."""
    g = axis_angle_to_matrix(torch.as_tensor(track.global_rot))
    n = axis_angle_to_matrix(torch.as_tensor(track.neck))
    return (g @ n).numpy()


def check_options(opts: TrackOptions, prefix: str = "") -> None:
    """:class:`InputError` naming the first option no track can be fitted with (its flag with
    ``prefix``, see :func:`gstalk.errors.check_ranges`)."""
    check_ranges(opts, {"n_shape": AT_LEAST_1, "n_expr": AT_LEAST_1, "keyframes": AT_LEAST_1,
                        **{k: AT_LEAST_0 for k in ("iters_rigid", "iters_shape", "iters_all", "iters_silhouette",
                                                   "w_silhouette", "w_focal_prior", "w_shape", "w_expr", "w_jaw",
                                                   "w_neck", "w_eyes", "w_smooth")},
                        "huber_px": ABOVE_0, "min_fov_deg": between(1, 150), "max_fov_deg": between(1, 150),
                        "init_fov_deg": between(opts.min_fov_deg, opts.max_fov_deg)}, prefix=prefix)


def check_inputs(opts: TrackOptions) -> None:
    """The head model (``--flame``) and landmark embedding (``--embedding``) files a track
    needs, read before any work (a :class:`gstalk.errors.GstalkError` naming the file): ``gstalk
    fit`` calls it before it prepares the clip."""
    load_embedding(load_head_model(opts.flame, n_shape=opts.n_shape, n_expr=opts.n_expr), opts.embedding)


def track_dataset(dataset_dir: str | Path, opts: TrackOptions | None = None, progress: Progress | None = None,
                  log: Callable[[str], None] = print) -> Path:
    """``gstalk track``: fit the dataset's landmarks, write ``track.npz`` and ``track_preview.mp4``."""
    from gstalk.config import resolve_device
    from gstalk.io.dataset import Dataset

    opts = opts or TrackOptions()
    check_options(opts)
    ds = Dataset(dataset_dir)
    dev = resolve_device(opts.device)
    model = load_head_model(opts.flame, n_shape=opts.n_shape, n_expr=opts.n_expr)
    emb = load_embedding(model, opts.embedding)
    lm = ds.landmarks()
    t0 = time.perf_counter()
    valid = lm["valid"].astype(bool)
    if (~valid).any():
        log(f"{int((~valid).sum())} frames have no landmarks: they are interpolated and flagged in the track")
    person = None
    if opts.iters_silhouette > 0 and ds.mask_path(0).is_file():
        person = lambda i: ds.mask(i) > 0  # noqa: E731  (labels: 0 = background; read one at a time)
    track = fit_landmarks(lm["lmk"], valid, ds.resolution, ds.resolution, model, emb, opts, progress, dev,
                          fps=ds.fps, person_masks=person)
    secs = time.perf_counter() - t0
    out = save_track(track, ds.root / "track.npz")
    log(f"tracked {track.num_frames} frames with {model.name} ({model.n_shape} shape, {model.n_expr} expression) "
        f"in {secs:.1f} s ({track.num_frames / secs:.1f} frames/s); median landmark error "
        f"{np.nanmedian(track.residual_px):.2f} px")
    if opts.preview:
        write_track_preview(ds, track, model, emb, ds.root / "track_preview.mp4")
    return out


def write_track_preview(ds, track: Track, model: HeadModel, emb: LandmarkEmbedding, path: Path) -> Path:
    """The fitted mesh (shaded), detected landmarks (green) and fitted ones (red) over the frames."""
    from gstalk.head.draw import draw_mesh, draw_points, project_points
    from gstalk.io.media import write_video

    lm = ds.landmarks()["lmk"]
    faces = model.faces.numpy()

    def frames():
        for s in range(0, track.num_frames, 64):
            sl = slice(s, min(s + 64, track.num_frames))
            with torch.no_grad():
                out = flame_forward(model, track.params(sl))
                verts = out.vertices.numpy()
                lmk3d = emb.points(out.vertices, model.faces).numpy()
            for j, k in enumerate(range(sl.start, sl.stop)):
                img = draw_mesh(ds.frame(k), verts[j], faces, track.K, track.viewmat, alpha=0.45)
                img = draw_points(img, lm[k][emb.landmark_indices.numpy(), :2], (0, 255, 0))
                uv, _ = project_points(lmk3d[j], track.K, track.viewmat)
                yield draw_points(img, uv, (255, 40, 40))

    return write_video(path, frames(), fps=track.fps)


__all__ = ["Track", "TrackingError", "fit_landmarks", "head_rotation", "load_track", "save_track", "track_dataset",
           "matrix_to_axis_angle"]
