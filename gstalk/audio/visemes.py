"""Lip motion from the phones of any voice: each viseme class takes the filmed person's own
mouth shape, blended across neighbouring phones (coarticulation) and timed to this clip.

A few seconds of one person cannot teach a network what mouth goes with what sound
(docs/benchmarks.md: the learned audio-to-motion network predicts unseen frames of an 8 s clip
no better than their mean). Phone timings can be had from any voice, though
(:mod:`gstalk.audio.phones`: recognised words, force-aligned), and how the mouth moves
through a sequence of phones is known phonetics:

1. **Classes.** Each phone belongs to one of 15 viseme classes (:data:`VISEMES`); the gaps
   between words are the class ``sil``, and the end of a pause just before speech the class
   ``pre`` (many people open the mouth, or breathe in through it, before they speak), the
   start of a pause just after speech the class ``post`` (the mouth lingers, or shuts);
   how long each lasts, if at all, is calibrated per clip (:data:`PRE_WINDOWS`,
   :data:`POST_WINDOWS`).
2. **Coarticulation** (Cohen and Massaro's dominance model). Every phone segment pulls the
   mouth towards its class's target with a *dominance* that is full inside the segment and
   falls off exponentially outside it, ``strength * exp(-distance / falloff)``, centred
   ``lead`` before the sound (the mouth takes a shape before it is heard). The mouth of a
   frame is the dominance-weighted mean of the targets of the phones around it. Per class
   (:data:`DOMINANCE`): the lips must close for p/b/m and meet the teeth for f/v (strong,
   brief), rounding (o, u, w) is anticipated furthest, and tongue consonants (t, d, k, n, s)
   leave the lips to their neighbours (weak).
3. **Targets: the person's own mouth.** The targets (jaw and expression per class) are
   fitted to the training frames' tracked jaw and expression by a ridge regression on the
   dominance weights: a class the clip holds many frames of gets this person's mouth for it,
   one it lacks keeps a target from the phonetic table (:data:`OPENING`, :data:`SPREAD`,
   mapped to this person's jaw and expression through their measured lips). The pause
   classes (``sil``, ``pre``, ``post``) start from the *rest mouth* instead, and count each
   pause as one shape, not as its many frames (:func:`pause_pull`): a clip with two pauses,
   one shut and one open for a breath, leaves them near the rest; one with many alike gives
   them this person's pause.
   The rest mouth (:func:`rest_mouth`) is the jaw and expression whose lip points are
   nearest the training frames' in the sum of distances, not the mean: a laugh or a held
   smile in a few seconds of clip does not drag it, and the lip-sync error is a distance.
4. **Timing and amplitude**, calibrated per clip on held-back blocks of its training frames
   (targets fitted on the other blocks): the audio-to-mouth lag within :data:`LAGS`, and the
   factor (0 to 1) by which the mouth moves from its rest, the pair whose predictions
   put the head model's lip points nearest the tracked ones (the errors in jaw and expression
   weighted by how far each moves the lips: the lip-sync error, not the jaw alone). Where a
   clip's phones predict its mouth well the lips move as far as the fitted targets say; where
   they predict it poorly, less (wrong lips far from the mean cost more than a mouth near it).

Expression coefficients that do not move the lips (``driven`` False) stay at the rest,
so that a chance correlation in a short clip does not make the eyes or brows talk.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from gstalk.audio.phones import PhoneTimeline
from gstalk.errors import InputError
from gstalk.face.regions import mouth_opening, mouth_width

VISEMES = ["sil", "PP", "FF", "TH", "DD", "kk", "CH", "SS", "nn", "RR", "aa", "E", "ih", "oh", "ou", "pre", "post"]
PHONE_TO_VISEME = {
    "P": "PP", "B": "PP", "M": "PP", "F": "FF", "V": "FF", "TH": "TH", "DH": "TH", "T": "DD", "D": "DD",
    "K": "kk", "G": "kk", "NG": "kk", "HH": "kk", "CH": "CH", "JH": "CH", "SH": "CH", "ZH": "CH", "S": "SS",
    "Z": "SS", "N": "nn", "L": "nn", "R": "RR", "ER": "RR", "AA": "aa", "AH": "aa", "AE": "aa", "AW": "aa",
    "AY": "aa", "EH": "E", "EY": "E", "IH": "ih", "IY": "ih", "Y": "ih", "AO": "oh", "OW": "oh", "OY": "oh",
    "UH": "ou", "UW": "ou", "W": "ou",
}
SIL = 0
#: the classes a phone or silence can be (the audio features' one-hot channels); the pause
#: classes below are the lip model's own
PHONE_CLASSES = VISEMES[:15]
PRE = VISEMES.index("pre")  # the end of a pause, just before speech (the mouth readies, breathes in)
POST = VISEMES.index("post")  # the start of a pause, just after speech (the mouth lingers or shuts)
PAUSES = (SIL, PRE, POST)
# the phonetic table, for classes the clip lacks: lip opening, 0 (closed) .. 1 (widest), and
# spreading (+1) vs rounding (-1)
OPENING = {"sil": 0.1, "PP": 0.0, "FF": 0.15, "TH": 0.3, "DD": 0.35, "kk": 0.45, "CH": 0.3, "SS": 0.2, "nn": 0.3,
           "RR": 0.35, "aa": 1.0, "E": 0.7, "ih": 0.45, "oh": 0.75, "ou": 0.35, "pre": 0.1, "post": 0.1}
SPREAD = {"sil": 0.0, "PP": 0.0, "FF": 0.0, "TH": 0.2, "DD": 0.2, "kk": 0.1, "CH": -0.6, "SS": 0.4, "nn": 0.2,
          "RR": -0.4, "aa": 0.2, "E": 0.6, "ih": 0.8, "oh": -0.8, "ou": -1.0, "pre": 0.0, "post": 0.0}
# per class: dominance strength, fall-off outside the segment (s), lead of the mouth over the sound (s)
DOMINANCE = {
    "sil": (0.5, 0.048, 0.0),
    "PP": (3.0, 0.018, 0.02), "FF": (2.0, 0.018, 0.02),
    "TH": (0.4, 0.024, 0.02), "DD": (0.3, 0.024, 0.02), "kk": (0.3, 0.024, 0.02), "CH": (0.6, 0.03, 0.04),
    "SS": (0.4, 0.024, 0.02), "nn": (0.3, 0.024, 0.02), "RR": (0.5, 0.03, 0.04),
    "aa": (0.6, 0.036, 0.03), "E": (0.6, 0.036, 0.03), "ih": (0.5, 0.036, 0.03),
    "oh": (0.7, 0.048, 0.06), "ou": (0.7, 0.048, 0.06), "pre": (0.5, 0.048, 0.0),
    "post": (0.5, 0.048, 0.0),
}
#: the calibrated audio-to-mouth lag lies in these (s). Within speech the mouth leads its sound
#: by tens of milliseconds (each class's own lead adds up to 60 ms more, :data:`DOMINANCE`);
#: the longer lead before a pause ends is the ``pre`` class's. A lag beyond 120 ms let a
#: speaker who opens his mouth before each phrase (portrait_man_20s) shift all his speech
#: 200 ms early, which the held-back blocks liked and his held-out tail did not
#: (docs/benchmarks.md)
LAGS = tuple(np.round(np.arange(-0.04, 0.121, 0.02), 3))
DEFAULT_LAG = 0.08  # where the clip is too short to calibrate it
#: how long before speech the mouth takes its own pre-speech shape, calibrated per clip among
#: these (s; 0: the whole pause is ``sil``)
PRE_WINDOWS = (0.0, 0.2, 0.3, 0.45)
#: the same for the start of a pause, just after speech
POST_WINDOWS = (0.0, 0.3)
RIDGE = 2.0  # pull of each class's target towards the table's, in frames' worth of data
#: pull of the pause classes' targets (sil, pre, post) towards the rest mouth, in pauses' worth
#: of data: the frames of one pause are one shape, not many (docs/benchmarks.md)
PAUSE_PULL = 2.0
MIN_FRAMES = 8
CHANNELS = ("opening", "spread")


def viseme_segments(timeline: PhoneTimeline, pre_s: float = 0.0,
                    post_s: float = 0.0) -> list[tuple[int, float, float]]:
    """(class index, start s, end s) covering the whole timeline; the gaps are ``sil``; with
    ``post_s`` the first ``post_s`` of every pause after speech that is longer than ``post_s
    + 0.1`` s is ``post``, and with ``pre_s`` the last ``pre_s`` of what is left of every
    pause before speech, where that is longer than ``pre_s + 0.1`` s, is ``pre``."""
    out, t = [], 0.0
    for p, s, e in timeline.phones:
        if p == "SIL" or e <= s:
            continue
        if s > t + 1e-6:
            out.append((SIL, t, s))
        out.append((VISEMES.index(PHONE_TO_VISEME.get(p, "sil")), s, e))
        t = max(t, e)
    if timeline.duration > t + 1e-6:
        out.append((SIL, t, timeline.duration))
    split = []
    for i, (c, s, e) in enumerate(out):
        if c != SIL:
            split.append((c, s, e))
            continue
        if post_s > 0 and i > 0 and e - s > post_s + 0.1:
            split.append((POST, s, s + post_s))
            s += post_s
        if pre_s > 0 and i + 1 < len(out) and e - s > pre_s + 0.1:
            split += [(SIL, s, e - pre_s), (PRE, e - pre_s, e)]
        else:
            split.append((SIL, s, e))
    return split


_DOM = np.array([DOMINANCE[v] for v in VISEMES], np.float64)  # [17, 3]


def dominance(timeline: PhoneTimeline, n_frames: int, fps: float, lag: float, pre_s: float = 0.0,
              post_s: float = 0.0) -> np.ndarray:
    """[n_frames, 17]: each class's share of frame k's mouth (rows sum to 1). Frame k shows
    the mouth of time k / fps, which is shaped by the phones around k / fps + lag (+ each
    class's own lead); ``pre_s``, ``post_s``: see :func:`viseme_segments`."""
    t = np.arange(n_frames) / fps + lag
    w = np.zeros((n_frames, len(VISEMES)))
    for c, s, e in viseme_segments(timeline, pre_s, post_s):
        strength, falloff, lead = _DOM[c]
        centre, half = (s + e) / 2 - lead, (e - s) / 2
        lo, hi = np.searchsorted(t, centre - half - 8 * falloff), np.searchsorted(t, centre + half + 8 * falloff)
        d = np.maximum(0.0, np.abs(t[lo:hi] - centre) - half)
        w[lo:hi, c] += strength * np.exp(-d / falloff)
    total = w.sum(1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total > 1e-9)
    w[total[:, 0] <= 1e-9, SIL] = 1.0  # beyond the audio's end: at rest
    return w


def _ridge(w: np.ndarray, y: np.ndarray, prior: np.ndarray, lam) -> np.ndarray:
    """Targets [17, P] minimising |w T - y|^2 + sum_c lam_c |T_c - prior_c|^2 (``lam`` one
    pull for all classes, or one per class)."""
    lam = np.broadcast_to(np.asarray(lam, np.float64), (w.shape[1],))
    return np.linalg.solve(w.T @ w + np.diag(lam), w.T @ y + lam[:, None] * prior)


def pause_pull(segments: list[tuple[int, float, float]], fps: float, lag: float, frames: np.ndarray, w: np.ndarray,
               ridge: float = RIDGE, pauses: float = PAUSE_PULL) -> np.ndarray:
    """[17] each class's ridge pull: ``ridge`` frames' worth, and for the pause classes
    ``pauses`` pauses' worth more. The frames of one pause show one shape held, so a clip with
    two pauses, one with the mouth shut and one wide open for a breath, knows little of where
    this person's mouth is in a pause: with k pauses alike the target lies k / (k + pauses)
    of the way from the rest mouth to theirs. ``segments``: :func:`viseme_segments` of the
    timeline; ``w`` [T, 17]: the dominance weights of all frames (at ``lag``); ``frames``:
    those fitted; a pause's worth is the class's weight in them over its number of pauses
    (weighted by their length)."""
    n_frames = len(w)
    inset = np.zeros(n_frames, bool)
    inset[np.asarray(frames)] = True
    count = np.concatenate([[0], np.cumsum(inset)])
    sq, tot = np.zeros(len(VISEMES)), np.zeros(len(VISEMES))
    for c, s, e in segments:
        if c in PAUSES:
            a, b = (int(np.clip(np.ceil((x - lag) * fps), 0, n_frames)) for x in (s, e))
            k = float(count[b] - count[a])
            sq[c] += k * k
            tot[c] += k
    n_pauses = np.divide(tot * tot, sq, out=np.zeros_like(sq), where=sq > 0)  # length-weighted count
    data = (np.asarray(w)[np.asarray(frames)] ** 2).sum(0)  # what the fit's normal equations hold of each class
    return ridge + pauses * np.divide(data, n_pauses, out=np.zeros_like(data), where=n_pauses > 0)


def rest_mouth(y: np.ndarray, proj: np.ndarray | None, iters: int = 20) -> np.ndarray:
    """[P] the jaw and expression whose lip points are nearest all frames' ``y`` [N, P] in
    the sum of distances (the geometric median in lip-point space, Weiszfeld's iteration; the
    lip-sync error is a mean distance, not a squared one), so that a laugh or a held smile in
    a few seconds of clip does not drag where the mouth rests. ``proj`` [P, 3 L]: how the L
    lip points move per unit of each output (:meth:`VisemeMotion.fit`); without it, the mean."""
    m = y.mean(0)
    if proj is None or proj.shape[1] % 3:
        return m
    for _ in range(iters):
        r = np.linalg.norm(((y - m) @ proj).reshape(len(y), -1, 3), axis=-1).mean(-1)
        s = 1.0 / np.maximum(r, max(0.1 * float(np.median(r)), 1e-9))
        m = (s[:, None] * y).sum(0) / s.sum()
    return m


def _folds(frames: np.ndarray, k: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """Contiguous blocks of ``frames``, each with the others as its training set."""
    blocks = np.array_split(frames, k)
    return [(np.concatenate([c for j, c in enumerate(blocks) if j != i]), b) for i, b in enumerate(blocks)]


#: a longer pre- or post-speech window must predict the held-back lips better than the
#: shorter by this share of a still mouth's error, else the shorter is kept
WINDOW_MARGIN = 0.005


def _search(timeline: PhoneTimeline, fps: float, y: np.ndarray, prior: np.ndarray, proj: np.ndarray,
            folds: list, ridge: float) -> tuple:
    """The lag, amplitude and pause windows whose targets, fitted on the other blocks of the
    training frames, put each block's lips nearest the tracked ones: (lag, gain, pre_s,
    post_s, a still mouth's error, the frames' errors). Per pair of windows the best lag; of
    the windows, the shortest within :data:`WINDOW_MARGIN` of the best."""
    n = len(y)
    per_window = {}
    for pre_s, post_s in ((p, q) for p in PRE_WINDOWS for q in POST_WINDOWS):
        segments = viseme_segments(timeline, pre_s, post_s)
        key = (float(pre_s), float(post_s))
        for lag in LAGS:
            w = dominance(timeline, n, fps, lag, pre_s, post_s)
            pred, truth = [], []
            for inner, held, m in folds:
                prior_f = prior.copy()
                prior_f[list(PAUSES)] = m  # each block's own rest mouth
                t = _ridge(w[inner], y[inner], prior_f, pause_pull(segments, fps, lag, inner, w, ridge))
                pred.append((w[held] @ t - m) @ proj)
                truth.append((y[held] - m) @ proj)
            p, q = np.concatenate(pred), np.concatenate(truth)
            g = float(np.clip((p * q).sum() / max(float((p * p).sum()), 1e-12), 0.0, 1.0))
            err = float(((g * p - q) ** 2).sum())
            if key not in per_window or err < per_window[key][0] - 1e-9 * abs(per_window[key][0]):
                per_window[key] = (err, float(lag), g, float((q * q).sum()), ((g * p - q) ** 2).sum(1))
    least = min(v[0] for v in per_window.values())
    (pre_s, post_s), (_, lag, g, still_err, frame_err) = next(
        kv for kv in sorted(per_window.items(), key=lambda kv: (sum(kv[0]), kv[0]))
        if kv[1][0] <= least + WINDOW_MARGIN * kv[1][3])
    return lag, g, pre_s, post_s, still_err, frame_err


class VisemeMotion(nn.Module):
    """Phone timeline -> jaw ``[T, 3]`` and expression ``[T, n_expr]`` through the person's
    viseme targets; :meth:`fit` calibrates it to a tracked clip."""

    def __init__(self, n_expr: int):
        super().__init__()
        self.n_expr = n_expr
        self.register_buffer("targets", torch.zeros(len(VISEMES), 3 + n_expr))  # jaw and expression per class
        self.register_buffer("lag", torch.tensor(DEFAULT_LAG))
        self.register_buffer("pre_s", torch.zeros(()))  # the pre-speech window (s; 0: none)
        self.register_buffer("post_s", torch.zeros(()))  # the post-speech window (s; 0: none)
        self.register_buffer("gain", torch.ones(()))  # how far from its rest the mouth moves (0 .. 1)
        self.register_buffer("mean", torch.zeros(3 + n_expr))  # the rest mouth (rest_mouth of the training frames)
        self.register_buffer("fitted", torch.zeros(()))

    @property
    def usable(self) -> bool:
        return bool(self.fitted)

    def weights(self, timeline: PhoneTimeline, n_frames: int, fps: float) -> np.ndarray:
        return dominance(timeline, n_frames, fps, float(self.lag), float(self.pre_s), float(self.post_s))

    @torch.no_grad()
    def fit(self, timeline: PhoneTimeline, fps: float, target: np.ndarray, lips: np.ndarray, frames: np.ndarray,
            driven: np.ndarray | None = None, ridge: float = RIDGE, lip_map: np.ndarray | None = None) -> dict:
        """Calibrate on ``frames`` (training frames with landmarks) of a clip whose audio has
        the phones ``timeline``: ``target`` [T, 3 + n_expr] the tracked jaw and expression,
        ``lips`` [T, 2] the measured mouth opening and width (:func:`lip_measures`; they map
        the phonetic table to this person's jaw and expression); ``driven`` [n_expr] bool:
        the expression coefficients the lips may move; ``lip_map`` [3 + n_expr, D]: how the
        head model's lip points move per unit of each output (:func:`gstalk.avatar.init.lip_jacobian`),
        so that the lag and the amplitude are the ones whose predictions put the lips nearest
        the tracked ones on held-back blocks (what the lip-sync error measures); without it,
        the jaw's opening alone decides. Returns what it measured (for the log): the lag and
        amplitude, the classes fitted from the clip, and how well the phones predict the
        mouth's measured opening on blocks of the training frames they were not fitted on."""
        frames = np.asarray(frames)
        if len(frames) < MIN_FRAMES:
            raise InputError(f"the viseme lip model needs at least {MIN_FRAMES} training frames with landmarks, "
                             f"got {len(frames)}")
        y_all = np.asarray(target, np.float64)
        n = len(y_all)
        y = y_all[frames]
        prior = self._table_targets(np.asarray(lips, np.float64)[frames], y)
        still = np.zeros(y.shape[1], bool)
        if driven is not None:  # expression coefficients that do not move the lips stay at the rest
            still[3:] = ~np.asarray(driven, bool)
        if lip_map is not None:
            proj = np.asarray(lip_map, np.float64).copy()  # [P, D]: lip points per unit of output
            proj[still] = 0.0
        else:  # the jaw's opening, in units of its spread
            proj = np.zeros((y.shape[1], 1))
            proj[0, 0] = 1.0 / max(float(y[:, 0].std()), 1e-9)
        lip_proj = proj if lip_map is not None else None
        y_mean = rest_mouth(y, lip_proj)
        prior[list(PAUSES)] = y_mean  # a pause's mouth, until the clip shows enough pauses: at rest
        # the lag (with its amplitude) whose targets, fitted on the other blocks of the training
        # frames, predict each block's lips best
        folds = [(inner, held, rest_mouth(y_all[inner], lip_proj)) for inner, held in _folds(frames)]
        lag, gain, pre_s, post_s, still_err, frame_err = _search(timeline, fps, y_all, prior, proj, folds, ridge)
        w = dominance(timeline, n, fps, lag, pre_s, post_s)
        targets = _ridge(w[frames], y, prior, pause_pull(viseme_segments(timeline, pre_s, post_s), fps, lag, frames, w,
                                                         ridge))
        targets[:, still] = y_mean[still]
        self.targets.copy_(torch.from_numpy(targets))
        self.lag.fill_(lag)
        self.pre_s.fill_(pre_s)
        self.post_s.fill_(post_s)
        self.gain.fill_(gain)
        self.mean.copy_(torch.from_numpy(y_mean))
        self.fitted.fill_(1.0)
        # honesty for the log: the measured opening predicted on held-back blocks
        o = np.asarray(lips, np.float64)[:, :1]
        pred = np.zeros(n)
        for inner, held, _ in folds:
            pred[held] = (w[held] @ _ridge(w[inner], o[inner], np.full((len(VISEMES), 1), o[inner].mean()),
                                           ridge))[:, 0]
        corr = [np.corrcoef(pred[held], o[held, 0])[0, 1] for _, held, _ in folds
                if pred[held].std() > 1e-9 and o[held, 0].std() > 1e-9]
        mass = w[frames].sum(0)
        used = [(v, m) for v, m in zip(VISEMES, mass) if (v != "pre" or pre_s > 0) and (v != "post" or post_s > 0)]
        return {"lag_s": lag, "pre_s": pre_s, "post_s": post_s, "gain": gain,
                "own_classes": [v for v, m in used if m >= ridge], "table_classes": [v for v, m in used if m < ridge],
                "phones_vs_opening": float(np.mean(corr)) if corr else float("nan"),
                "frame_errors": frame_err / max(still_err, 1e-12) * len(frame_err)}

    @staticmethod
    def _table_targets(lips: np.ndarray, y: np.ndarray) -> np.ndarray:
        """[17, P] the phonetic table's targets for this person: the table's opening and
        spread, one table spread per spread of the person's measured lips, mapped to jaw and
        expression by how theirs follow their lips (a ridge regression over the frames)."""
        l_mean, l_std = lips.mean(0), np.maximum(lips.std(0), 1e-6)
        z = (lips - l_mean) / l_std
        coef = np.linalg.solve(z.T @ z + 1e-2 * len(z) * np.eye(2), z.T @ (y - y.mean(0))) / l_std[:, None]
        tab = np.array([[OPENING[v], SPREAD[v]] for v in VISEMES])
        ref = tab[[i for i, v in enumerate(VISEMES) if v not in ("pre", "post")]]  # they start as 'sil', move no others
        tz = (tab - ref.mean(0)) / ref.std(0)
        return y.mean(0) + (tz * l_std) @ coef

    def forward(self, timeline: PhoneTimeline, n_frames: int, fps: float) -> tuple[Tensor, Tensor]:
        if not self.usable:
            raise InputError("this avatar's viseme lip model was never calibrated; use --lips learned or re-fit it")
        w = torch.from_numpy(self.weights(timeline, n_frames, fps)).to(self.targets)
        y = self.mean + self.gain * (w @ self.targets - self.mean)
        return y[:, :3], y[:, 3:]


def lip_measures(lmk: np.ndarray) -> np.ndarray:
    """[..., 2]: mouth opening and mouth width (both over the outer-eye-corner distance) from
    478-point face-mesh landmarks."""
    return np.stack([mouth_opening(lmk), mouth_width(lmk)], -1)
