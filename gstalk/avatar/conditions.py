"""What drives each frame of an avatar: conditions from new audio (through a lip model) or
from a tracked clip's expressions, the head motion that goes with them, the posed Gaussians
they give and the rendered frames. Shared by render, eval, export and the viewer.

Per frame: audio features -> the audio code for the deformation field (encoder + smoother),
jaw and expression from the avatar's lip model (the viseme model of
:mod:`gstalk.audio.visemes`, or the learned audio-to-motion network) and blink (the network)
-> head-model parameters with a head pose from the training clip (played back and forth) or
its median -> bound Gaussians + deformation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from gstalk.audio.features import AudioFeatures, check_speech, compute_features
from gstalk.audio.phones import phone_timeline
from gstalk.avatar.cameras import pingpong
from gstalk.avatar.model import Avatar, Frame
from gstalk.avatar.render import HostFrames, render_frames
from gstalk.avatar.views import at_training_centre
from gstalk.errors import InputError
from gstalk.gaussians.set import GaussianTensors
from gstalk.head.lbs import FlameParams
from gstalk.io.media import check_fps
from gstalk.io.video import load_audio
from gstalk.render import Cameras


def head_motion(motion: dict, n: int, mode: str) -> dict[str, np.ndarray]:
    """Head pose per frame: 'track' (training motion, back and forth), 'still' (its median)."""
    keys = ("global_rot", "neck", "translation", "eyes")
    if mode == "track":
        idx = pingpong(len(motion["global_rot"]), n)
        return {k: motion[k][idx] for k in keys}
    if mode == "still":
        return {k: np.repeat(np.median(motion[k], axis=0, keepdims=True), n, 0) for k in keys}
    raise InputError(f"unknown head motion {mode!r}: track or still")


LIP_MODELS = ("visemes", "learned")


def lip_model(av: Avatar, lips: str | None = None) -> str:
    """The lip model new audio goes through: ``lips`` if given, else the avatar's own."""
    if av.cfg.lip_motion == "none":
        raise InputError("this avatar was fitted without audio (its clip had no speech), so speech cannot drive it; "
                         "drive it with --expressions track.npz (from 'gstalk track' on a clip)")
    lips = lips or av.cfg.lip_motion
    if lips not in LIP_MODELS:
        raise InputError(f"unknown lip model {lips!r}: choose {' or '.join(LIP_MODELS)}")
    if lips == "visemes" and not av.visemes.usable:
        raise InputError("this avatar has no calibrated viseme lip model (it was fitted before avatar format 7, or "
                         "its clip had too few frames with landmarks); use --lips learned or re-fit it")
    return lips


def audio_features(av: Avatar, audio: np.ndarray, n: int, fps: float,
                   log: Callable[[str], None] | None = None) -> AudioFeatures:
    """The avatar's audio features for ``n`` frames of ``audio``, with its phone timeline where
    the viseme lip model needs one; what the phone decoding had to say (no speech, not
    English) goes to ``log``."""
    feats = compute_features(audio, n, fps, av.cfg.feature_kind, av.cfg.window, av.cfg.phones)
    if feats.timeline is None and av.visemes.usable:
        feats.timeline = phone_timeline(np.asarray(audio, np.float32), source=av.cfg.phones)
    if log is not None and feats.timeline is not None:
        for note in feats.timeline.notes:
            log(note)
    return feats


def audio_drive(av: Avatar, feats: AudioFeatures, fill: np.ndarray | None = None):
    """From audio features: the codes for the deformation, {lip model: (jaw, expression padded
    to the head model's with ``fill``)} for every lip model the avatar has, and blink (the
    audio-to-motion network's)."""
    windows = torch.from_numpy(feats.windows).to(av.means.device)
    with torch.no_grad():
        codes = av.audio(windows)
        jaw, expr, blink = av.a2m(windows)
        lips = {"learned": (jaw, head_expr(av, expr, fill))}
        if av.visemes.usable and feats.timeline is not None:
            vjaw, vexpr = av.visemes(feats.timeline, windows.shape[0], feats.fps)
            lips["visemes"] = (vjaw, head_expr(av, vexpr, fill))
    return codes, lips, blink


