"""The audio-to-motion model's training: jaw, expression and blink from audio, supervised by
the track; and the calibration of the viseme lip model (:func:`fit_visemes`), which new audio
uses for jaw and expression by default.

The trainer runs all ``iters_a2m`` iterations on the training frames. ``validate=True``
first holds out the training frames' last sixth (after a gap of the audio window's reach,
like the held-out tail) to pick the iteration count, then trains afresh on all of them for
that many (the trainer does not: on the 8 s real clips validation stopped after 10
iterations, and the full run, which reproduces the training frames' jaw with correlation
0.99, gave wrong but livelier lips; docs/history/benchmarks-2026-11.md). A few seconds of
speech do not teach a mapping from audio to motion, which is why the viseme model is the
default; ``gstalk eval`` measures both against a still mouth (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from gstalk.audio.phones import PhoneTimeline
from gstalk.audio.visemes import MIN_FRAMES, VisemeMotion, lip_measures
from gstalk.avatar.init import lip_jacobian, mouth_expressions
from gstalk.avatar.model import AudioToMotion

EVAL_EVERY = 10  # validation interval (iterations)
#: Below this correlation of the mouth's opening predicted from the phones with the measured
#: one, on blocks of the training frames the prediction was not fitted on, the fit warns that
#: lips from new audio will be out of time (docs/benchmarks.md).
WEAK_PHONES = 0.3


def motion_target(jaw: np.ndarray, expr: np.ndarray, blink: np.ndarray, n_expr: int) -> torch.Tensor:
    """[T, 3 + n_expr + 1]: what the model predicts, per frame."""
    return torch.cat([torch.as_tensor(jaw), torch.as_tensor(expr[:, :n_expr]),
                      torch.as_tensor(blink).reshape(-1, 1)], 1).float()


def _fit(a2m: AudioToMotion, windows: torch.Tensor, target: torch.Tensor, frames: torch.Tensor, iters: int,
         seed: int, val: torch.Tensor | None = None, progress: Callable | None = None) -> list[float]:
    """Adam on ``frames``; with ``val``, the error there every EVAL_EVERY iterations (mean over
    outputs of the squared error in units of the output's spread over the training frames)."""
    opt = torch.optim.Adam(a2m.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    errs: list[float] = []
    for i in range(iters):
        b = frames[torch.randint(len(frames), (min(64, len(frames)),), generator=g)]
        y = a2m.head(a2m.audio.codes_at(windows, b))
        loss = ((y - (target[b] - a2m.out_mean) / a2m.out_std) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if val is not None and (i + 1) % EVAL_EVERY == 0:
            with torch.no_grad():
                yv = a2m.head(a2m.audio.codes_at(windows, val))
                errs.append(float(((yv - (target[val] - a2m.out_mean) / a2m.out_std) ** 2).mean()))
        if progress is not None and (i % 20 == 0 or i == iters - 1):
            progress("motion", i + 1, iters, {"loss": float(loss.detach())})
    return errs


def fit_audio_to_motion(a2m: AudioToMotion, windows: torch.Tensor, target: torch.Tensor, train_idx,
                        iters: int, seed: int = 0, validate: bool = True,
                        log: Callable[[str], None] = lambda m: None, progress: Callable | None = None) -> int:
    """Train ``a2m`` (freshly initialised) to predict ``target`` [T, out] from the audio
    ``windows`` [T, W, D] of frames ``train_idx``; returns the iterations run on all of them
    (``iters`` without validation, or when the clip is too short to hold a validation block)."""
    dev = windows.device
    tr = torch.as_tensor(np.asarray(train_idx), device=dev)
    target = target.to(dev)
    a2m.audio.set_normalisation(windows[tr])
    a2m.out_mean.copy_(target[tr].mean(0))
    a2m.out_std.copy_(target[tr].std(0).clamp_min(1e-4))
    reach = windows.shape[1] // 2 + a2m.audio.smoother.k
    n_val = len(tr) // 6
    if validate and n_val >= 8 and len(tr) - n_val - reach >= 32:
        init = {k: v.clone() for k, v in a2m.state_dict().items()}
        errs = _fit(a2m, windows, target, tr[:len(tr) - n_val - reach], iters, seed, val=tr[-n_val:])
        best = int(np.argmin(errs))
        log(f"audio-to-motion: {(best + 1) * EVAL_EVERY} of {iters} iterations (validation error {errs[best]:.3f} "
            f"of the outputs' variance; {errs[-1]:.3f} after all {iters}; {errs[0]:.3f} after {EVAL_EVERY})")
        iters = (best + 1) * EVAL_EVERY
        a2m.load_state_dict(init)
    _fit(a2m, windows, target, tr, iters, seed, progress=progress)
    return iters


def lip_inputs(head, shape: torch.Tensor, jaw: np.ndarray, expr: np.ndarray, train_idx,
               n_expr: int) -> tuple[np.ndarray, np.ndarray | None]:
    """What :func:`fit_visemes` needs of the head model for this identity: ``driven``
    [n_expr] bool, the expression coefficients that move the lips
    (:func:`gstalk.avatar.init.mouth_expressions`), and ``lip_map`` [3 + n_expr, D], how far
    the lips move per unit of each output around the training frames' mean jaw and expression
    (:func:`gstalk.avatar.init.lip_jacobian`; None where the head has no lip landmarks)."""
    tr = np.asarray(train_idx)
    driven = mouth_expressions(head, shape)[:n_expr].numpy()
    lip_map = lip_jacobian(head, shape, np.asarray(jaw)[tr].mean(0), np.asarray(expr)[tr].mean(0))
    return driven, None if lip_map is None else lip_map[:3 + n_expr]


PHONES_BLOCK_S = 1.0  # choose_phones' standard error is over blocks this long (neighbouring frames' errors go together)
PHONES_MARGIN = 1.645  # free phones replace the words only where their lips are better by this many standard errors
#                        (a one-sided test at 5%: the words are the default, and time clear English best)


def choose_phones(ds, words: PhoneTimeline, free: PhoneTimeline, jaw: np.ndarray, expr: np.ndarray, train_idx,
                  n_expr: int, driven=None, lip_map: np.ndarray | None = None) -> tuple[str, str]:
    """Which phones fit this person's lips: 'auto' (``words``, the recognised words' aligned
    phones) or 'phones' (``free``, free phone decoding of the same audio), and a line for the
    log. Each calibrates a viseme model (:meth:`VisemeMotion.fit`) whose held-back blocks' lip
    errors are compared frame by frame; free phones win only by more than
    :data:`PHONES_MARGIN` standard errors (over blocks of :data:`PHONES_BLOCK_S`; at least five
    blocks of training frames, else the words stay). Recognised
    words time the phones of clear English best; an accent, or another language that the
    recogniser mistakes for English words, can make them the worse guess."""
    lm = ds.landmarks()
    tr = np.asarray(train_idx)
    frames = tr[np.asarray(lm["valid"], bool)[tr]]
    b = max(1, round(PHONES_BLOCK_S * ds.fps))
    if len(frames) < max(4 * MIN_FRAMES, 5 * b):
        return "auto", "phones: too few training frames to compare recognised words with free phones; words kept"
    lips = lip_measures(np.nan_to_num(np.asarray(lm["lmk"], np.float64)))
    target = np.concatenate([jaw, expr[:, :n_expr]], 1)
    err = {}
    for name, tl in (("auto", words), ("phones", free)):
        info = VisemeMotion(n_expr).fit(tl, ds.fps, target, lips, frames, driven=driven, lip_map=lip_map)
        err[name] = info["frame_errors"]
    d = err["phones"] - err["auto"]
    k = len(d) // b
    blocks = d[:k * b].reshape(k, b).mean(1)
    se = float(blocks.std(ddof=1) / np.sqrt(k))
    pick = "phones" if d.mean() < -PHONES_MARGIN * se else "auto"
    what = "free phone decoding" if pick == "phones" else "the recognised words"
    return pick, (f"phones: {what} (lip error on held-back frames, of a still mouth's: words "
                  f"{err['auto'].mean():.3f}, free phones {err['phones'].mean():.3f} +- {se:.3f})")


def fit_visemes(vm: VisemeMotion, ds, timeline: PhoneTimeline, jaw: np.ndarray, expr: np.ndarray, train_idx,
                driven=None, log: Callable[[str], None] = lambda m: None, lip_map: np.ndarray | None = None) -> str:
    """Calibrate the viseme lip model ``vm`` on dataset ``ds``'s training frames that have
    face-mesh landmarks, whose audio has the phones ``timeline`` (``jaw`` [T, 3], ``expr``
    [T, >= vm.n_expr]: the track's; ``driven``: the expression coefficients it may move, and
    ``lip_map``: how the lips move with each output, see :meth:`VisemeMotion.fit`). Returns
    the lip model new audio should use: 'visemes', or
    'learned' where the visemes cannot be calibrated (too few frames with landmarks)."""
    lm = ds.landmarks()
    valid = np.asarray(lm["valid"], bool)
    tr = np.asarray(train_idx)
    frames = tr[valid[tr]]
    if len(frames) < 8:
        log(f"lip motion: only {len(frames)} training frames have landmarks; new audio moves the lips with the "
            "learned network")
        return "learned"
    lips = lip_measures(np.nan_to_num(np.asarray(lm["lmk"], np.float64)))
    target = np.concatenate([jaw, expr[:, :vm.n_expr]], 1)
    info = vm.fit(timeline, ds.fps, target, lips, frames, driven=driven, lip_map=lip_map)
    table = info["table_classes"]
    ready = "".join(f", takes its {k}-speech shape for {1000 * info[k + '_s']:.0f} ms {w} speech"
                    for k, w in (("pre", "before"), ("post", "after")) if info[k + "_s"] > 0)
    classes = f"{', '.join(table)} from the phonetic table (too few frames)" if table else "every class from this clip"
    log(f"lip motion: visemes calibrated on {len(frames)} frames ({timeline.source}: "
        f"{len(timeline.words)} words, {len(timeline.speech())} phones); the mouth leads the sound by "
        f"{1000 * info['lag_s']:.0f} ms{ready}; {classes}; phones vs the mouth's opening on held-back frames: "
        f"{info['phones_vs_opening']:+.2f}")
    if not info["phones_vs_opening"] >= WEAK_PHONES:
        log(f"lip motion: on this clip the phones follow the mouth's opening only weakly "
            f"({info['phones_vs_opening']:+.2f}; {WEAK_PHONES:.1f} or more is usual): new audio will move the lips, "
            "but not reliably in time with the words. A longer clip of clear speech, facing the camera, helps; "
            "'gstalk eval' measures it (lips_gain_over_mean_mouth)")
    return "visemes"
