"""``gstalk export AVATAR --format web --audio speech.wav --out player/``: a static folder that
plays the talking avatar in a browser (three.js and Spark; no Python, no network, no CDN).

What the folder holds (docs/export.md, "Web player"):

- ``index.html`` and ``player.js``: the player, copied from the project's ``viewer/``;
- ``lib/``: three.js, its orbit controls, VR button and the one add-on Spark imports, and Spark
  itself, copied from ``viewer/node_modules`` (``npm ci`` in ``viewer/`` installs them, at the
  versions its package-lock pins);
- ``avatar.json`` + ``avatar.bin``: the Gaussians of every frame and what the player needs to
  draw them as gstalk draws them (colours, the tracked camera, the view fill and ray cut);
- ``audio.wav``: the speech (when the motion comes from audio).

How the motion is stored (way (b) of the issue, per-frame Gaussians, compressed): the posed
Gaussians of every frame (centres, rotations, log-scales, opacities; the head posed on its
mesh and moved by the deformation field, exactly as ``gstalk render`` poses them) are split
into those that never move (stored once) and those that do. For each attribute of the moving
ones, the frames are a mean plus a few principal components (the fewest, at most
``MAX_COMPONENTS``, whose error on every value stays within the attribute's tolerance at
the 99.9th percentile; all tolerances loosened alike where the components would take more
than ``BUDGET_MB``): the components as int16 rows, their per-frame weights as float32.
The size hardly grows with the length of the audio (``components x moving values x 2``
bytes, plus ``frames x components x 4``); the player rebuilds a frame with
``components x moving values`` multiply-adds in JavaScript.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from gstalk.errors import GstalkError, InputError
from gstalk.gaussians.set import GaussianTensors
from gstalk.io.atomic import ensure_dir, write_bytes, write_json

WEB_FORMAT = "gstalk-web-player"
WEB_VERSION = 1
#: At most this many principal components per attribute.
MAX_COMPONENTS = 64
#: How far a rebuilt value may be from the posed one (the 99.9th percentile of the error over
#: every value of every frame): metres, quaternion units, log-scale units, opacity.
TOLERANCE = {"means": 2e-4, "quats": 4e-3, "log_scales": 4e-3, "opacities": 4e-3}
#: The motion's components (int16 rows and float32 weights) take at most this many MB: with the
#: libraries (3.4 MB) and 10 s of audio (0.3 MB), a 10 s clip's folder stays under 20 MB.
BUDGET_MB = 14.0
#: Values that move less than this over the frames (their standard deviation) are stored once.
STILL = {"means": 2e-5, "quats": 2e-4, "log_scales": 2e-4, "opacities": 2e-4}
#: The player's files, from viewer/ (source) and its node_modules (the libraries).
PLAYER_FILES = ("index.html", "player.js")
LIBS = {
    "three.module.min.js": "three/build/three.module.min.js",
    "three.core.min.js": "three/build/three.core.min.js",
    "addons/controls/OrbitControls.js": "three/examples/jsm/controls/OrbitControls.js",
    "addons/webxr/VRButton.js": "three/examples/jsm/webxr/VRButton.js",
    "addons/postprocessing/Pass.js": "three/examples/jsm/postprocessing/Pass.js",  # Spark imports it
    "spark.module.min.js": "@sparkjsdev/spark/dist/spark.module.min.js",
}


def viewer_folder() -> Path:
    """The web player's source folder with its libraries installed: $GSTALK_VIEWER, else the
    ``viewer/`` beside the gstalk package (a checkout); a GstalkError says how to get them."""
    env = os.environ.get("GSTALK_VIEWER")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "viewer"
    missing = [f for f in PLAYER_FILES if not (root / f).is_file()]
    if missing:
        raise InputError(f"the web player's source is not at {root} (no {', '.join(missing)}): export --format web "
                         "needs a gstalk checkout's viewer/ folder, or GSTALK_VIEWER set to one")
    libs = [src for src in LIBS.values() if not (root / "node_modules" / src).is_file()]
    if libs:
        raise InputError(f"the web player's libraries are not installed in {root / 'node_modules'} (no "
                         f"{libs[0]}): run 'npm ci' in {root} (./run.sh does it where npm is installed)")
    return root


@dataclass
class Compressed:
    """One attribute's frames [T, N, C] as: ``still`` values for every Gaussian (the mean over
    frames), the Gaussians that move (``moving``), and for their values a mean, int16 component
    rows [K, M*C] and per-frame weights [T, K] (the int16 scale folded in)."""

    mean: np.ndarray
    moving: np.ndarray
    moving_mean: np.ndarray
    rows: np.ndarray
    weights: np.ndarray
    error: float  # the 99.9th percentile of |rebuilt - posed| over the moving values


class Components:
    """The principal components of one attribute's frames ``x`` [T, N, C] over the Gaussians
    that move (standard deviation over the frames above ``still``), and the rebuilding error
    (99.9th percentile of |rebuilt - posed| over a sample of the moving values) with each
    number of components from 0 to ``max_k``."""

    def __init__(self, x: np.ndarray, still: float, max_k: int = MAX_COMPONENTS):
        T, N, C = x.shape
        self.T, self.C = T, C
        self.mean = x.mean(0).astype(np.float32)
        self.moving = np.flatnonzero(x.std(0).max(-1) > still).astype(np.int32) if T > 1 else np.zeros(0, np.int32)
        if len(self.moving) == 0:
            self.mu, self.basis, self.coef = np.zeros(0, np.float32), np.zeros((0, 0)), np.zeros((T, 0))
            self.errors = [0.0]
            return
        xm = x[:, self.moving].reshape(T, -1).astype(np.float32)
        self.mu = xm.mean(0, dtype=np.float64).astype(np.float32)
        xc = xm - self.mu
        del xm
        # the T x T Gram matrix: the frames are far fewer than the values
        gram = (xc @ xc.T).astype(np.float64)
        evals, evecs = np.linalg.eigh(gram)
        order = np.argsort(evals)[::-1]
        evals, evecs = np.clip(evals[order], 0, None), evecs[:, order]
        kmax = int(min(max_k, T - 1, (evals > evals[0] * 1e-14).sum())) if evals[0] > 0 else 0
        sv = np.sqrt(evals[:kmax])
        self.basis = (evecs[:, :kmax].T @ xc.astype(np.float64)) / sv[:, None]  # [K, D] orthonormal rows
        self.coef = evecs[:, :kmax] * sv[None]  # [T, K]
        n = min(xc.size, 2_000_000)
        pick = np.random.default_rng(0).choice(xc.size, n, replace=False)
        t, d = np.divmod(pick, xc.shape[1])
        res = xc.ravel()[pick].astype(np.float64)
        self.errors = [float(np.quantile(np.abs(res), 0.999))]
        for k in range(kmax):  # the error left after each further component, on the sample
            res -= self.coef[t, k] * self.basis[k, d]
            self.errors.append(float(np.quantile(np.abs(res), 0.999)))
        self._sample = (t, d, xc.ravel()[pick].astype(np.float64))

    def fewest(self, tol: float) -> int:
        """The fewest components whose error is within ``tol`` (all of them if none is)."""
        return next((k for k, e in enumerate(self.errors) if e <= tol), len(self.errors) - 1)

    def nbytes(self, k: int) -> int:
        """What ``k`` components take in the file (rows, weights; the fixed arrays aside)."""
        return k * (len(self.moving) * self.C * 2 + self.T * 4)

    def take(self, k: int) -> "Compressed":
        """The first ``k`` components, int16 rows with the scale folded into the weights."""
        if len(self.moving) == 0 or k == 0:
            return Compressed(self.mean, self.moving, self.mu, np.zeros((0, len(self.mu)), np.int16),
                              np.zeros((self.T, 0), np.float32), self.errors[0])
        scale = np.abs(self.basis[:k]).max(1) / 32767.0
        scale = np.where(scale > 0, scale, 1.0)
        rows = np.round(self.basis[:k] / scale[:, None]).astype(np.int16)
        weights = (self.coef[:, :k] * scale[None]).astype(np.float32)
        t, d, xc = self._sample
        rebuilt = (weights[t].astype(np.float64) * rows[:, d].T.astype(np.float64)).sum(1)
        err = float(np.quantile(np.abs(rebuilt - xc), 0.999))
        return Compressed(self.mean, self.moving, self.mu, rows, weights, err)


def choose_components(parts: dict[str, "Components"], budget: int) -> tuple[dict[str, int], float]:
    """Components per attribute, and the factor their tolerances were loosened by: the fewest
    within each one's tolerance (:data:`TOLERANCE`) or, where those take more than ``budget``
    bytes, within tolerances loosened alike (by factors of 1.25) until they fit."""
    loosen = 1.0
    while True:
        ks = {name: c.fewest(TOLERANCE[name] * loosen) for name, c in parts.items()}
        if sum(c.nbytes(ks[name]) for name, c in parts.items()) <= budget or not any(ks.values()):
            return ks, loosen
        loosen *= 1.25


def rebuild(c: Compressed, t: int) -> np.ndarray:
    """Frame ``t`` [N, C] as the player rebuilds it (its reference in the tests)."""
    out = c.mean.copy()
    if len(c.moving):
        v = c.moving_mean + c.weights[t].astype(np.float64) @ c.rows.astype(np.float64)
        out[c.moving] = v.reshape(len(c.moving), -1)
    return out


class _Blob:
    """The binary file: arrays laid end to end, each at an offset aligned to 4 bytes."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, a: np.ndarray, dtype) -> dict:
        b = np.ascontiguousarray(a, dtype=dtype).tobytes()
        entry = {"offset": self.size, "dtype": np.dtype(dtype).name, "shape": list(np.shape(a))}
        pad = (-len(b)) % 4
        self.parts.append(b + b"\0" * pad)
        self.size += len(b) + pad
        return entry