def audio_conditions(av: Avatar, audio: np.ndarray, n: int, fps: float, lips: str | None = None,
                     fill: np.ndarray | None = None, log: Callable[[str], None] | None = None):
    """Audio codes for the deformation, jaw and expression from the avatar's lip model (or
    ``lips``: 'visemes' or 'learned'; expression padded with ``fill``) and blink from the
    audio-to-motion network."""
    lips = lip_model(av, lips)
    codes, motions, blink = audio_drive(av, audio_features(av, audio, n, fps, log), fill)
    jaw, expr = motions[lips]
    return codes, jaw, expr, blink


def head_expr(av: Avatar, expr: torch.Tensor, fill: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
    """Expression coefficients [n, E'] cut or padded to the head model's E: with zeros, or
    with ``fill`` [>= E] (the clip's mean expression, :func:`rest_expr`: coefficients a lip
    model does not predict keep the person's usual face, not the head model's neutral one)."""
    E = av.head_model.n_expr
    if expr.shape[1] >= E:
        return expr[:, :E]
    out = torch.zeros(expr.shape[0], E, dtype=expr.dtype, device=expr.device)
    if fill is not None:
        out[:] = torch.as_tensor(np.asarray(fill)[:E], dtype=expr.dtype, device=expr.device)
    out[:, :expr.shape[1]] = expr
    return out


def rest_expr(motion: dict) -> np.ndarray:
    """The training clip's mean expression coefficients."""
    return np.asarray(motion["expr"], np.float32).mean(0)


@dataclass
class Conditions:
    """What drives each of n frames: head-model parameters, audio codes and blink."""

    params: FlameParams
    codes: torch.Tensor  # [n, code_dim]
    blink: torch.Tensor  # [n]
    fps: float

    @property
    def num_frames(self) -> int:
        return self.codes.shape[0]

    def slice(self, sl: slice) -> "Conditions":
        p = FlameParams(**{k: (None if v is None else v[sl]) for k, v in self.params.__dict__.items()})
        return Conditions(p, self.codes[sl], self.blink[sl], self.fps)


def conditions_for(av: Avatar, motion: dict, n: int, fps: float, audio: np.ndarray | None = None,
                   expressions: dict | None = None, head: str = "track", lips: str | None = None,
                   log: Callable[[str], None] | None = None) -> Conditions:
    """Per-frame conditions from new audio (through the lip model ``lips``, default the
    avatar's, and the audio-to-motion network's blink), or from tracked expressions
    (``expressions`` with jaw, expr, optional blink and, with ``use_pose``, the head pose)."""
    dev = av.means.device
    hm = head_motion(motion, n, head)
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32, device=dev)  # noqa: E731
    if expressions is not None:
        jaw, expr = t(expressions["jaw"][:n]), t(expressions["expr"][:n])
        blink = t(expressions.get("blink", np.zeros(n))[:n])
        codes = torch.zeros(n, av.cfg.code_dim, device=dev)
        if expressions.get("use_pose"):
            hm = {k: expressions[k][:n] for k in ("global_rot", "neck", "translation", "eyes")}
        expr = head_expr(av, expr)
    elif audio is not None:
        codes, jaw, expr, blink = audio_conditions(av, audio, n, fps, lips, rest_expr(motion), log)
    else:
        raise InputError("no driving signal: give audio or tracked expressions")
    p = FlameParams(expr=expr, jaw=jaw, global_rot=t(hm["global_rot"]), neck=t(hm["neck"]),
                    eyes=t(hm["eyes"]), translation=t(hm["translation"]))
    return Conditions(p, codes, blink, fps)


def training_expressions(motion: dict) -> dict:
    """The training clip's own tracked motion as a driving sequence (pose included)."""
    return {**{k: motion[k] for k in ("jaw", "expr", "global_rot", "neck", "translation", "eyes")},
            "use_pose": True}


