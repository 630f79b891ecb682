"""Audio features per video frame.

Audio frames are 10 ms apart (centred at i / 100 s); video frame k is at k / fps. For every
video frame, a window of ``window`` neighbouring audio frames centred on it is taken
(default 32 = 0.32 s), giving ``[T, W, D]`` arrays.

Kinds (``kind``):
- ``mel``: 80-band log-mel (25 ms windows), RMS energy (dB), log pitch (YIN) and a
  voicing flag, from librosa: D = 83. Captures the voice itself, so it tends to fit one
  speaker.
- ``phoneme``: speaker-independent phone evidence: the phone timeline of
  :mod:`gstalk.audio.phones` (recognised English words force-aligned, or free phone
  decoding; offline, pocketsphinx's shipped models) as, per audio frame, a one-hot over 15
  viseme classes (sil, PP, FF, TH, DD, kk, CH, SS, nn, RR, aa, E, ih, oh, ou), D = 15.
- ``mel+phoneme``: both, concatenated (D = 98).
- external arrays from other projects (DeepSpeech ``[N,16,29]``, HuBERT ``[N,2,1024]`` or
  ``[N,1024]``, wav2vec ``[N,44]`` / ``[N,16,44]``) via :func:`load_external_features`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from gstalk.audio.phones import PhoneTimeline, phone_timeline
from gstalk.audio.visemes import PHONE_CLASSES, PHONE_TO_VISEME
from gstalk.errors import FileFormatError, GstalkError, InputError

SAMPLE_RATE = 16000
HOP = 160  # 10 ms
AUDIO_FPS = SAMPLE_RATE / HOP
FeatureKind = Literal["mel", "phoneme", "mel+phoneme"]

class SilentAudioError(GstalkError):
    """The audio holds no speech."""


def feature_dim(kind: FeatureKind) -> int:
    return {"mel": 83, "phoneme": len(PHONE_CLASSES), "mel+phoneme": 83 + len(PHONE_CLASSES)}[kind]


def mel_features(audio: np.ndarray, n_mels: int = 80) -> np.ndarray:
    """[A, 83] per 10 ms audio frame: log-mel, energy (dB / 20), log pitch, voiced."""
    import librosa

    a = np.asarray(audio, np.float32)
    mel = librosa.feature.melspectrogram(y=a, sr=SAMPLE_RATE, n_fft=400, hop_length=HOP, win_length=400,
                                         n_mels=n_mels, fmin=40, fmax=7600, power=2.0, center=True)
    logmel = np.log(mel + 1e-6).T  # [A, 80]
    rms = librosa.feature.rms(y=a, frame_length=400, hop_length=HOP, center=True)[0]
    energy = 20 * np.log10(rms + 1e-5) / 20.0
    f0 = librosa.yin(a, fmin=60, fmax=500, sr=SAMPLE_RATE, frame_length=1024, hop_length=HOP, center=True)
    n = logmel.shape[0]
    f0, energy = f0[:n], energy[:n]
    voiced = (energy > np.log10(0.01)) & (f0 < 480)  # loud enough, pitch inside the search range
    logf0 = np.where(voiced, np.log(f0 / 100.0), 0.0)
    return np.concatenate([logmel, energy[:, None], logf0[:, None], voiced[:, None]], 1).astype(np.float32)


def viseme_features(timeline: PhoneTimeline, n_frames: int) -> np.ndarray:
    """[A, 15] one-hot viseme class per 10 ms audio frame (audio frame i at i / 100 s) of
    the phones of ``timeline``; silence where there are none."""
    out = np.zeros((n_frames, len(PHONE_CLASSES)), np.float32)
    out[:, 0] = 1.0
    for phone, a, b in timeline.phones:
        v = PHONE_TO_VISEME.get(phone, "sil")
        i0, i1 = int(round(a * AUDIO_FPS)), min(n_frames, int(round(b * AUDIO_FPS)))
        if i1 > i0:
            out[i0:i1] = 0.0
            out[i0:i1, PHONE_CLASSES.index(v)] = 1.0
    return out


def audio_frame_features(audio: np.ndarray, kind: FeatureKind = "mel+phoneme",
                         timeline: PhoneTimeline | None = None) -> np.ndarray:
    """[A, D] features per 10 ms audio frame for ``kind`` (the phones from ``timeline``,
    decoded from the audio when not given)."""
    if kind not in ("mel", "phoneme", "mel+phoneme"):
        raise InputError(f"unknown audio feature kind {kind!r}: choose mel, phoneme or mel+phoneme")
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 1 or audio.size < HOP * 4:
        raise InputError(f"audio must be mono and at least 40 ms long, got shape {audio.shape}")
    n = int(np.ceil(audio.size / HOP)) + 1 if audio.size % HOP else audio.size // HOP + 1
    parts = []
    if kind in ("mel", "mel+phoneme"):
        m = mel_features(audio)
        n = m.shape[0]
        parts.append(m)
    if kind in ("phoneme", "mel+phoneme"):
        parts.append(viseme_features(timeline if timeline is not None else phone_timeline(audio), n))
    return np.concatenate(parts, 1)


def frame_windows(feats: np.ndarray, n_frames: int, fps: float, window: int = 32,
                  rate: float = AUDIO_FPS) -> np.ndarray:
    """[T, W, D] windows of per-``rate`` features centred on each video frame (edges repeated)."""
    centre = np.round(np.arange(n_frames) / fps * rate).astype(int)
    offs = np.arange(window) - window // 2
    idx = np.clip(centre[:, None] + offs[None], 0, len(feats) - 1)
    return feats[idx]


def check_speech(audio: np.ndarray, what: str = "the audio") -> None:
    rms = float(np.sqrt(np.mean(np.asarray(audio, np.float64) ** 2))) if len(audio) else 0.0
    if rms < 1e-3:
        raise SilentAudioError(f"{what} is silent (RMS {rms:.1e}); give a recording with speech")


@dataclass
class AudioFeatures:
    """Per-video-frame audio windows and how they were made."""

    windows: np.ndarray  # [T, W, D]
    kind: str
    fps: float
    timeline: PhoneTimeline | None = None  # the phones, for kinds with phones (the viseme lip model's input)

    @property
    def dim(self) -> int:
        return self.windows.shape[-1]


def compute_features(audio: np.ndarray, n_frames: int, fps: float, kind: FeatureKind = "mel+phoneme",
                     window: int = 32, phones: str = "auto", timeline: PhoneTimeline | None = None) -> AudioFeatures:
    """Windows ``[n_frames, window, D]`` for 16 kHz mono ``audio`` whose sample 0 is frame 0,
    and its phone timeline for kinds with phones (``timeline`` where it is known, else decoded
    with ``phones`` as the source, see :func:`phone_timeline`)."""
    if n_frames <= 0:
        raise InputError("n_frames must be positive")
    tl = None
    if kind in ("phoneme", "mel+phoneme"):
        tl = timeline if timeline is not None else phone_timeline(np.asarray(audio, np.float32), source=phones)
    return AudioFeatures(frame_windows(audio_frame_features(audio, kind, tl), n_frames, fps, window), kind, fps, tl)


def load_external_features(path: str | os.PathLike, n_frames: int, fps: float = 25.0,
                           window: int = 8) -> AudioFeatures:
    """Precomputed features from other talking-head projects, aligned to ``n_frames`` video frames.

    Accepted: DeepSpeech ``[N, 16, 29]`` (already a window per frame); HuBERT ``[N, 2, 1024]``
    (two 50 Hz frames per video frame) or ``[N, 1024]``; wav2vec ``[N, 44]`` or ``[N, 16, 44]``;
    any ``[N, D]`` / ``[N, W, D]``. N must equal the number of video frames (or twice it for
    50 Hz ``[2N, D]`` arrays), within 2 frames (edges are repeated / trimmed); ``[N, D]``
    arrays get a window of ``window`` neighbouring frames.
    """
    p = Path(path)
    try:
        arr = np.load(p, allow_pickle=False)
    except FileNotFoundError:
        raise FileFormatError(f"no such feature file: {p}") from None
    except ValueError as e:
        raise FileFormatError(f"cannot read {p} as a numpy array ({e})") from None
    arr = np.asarray(arr, np.float32)
    kind = "external"
    if arr.ndim == 3 and arr.shape[1:] == (16, 29):
        kind = "deepspeech"
    elif arr.ndim == 3 and arr.shape[1:] == (2, 1024) or (arr.ndim == 2 and arr.shape[1] == 1024):
        kind = "hubert"
    elif arr.shape[-1] == 44:
        kind = "wav2vec"
    if arr.ndim == 2 and abs(arr.shape[0] - 2 * n_frames) <= 2 and abs(arr.shape[0] - n_frames) > 2:
        arr = _fit_length(arr, 2 * n_frames).reshape(n_frames, 2, -1)  # 50 Hz features
    n = arr.shape[0]
    if abs(n - n_frames) > 2:
        raise InputError(f"{p.name} has features for {n} frames but the video has {n_frames} frames at {fps:g} fps "
                         f"({n_frames / fps:.2f} s); extract them from the same audio, at the video's frame rate")
    arr = _fit_length(arr, n_frames)
    if arr.ndim == 2:
        arr = frame_windows(arr, n_frames, fps, window, rate=fps)
    elif arr.ndim != 3:
        raise InputError(f"{p.name}: expected [N, D] or [N, W, D] features, got shape {arr.shape}")
    return AudioFeatures(arr, kind, fps)


def _fit_length(a: np.ndarray, n: int) -> np.ndarray:
    if a.shape[0] >= n:
        return a[:n]
    return np.concatenate([a, np.repeat(a[-1:], n - a.shape[0], axis=0)])
