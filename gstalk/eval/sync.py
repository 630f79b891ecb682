"""Mouth-audio sync: does the mouth open when there is speech energy?

``sync_score`` is the Pearson correlation between a per-frame mouth-opening curve and the
driving audio's speech-energy envelope (RMS over 40 ms around each frame, in dB, floored
at -60 dB below the peak, lightly smoothed), maximised over small lags (+-2 frames; lips
lead or trail the sound by up to ~80 ms). 1 is perfect sync; 0 is none. It is NaN where it is
undefined (a mouth that never moves, one the detector never found, silence): such a score
says nothing and is left out of every average.
"""

from __future__ import annotations

import numpy as np


def speech_envelope(audio: np.ndarray, n_frames: int, fps: float, sr: int = 16000) -> np.ndarray:
    a = np.asarray(audio, np.float64)
    half = int(0.02 * sr)
    centres = np.round(np.arange(n_frames) / fps * sr).astype(int)
    env = np.empty(n_frames)
    for k, c in enumerate(centres):
        seg = a[max(0, c - half):c + half]
        env[k] = np.sqrt(np.mean(seg**2)) if seg.size else 0.0
    db = 20 * np.log10(env + 1e-9)
    db = np.maximum(db, db.max() - 60)
    kernel = np.array([0.25, 0.5, 0.25])
    return np.convolve(np.pad(db, 1, mode="edge"), kernel, mode="valid")


def sync_score(mouth: np.ndarray, audio: np.ndarray, fps: float, sr: int = 16000, max_lag: int = 2) -> float:
    mouth = np.asarray(mouth, np.float64)
    ok = np.isfinite(mouth)
    env = speech_envelope(audio, len(mouth), fps, sr)
    best = float("nan")
    for lag in range(-max_lag, max_lag + 1):
        m = np.roll(mouth, lag)
        sel = ok & np.roll(ok, lag)
        if lag > 0:
            sel[:lag] = False
        elif lag < 0:
            sel[lag:] = False
        if sel.sum() < 3 or np.std(m[sel]) < 1e-9 or np.std(env[sel]) < 1e-9:
            continue
        r = float(np.corrcoef(m[sel], env[sel])[0, 1])
        best = r if not np.isfinite(best) else max(best, r)
    return best