def posed_batches(av: Avatar, cond: Conditions, deform: bool = True, batch: int = 8) -> Iterator[GaussianTensors]:
    """The posed (and deformed) Gaussians of ``batch`` frames at a time, frames first
    (:meth:`Avatar.posed_batch`; the last batch may be shorter)."""
    with torch.no_grad():
        for s in range(0, cond.num_frames, batch):
            c = cond.slice(slice(s, min(s + batch, cond.num_frames)))
            yield av.posed_batch(Frame(c.params, audio=c.codes, blink=c.blink, deform=deform))[0]


def posed_iter(av: Avatar, cond: Conditions, deform: bool = True, batch: int = 8) -> Iterator[GaussianTensors]:
    """The posed (and deformed) Gaussians of each frame, one at a time."""
    for g in posed_batches(av, cond, deform, batch):
        for b in range(g.means.shape[0]):
            yield GaussianTensors(*(t[b] for t in g))


def plate_background(av: Avatar, motion: dict, size: int) -> torch.Tensor | None:
    """The avatar's background plate [size, size, 3] in [0, 1] on its device, where it
    composites over one (background mode 'plate'); else None."""
    if av.cfg.background != "plate" or "background" not in motion:
        return None
    import cv2

    bg = torch.from_numpy(cv2.resize(motion["background"], (size, size), interpolation=cv2.INTER_AREA))
    return bg.float().div(255).to(av.means.device)


def frames_iter(av: Avatar, motion: dict, n: int, fps: float, cams: Cameras, audio: np.ndarray | None = None,
                expressions: dict | None = None, head: str = "track", deform: bool = True,
                background: torch.Tensor | None = None, batch: int = 8, lips: str | None = None,
                log: Callable[[str], None] | None = None, uint8: bool = False) -> Iterator:
    """Rendered RGB frames [S, S, 3], one at a time; posed and rasterized ``batch`` frames at
    a time (on a GPU, one gsplat launch per batch). Float tensors on the avatar's device, or
    with ``uint8`` uint8 arrays on the host, each batch converted on the device and copied
    once (:class:`HostFrames`; a consumer may keep the frames of the last few batches)."""
    dev = av.means.device
    cond = conditions_for(av, motion, n, fps, audio, expressions, head, lips, log)
    size = cams.width
    bg = background if background is not None else torch.ones(size, size, 3, device=dev)
    host = HostFrames() if uint8 else None
    cams = cams.to(dev)  # once, and checked once: the batches take slices
    at_train = at_training_centre(av, cams)
    s = 0
    for g in posed_batches(av, cond, deform, batch):
        nb = g.means.shape[0]
        with torch.no_grad():
            rgb = render_frames(av, g, cams[s:s + nb], bg, at_train)
            yield from (host(rgb) if host is not None else rgb)
        s += nb


def load_driver(audio_path: str | Path | None, expressions_path: str | Path | None, fps: float,
                required: bool = True) -> tuple[np.ndarray | None, dict | None, int, float]:
    """(audio, expressions, frame count, fps) from --audio or --expressions."""
    check_fps(fps)
    if expressions_path is not None and audio_path is not None:
        raise InputError("give --audio (speech moves the lips) or --expressions (a tracked clip's motion moves "
                         "the face), not both")
    if expressions_path is not None:
        from gstalk.head.tracker import load_track

        tr = load_track(expressions_path)
        return None, {"jaw": tr.jaw, "expr": tr.expr, "blink": np.zeros(tr.num_frames)}, tr.num_frames, tr.fps
    if audio_path is not None:
        audio = load_audio(audio_path)
        check_speech(audio, str(audio_path))
        return audio, None, max(1, int(round(len(audio) / 16000 * fps))), fps
    if required:
        raise InputError("give --audio speech.wav (or --expressions track.npz) to drive the avatar")
    return None, None, 0, fps