def _aligned_quats(q: np.ndarray) -> np.ndarray:
    """Unit quaternions [T, N, 4], each Gaussian's on the same side as its first frame's (q and
    -q are one rotation; the components must not jump between them)."""
    q = q / np.linalg.norm(q, axis=-1, keepdims=True).clip(1e-12)
    s = np.sign((q * q[:1]).sum(-1, keepdims=True))
    return q * np.where(s == 0, 1.0, s)


def player_data(av, batches: Iterable[GaussianTensors], offset: torch.Tensor, fps: float, size: int,
                progress: Callable[[int], None] | None = None,
                budget_mb: float = BUDGET_MB) -> tuple[dict, bytes]:
    """The manifest and binary file of the player for posed frames, given in ``batches``
    (frames first, as :func:`gstalk.avatar.conditions.posed_batches` yields them; gstalk's
    world, y up, which is three.js's), shifted by ``-offset`` (the head's centre at the origin);
    the motion's components take at most about ``budget_mb`` MB (:func:`choose_components`)."""
    from gstalk.avatar.views import FILL_ANGLES, FILL_OPACITY, other_view

    off = offset.detach().cpu().double().numpy()
    m, q, ls, op, rgb, done = [], [], [], [], 0.0, 0
    with torch.no_grad():
        for g in batches:  # one copy to the host per attribute and batch
            m.append(g.means.float().cpu().numpy())
            q.append(g.quats.float().cpu().numpy())
            ls.append(g.scales.float().clamp_min(1e-12).log().cpu().numpy())
            op.append(g.opacities.float().cpu().numpy())
            # the colours the training camera saw (SH evaluated from its centre), over the frames
            rgb = rgb + other_view(av, g).colors.clamp(0, 1).double().sum(0).cpu().numpy()
            done += g.means.shape[0]
            if progress:
                progress(done)
    if not done:
        raise InputError("no frames to export for the web player")
    means, quats = np.concatenate(m) - off.astype(np.float32), _aligned_quats(np.concatenate(q))
    T, N = means.shape[:2]
    log_scales, opac, rgb = np.concatenate(ls), np.concatenate(op)[..., None], rgb / done
    del m, q, ls, op
    blob = _Blob()
    attrs = {}
    parts = {name: Components(x, STILL[name]) for name, x in
             (("means", means), ("quats", quats), ("log_scales", log_scales), ("opacities", opac))}
    del means, quats, log_scales, opac
    ks, loosened = choose_components(parts, int(budget_mb * 1e6))
    for name, part in parts.items():
        c = part.take(ks[name])
        attrs[name] = {"still": blob.add(c.mean, np.float32), "moving": blob.add(c.moving, np.int32),
                       "moving_mean": blob.add(c.moving_mean, np.float32), "rows": blob.add(c.rows, np.int16),
                       "weights": blob.add(c.weights, np.float32), "components": int(c.rows.shape[0]),
                       "error": c.error}
    K = av.K.detach().cpu().double().numpy().copy()
    K[:2] *= size / float(av.cfg.resolution)
    vm = av.viewmat.detach().cpu().double().numpy()
    c2w = np.linalg.inv(vm)
    c2w[:3, 3] -= off
    views = {"fill_angles": list(FILL_ANGLES), "fill_opacity": FILL_OPACITY,
             "view_centre": (av.view_centre.detach().cpu().double().numpy() - off).tolist(),
             "training_centre": c2w[:3, 3].tolist()}

    def per_gaussian3(v: torch.Tensor) -> np.ndarray:  # [n] or [n, 1] or [n, 3] -> [n, 3]
        v = v.detach().cpu().float().numpy()
        return np.broadcast_to(v.reshape(len(v), -1), (len(v), 3))

    if av.view_fill is not None:
        views["fill"] = blob.add(av.view_fill.cpu().numpy(), np.int32)
        views["fill_rgb"] = blob.add(av.view_fill_rgb.detach().cpu().clamp(0, 1).numpy(), np.float32)
        views["fill_scale"] = blob.add(per_gaussian3(av.view_fill_scale), np.float32)
    if av.ray_cut is not None:
        views["cut"] = blob.add(av.ray_cut.cpu().numpy(), np.int32)
        views["cut_scale"] = blob.add(per_gaussian3(av.ray_cut_scale), np.float32)
    manifest = {
        "format": WEB_FORMAT, "version": WEB_VERSION, "fps": fps, "num_frames": T,
        "gaussians": N, "tolerance_factor": loosened, "axes": "rub", "origin": "head", "offset": off.tolist(),
        "colors": blob.add(rgb, np.float32), "attributes": attrs, "views": views,
        # the tracked camera: camera-to-world in OpenCV axes (x right, y down, z forward) and
        # its intrinsics in pixels at a size x size picture
        "camera": {"camera_to_world": c2w.tolist(), "K": K.tolist(), "size": size},
    }
    return manifest, b"".join(blob.parts)


