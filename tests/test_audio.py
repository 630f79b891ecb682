from pathlib import Path

import numpy as np
import pytest
import torch

from gstalk.audio.encoder import AudioEncoder, AudioModel, TemporalSmoother
from gstalk.audio.features import (SilentAudioError, check_speech, compute_features, feature_dim,
                                   load_external_features, viseme_features)
from gstalk.audio.phones import PhoneTimeline
from gstalk.audio.visemes import PHONE_CLASSES, VISEMES
from gstalk.errors import FileFormatError, InputError

SR = 16000
SPEECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech_radio_8s.wav"


def tone_burst(seconds=2.0, start=0.8, end=0.9, freq=1000.0):
    t = np.arange(int(seconds * SR)) / SR
    a = np.zeros_like(t, dtype=np.float32)
    on = (t >= start) & (t < end)
    a[on] = 0.5 * np.sin(2 * np.pi * freq * t[on])
    return a


def test_tone_burst_lands_in_the_right_frames():
    f = compute_features(tone_burst(), n_frames=50, fps=25, kind="mel", window=32)
    assert f.windows.shape == (50, 32, 83)
    energy = f.windows[:, 16, 80]  # the window's centre frame, energy channel
    loud = np.flatnonzero(energy > energy.min() + 0.5 * (energy.max() - energy.min()))
    assert loud.min() == 20 and loud.max() == 22  # 0.80 s .. 0.88 s at 25 fps
    # the window is centred: frame 20's window sees the onset in its middle
    w = f.windows[20, :, 80]
    assert w[16] > w[0] + 1 and w[16] > w[8]
    # mel bands around 1 kHz light up
    assert f.windows[21, 16, :80].argmax() in range(20, 45)


