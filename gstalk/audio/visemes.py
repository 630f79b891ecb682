"""Lip motion from the phones of any voice: a speaker-independent viseme model, calibrated to
the filmed person's own mouth.

A few seconds of one person cannot teach a network what mouth goes with what sound
(docs/benchmarks.md: the learned audio-to-motion model predicts unseen frames of an 8 s clip
no better than their mean). How the lips move for each class of speech sound is known
phonetics, though, and does not depend on the speaker: the lips close for p, b, m, the
lower lip meets the teeth for f, v, open vowels part them widest, rounded vowels (o, u, w)
narrow them and spread ones (ee, i) widen them, and the mouth takes each shape before the
sound is heard (coarticulation; visible speech leads the audio by tens to hundreds of
milliseconds). So, per video frame:

1. two lip channels from the decoded phones: **opening** and **spread** (table below),
   averaged over a Gaussian window ``BLUR_S`` wide centred ``LEAD_S`` after the frame;
2. given the mean and covariance, over the training frames, of the mouth's measured opening
   and width (face-mesh landmarks), so the lips move as far as the person's do (whitened
   against the clip's own phone channels, coloured with the lips' covariance);
3. mapped to the person's head-model jaw and expression by the way their jaw and
   expression change with the measured opening and width over the training frames: a
   linear regression with two inputs, which 8 s of video determine well (the visual
   relation holds frame by frame; only the audio-to-motion relation needs more data);
4. in the pauses between words the phones say nothing about the mouth, and people differ:
   some close it, some leave it parted or breathe through it. Where the training frames hold
   enough silence (``MIN_REST_FRAMES``), the mouth rests in silence where this person's
   rested in the clip's pauses (their mean measured lips in the pauses' cores), blended in by
   the same window's share of silence.

Only these calibrations come from the clip; no mapping from its audio is learned. Needs phone
features (``phoneme`` or ``mel+phoneme``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from gstalk.audio.features import AUDIO_FPS, VISEMES
from gstalk.errors import InputError
from gstalk.face.regions import mouth_opening, mouth_width

# lip opening, 0 (closed) .. 1 (widest), and spreading (+1) vs rounding (-1), per viseme class
OPENING = {"sil": 0.1, "PP": 0.0, "FF": 0.15, "TH": 0.3, "DD": 0.35, "kk": 0.45, "CH": 0.3, "SS": 0.2, "nn": 0.3,
           "RR": 0.35, "aa": 1.0, "E": 0.7, "ih": 0.45, "oh": 0.75, "ou": 0.35}
SPREAD = {"sil": 0.0, "PP": 0.0, "FF": 0.0, "TH": 0.2, "DD": 0.2, "kk": 0.1, "CH": -0.6, "SS": 0.4, "nn": 0.2,
          "RR": -0.4, "aa": 0.2, "E": 0.6, "ih": 0.8, "oh": -0.8, "ou": -1.0}
LEAD_S = 0.08  # the mouth shapes this long before the sound (centre of the averaging window)
BLUR_S = 0.06  # coarticulation: standard deviation of the averaging window
MAX_Z = 3.0  # new audio moves the lips at most this many training spreads from the mean
MIN_REST_FRAMES = 4.0  # frames' worth of silence in the training frames that calibrate the mouth at rest
CHANNELS = ("opening", "spread")
SIL = VISEMES.index("sil")


def viseme_columns(feature_kind: str, feature_dim: int) -> slice | None:
    """Where the viseme one-hots sit in a feature vector of ``feature_kind`` (they come last);
    None for features without phones."""
    if feature_kind in ("phoneme", "mel+phoneme") and feature_dim >= len(VISEMES):
        return slice(feature_dim - len(VISEMES), feature_dim)
    return None


def _kernel(window: int, lead: float, blur: float) -> np.ndarray:
    """Weights over a window's audio frames (offsets -window//2 .. window//2 - 1, 10 ms apart)."""
    t = (np.arange(window) - window // 2) / AUDIO_FPS
    k = np.exp(-0.5 * ((t - lead) / blur) ** 2)
    return (k / k.sum()).astype(np.float32)


class VisemeMotion(nn.Module):
    """Audio windows ``[T, W, D]`` -> jaw ``[T, 3]`` and expression ``[T, n_expr]`` through the
    viseme channels; :meth:`fit` calibrates it to a tracked clip."""

    def __init__(self, feature_kind: str, feature_dim: int, window: int, n_expr: int):
        super().__init__()
        self.cols = viseme_columns(feature_kind, feature_dim)  # None: no phones, the model cannot be used
        self.n_expr = n_expr
        table = torch.tensor([[OPENING[v], SPREAD[v]] for v in VISEMES], dtype=torch.float32)
        self.register_buffer("table", table)  # [15, 2]
        self.register_buffer("kernel", torch.from_numpy(_kernel(window, LEAD_S, BLUR_S)))  # [W]
        self.register_buffer("audio_mean", torch.zeros(2))
        self.register_buffer("whiten", torch.zeros(2, 2))  # audio channels -> uncorrelated, unit spread
        self.register_buffer("basis", torch.zeros(2, 3 + n_expr))  # whitened channels -> jaw and expression
        self.register_buffer("out_mean", torch.zeros(3 + n_expr))
        self.register_buffer("fitted", torch.zeros(()))
        self.register_buffer("rest_out", torch.zeros(3 + n_expr))  # jaw and expression in the clip's pauses
        self.register_buffer("rest_fitted", torch.zeros(()))  # 0: too little silence, pauses use the table

    @property
    def usable(self) -> bool:
        return self.cols is not None and bool(self.fitted)

    def _visemes(self, windows: Tensor) -> Tensor:
        """[T, W, D] -> [T, 15]: each viseme's share of the frame's lead-shifted window."""
        if self.cols is None:
            raise InputError("the viseme lip model needs phone features (phoneme or mel+phoneme)")
        if windows.dim() != 3 or windows.shape[1] != self.kernel.shape[0]:
            raise InputError(f"audio windows must be [T, {self.kernel.shape[0]}, D], got {tuple(windows.shape)}")
        return torch.einsum("twv,w->tv", windows[..., self.cols].float(), self.kernel)

    def channels(self, windows: Tensor) -> Tensor:
        """[T, W, D] -> [T, 2] lip opening and spread expected from the phones."""
        return self._visemes(windows) @ self.table

    def silence(self, windows: Tensor) -> Tensor:
        """[T, W, D] -> [T] the share of silence (0 .. 1) in each frame's window."""
        return self._visemes(windows)[:, SIL]

    @torch.no_grad()
    def fit(self, windows: Tensor, lips: np.ndarray, target: Tensor, frames: np.ndarray, ridge: float = 1e-2,
            driven: Tensor | np.ndarray | None = None) -> dict:
        """Calibrate on ``frames`` (training frames with landmarks): ``lips`` [T, 2] measured
        mouth opening and width, ``target`` [T, 3 + n_expr] tracked jaw and expression;
        ``driven`` [n_expr] bool: the expression coefficients the lips may move (the mouth's,
        :func:`gstalk.avatar.model.mouth_expressions`); the others stay at the clip's mean, so
        that a chance correlation in a short clip does not make the eyes or brows talk.

        The phones' channels are given the mean and covariance of the measured lips (so the
        lips move as far, and opening and width go together, as in the clip), and jaw and
        expression follow the measured lips by a ridge regression. Returns what it measured
        (for the log): per channel, the correlation of the phones' channel with the measured
        one on those frames, and how much of the jaw opening's variance the lips explain."""
        frames = np.asarray(frames)
        if len(frames) < 8:
            raise InputError(f"the viseme lip model needs at least 8 training frames with landmarks, got {len(frames)}")
        vis = self._visemes(windows[torch.as_tensor(frames, device=windows.device)])
        a = (vis @ self.table).cpu().double().numpy()
        sil = vis[:, SIL].cpu().double().numpy()
        lips = np.asarray(lips, np.float64)[frames]
        y = target[torch.as_tensor(frames, device=target.device)].cpu().double().numpy()
        l_mean, y_mean = lips.mean(0), y.mean(0)
        # jaw and expression from the measured lips (standardised, ridge), over every frame
        l_std = np.maximum(lips.std(0), 1e-6)
        z = (lips - l_mean) / l_std
        coef = np.linalg.solve(z.T @ z + ridge * len(z) * np.eye(2), z.T @ (y - y_mean)) / l_std[:, None]
        if driven is not None:
            coef[:, 3:][:, ~np.asarray(driven, bool)] = 0.0
        # whiten the channels the clip's speech moved, colour them with the lips' covariance
        # (over every frame: with the pauses in, the lips move as far as the person's do)
        a_mean = a.mean(0)
        live = a.std(0) >= 1e-3  # a channel the speech never moved cannot be calibrated
        whiten, colour = np.zeros((2, 2)), np.zeros((2, 2))
        if live.any():
            ix = np.flatnonzero(live)
            ca = np.cov(a[:, ix].T, bias=True).reshape(len(ix), len(ix))
            cl = np.cov(lips[:, ix].T, bias=True).reshape(len(ix), len(ix))
            eps = 1e-9 * np.eye(len(ix))
            whiten[np.ix_(ix, ix)] = np.linalg.inv(np.linalg.cholesky(ca + eps))  # z = W (a - mean)
            colour[np.ix_(ix, ix)] = np.linalg.cholesky(cl + eps)  # lips - mean = C z
        self.audio_mean.copy_(torch.from_numpy(a_mean))
        self.whiten.copy_(torch.from_numpy(whiten.T))
        self.basis.copy_(torch.from_numpy(colour.T @ coef))
        self.out_mean.copy_(torch.from_numpy(y_mean))
        # the mouth at rest: where it was in the clip's pauses, if they hold enough silence; the
        # weights (share of silence)^4 keep the pauses' cores, not their edges, where the mouth
        # is still moving into or out of a word
        rest = sil.sum() >= MIN_REST_FRAMES
        rest_lips = np.average(lips, 0, sil**4) if rest else l_mean
        self.rest_out.copy_(torch.from_numpy(y_mean + (rest_lips - l_mean) @ coef))
        self.rest_fitted.fill_(float(rest))
        self.fitted.fill_(1.0)
        resid = (y - y_mean) - (lips - l_mean) @ coef
        explained = 1 - resid.var(0) / np.maximum(y.var(0), 1e-12)
        corr = [float(np.corrcoef(a[:, c], lips[:, c])[0, 1]) if live[c] and lips[:, c].std() > 0 else 0.0
                for c in range(2)]
        return {"phones_vs_lips": dict(zip(CHANNELS, corr)), "jaw_open_explained": float(explained[0]),
                "silent_frames": float(sil.sum()),
                "rest_lips_z": ((rest_lips - l_mean) / l_std).tolist() if rest else None}

    def forward(self, windows: Tensor) -> tuple[Tensor, Tensor]:
        vis = self._visemes(windows)
        z = ((vis @ self.table - self.audio_mean) @ self.whiten).clamp(-MAX_Z, MAX_Z)
        y = self.out_mean + z @ self.basis
        if bool(self.rest_fitted):
            s = vis[:, SIL, None]
            y = (1 - s) * y + s * self.rest_out
        return y[:, :3], y[:, 3:]


def lip_measures(lmk: np.ndarray) -> np.ndarray:
    """[..., 2]: mouth opening and mouth width (both over the outer-eye-corner distance) from
    478-point face-mesh landmarks."""
    return np.stack([mouth_opening(lmk), mouth_width(lmk)], -1)