def write_player(out: Path, manifest: dict, data: bytes, wav: Path | None, seconds: float,
                 plate: np.ndarray | None = None) -> list[Path]:
    """The player folder: its code and libraries, ``avatar.json``/``avatar.bin``, the audio
    (``wav``, already written into ``out`` by the exporter) and the background plate (``plate``,
    uint8 [S, S, 3], the tracked camera's background)."""
    from gstalk.io.dataset import write_image_file

    root = viewer_folder()
    out = ensure_dir(out)
    files = []
    for f in PLAYER_FILES:
        files.append(write_bytes(out / f, (root / f).read_bytes()))
    for dst, src in LIBS.items():
        p = out / "lib" / dst
        ensure_dir(p.parent)
        try:
            lib = (root / "node_modules" / src).read_bytes()
        except OSError as e:
            raise GstalkError(f"cannot read the web player's library {src}: {e.strerror or e}") from None
        files.append(write_bytes(p, lib))
    if wav is not None:
        files.append(wav)
    elif (out / "audio.wav").exists():  # a re-export without audio must not play a stale one
        (out / "audio.wav").unlink()
    if plate is not None:
        files.append(write_image_file(out / "background.png", plate))
    elif (out / "background.png").exists():
        (out / "background.png").unlink()
    manifest = dict(manifest, audio=wav.name if wav else None, seconds=seconds,
                    background="background.png" if plate is not None else None,
                    binary="avatar.bin", binary_bytes=len(data))
    files.append(write_bytes(out / "avatar.bin", data))
    files.append(write_json(out / "avatar.json", manifest))  # last: the folder is whole once it is there
    return files


def export_web(av, motion: dict, batches: Iterable[GaussianTensors], offset: torch.Tensor, fps: float, n: int,
               wav: Path | None, out: Path, progress=None) -> tuple[list[Path], str]:
    """``gstalk export --format web``: the player folder for the posed frames in ``batches``
    (``n`` of them) and the speech ``wav``; its files and a line saying how the motion was stored."""
    manifest, data = player_data(av, batches, offset, fps, av.cfg.resolution,
                                 (lambda k: progress("web frames", k, n)) if progress else None)
    plate = motion.get("background") if av.cfg.background == "plate" else None
    files = write_player(out, manifest, data, wav, n / fps, plate)
    comps = ", ".join(f"{k} {a['components']}" for k, a in manifest["attributes"].items())
    loosened = manifest["tolerance_factor"]
    return files, f"web player: components {comps}" + (
        f"; tolerances loosened {loosened:.3g}x to keep the motion within {BUDGET_MB:g} MB" if loosened > 1 else "")


__all__ = ["BUDGET_MB", "LIBS", "MAX_COMPONENTS", "WEB_FORMAT", "Components", "Compressed", "choose_components",
           "export_web", "player_data", "rebuild",
           "viewer_folder", "write_player"]