def test_pitch_and_voicing():
    t = np.arange(SR) / SR
    a = (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    f = compute_features(a, n_frames=25, fps=25, kind="mel", window=4)
    logf0, voiced = f.windows[5:20, 2, 81], f.windows[5:20, 2, 82]
    assert np.all(voiced == 1) and np.allclose(np.exp(logf0) * 100, 200, rtol=0.05)


@pytest.mark.parametrize("kind", ["mel", "phoneme", "mel+phoneme"])
def test_feature_shapes(kind):
    f = compute_features(tone_burst(1.2), n_frames=30, fps=25, kind=kind, window=16)
    assert f.windows.shape == (30, 16, feature_dim(kind)) and f.windows.dtype == np.float32
    assert np.isfinite(f.windows).all()


def test_viseme_features_place_the_timelines_phones():
    tl = PhoneTimeline([("P", 0.10, 0.15), ("AA", 0.15, 0.30), ("W", 0.50, 0.62)], 1.0)
    v = viseme_features(tl, 101)
    assert v.shape == (101, len(PHONE_CLASSES)) and np.all(v.sum(1) == 1)
    ids = v.argmax(1)
    assert (ids[10:15] == VISEMES.index("PP")).all() and (ids[15:30] == VISEMES.index("aa")).all()
    assert (ids[50:62] == VISEMES.index("ou")).all() and (ids[:10] == 0).all() and (ids[30:50] == 0).all()
    assert (viseme_features(PhoneTimeline([], 1.0), 101)[:, 0] == 1).all()  # no phones: silence
    with pytest.raises(InputError, match="unknown audio feature kind"):
        compute_features(np.zeros(SR, np.float32), 10, 25, kind="wav2lip")


@pytest.mark.skipif(not SPEECH.is_file(), reason="needs ../shared/data (opt-in real speech)")
def test_words_are_recognised_and_aligned_in_real_speech():
    from gstalk.audio.phones import phone_timeline
    from gstalk.io.video import load_audio

    tl = phone_timeline(load_audio(SPEECH))
    assert tl.source == "words" and len(tl.words) > 15 and len(tl.speech()) > 60 and not tl.notes
    assert {"holidays", "celebrating", "festivities"} <= {w for w, _, _ in tl.words}


def test_external_features(tmp_path):
    n = 40
    np.save(tmp_path / "ds.npy", np.random.rand(n, 16, 29).astype(np.float32))
    f = load_external_features(tmp_path / "ds.npy", n, 25)
    assert f.kind == "deepspeech" and f.windows.shape == (n, 16, 29)
    np.save(tmp_path / "hu.npy", np.random.rand(2 * n, 1024).astype(np.float32))
    f = load_external_features(tmp_path / "hu.npy", n, 25)
    assert f.kind == "hubert" and f.windows.shape == (n, 2, 1024)
    np.save(tmp_path / "w2v.npy", np.arange(n + 1, dtype=np.float32)[:, None].repeat(44, 1))
    f = load_external_features(tmp_path / "w2v.npy", n, 25, window=8)
    assert f.kind == "wav2vec" and f.windows.shape == (n, 8, 44)
    assert f.windows[10, 4, 0] == 10 and f.windows[10, 0, 0] == 6  # window centred on its frame
    np.save(tmp_path / "short.npy", np.zeros((n - 10, 44), np.float32))
    with pytest.raises(InputError, match="features for 30 frames but the video has 40 frames"):
        load_external_features(tmp_path / "short.npy", n, 25)
    with pytest.raises(FileFormatError):
        load_external_features(tmp_path / "missing.npy", n, 25)


def test_silence_is_refused():
    with pytest.raises(SilentAudioError, match="silent"):
        check_speech(np.zeros(SR, np.float32))
    check_speech(tone_burst())


def test_encoder_and_smoother():
    enc = AudioEncoder(in_dim=83, window=32, code_dim=16)
    assert enc(torch.randn(5, 32, 83)).shape == (5, 16)
    with pytest.raises(ValueError):
        enc(torch.randn(5, 16, 83))
    sm = TemporalSmoother(16, k=2)
    codes = torch.randn(10, 16)
    out = sm(codes)
    # uniform attention at initialisation: a 5-frame moving average with repeated edges
    torch.testing.assert_close(out[5], codes[3:8].mean(0))
    torch.testing.assert_close(out[0], (3 * codes[0] + codes[1] + codes[2]) / 5)
    m = AudioModel(83, 32, 16)
    w = torch.randn(12, 32, 83) * 3 + 1
    m.set_normalisation(w)
    assert m(w).shape == (12, 16)
    # a feature constant in training (a viseme the clip never uses) does not move new codes
    w[..., 5] = 0
    m.set_normalisation(w)
    new = w.clone()
    new[:, 10:20, 5] = 1.0
    torch.testing.assert_close(m(new), m(w), atol=1e-5, rtol=0)
    # a rare one (one frame in 12) is normalised by at most 10x
    w[..., 6] = 0
    w[3, :, 6] = 0.05
    m.set_normalisation(w)
    assert m.std[6] == pytest.approx(0.1) and m.std[0] > 1


def test_audio_to_motion_validation_picks_the_iterations():
    from gstalk.avatar.model import AudioToMotion
    from gstalk.train.motion import EVAL_EVERY, fit_audio_to_motion, motion_target

    rng = np.random.default_rng(0)
    T, W, D, E = 240, 8, 6, 2
    ids = rng.integers(0, D, T)
    feats = np.eye(D, dtype=np.float32)[ids]
    windows = torch.from_numpy(np.stack([feats[np.clip(np.arange(t - W // 2, t + W // 2), 0, T - 1)]
                                         for t in range(T)]))
    openness = rng.uniform(0, 0.3, D).astype(np.float32)
    jaw = np.zeros((T, 3), np.float32)
    jaw[:, 0] = openness[ids]  # the jaw follows the sound
    noise = rng.normal(0, 0.1, (T, 3)).astype(np.float32)  # the jaw ignores the sound
    train = np.arange(200)
    runs = {}
    for name, j in (("learnable", jaw), ("noise", noise)):
        torch.manual_seed(0)
        a2m = AudioToMotion(D, W, E, code_dim=16)
        target = motion_target(j, np.zeros((T, E), np.float32), np.zeros(T, np.float32), E)
        runs[name] = fit_audio_to_motion(a2m, windows, target, train, 400, seed=1, validate=True)
        with torch.no_grad():
            pred = a2m(windows)[0][200:, 0].numpy()
        runs[name + "_corr"] = np.corrcoef(pred, j[200:, 0])[0, 1]
    assert runs["learnable"] >= 100 and runs["learnable_corr"] > 0.7, runs
    assert runs["noise"] <= 100 and runs["noise"] % EVAL_EVERY == 0, runs
    # without validation every iteration runs
    a2m = AudioToMotion(D, W, E, code_dim=16)
    assert fit_audio_to_motion(a2m, windows, target, train, 30, validate=False) == 30


