from pathlib import Path

import numpy as np
import pytest
import torch

from gstalk.audio.encoder import AudioEncoder, AudioModel, TemporalSmoother
from gstalk.audio.features import (VISEMES, SilentAudioError, check_speech, compute_features, feature_dim,
                                   load_external_features, phone_segments, viseme_features)
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


def test_visemes_of_silence_and_one_hot():
    v = viseme_features(np.zeros(SR, np.float32))
    assert v.shape[1] == len(VISEMES) and np.all(v.sum(1) == 1) and np.all(v[:, 0] == 1)
    with pytest.raises(InputError, match="unknown audio feature kind"):
        compute_features(np.zeros(SR, np.float32), 10, 25, kind="wav2lip")


@pytest.mark.skipif(not SPEECH.is_file(), reason="needs ../shared/data (opt-in real speech)")
def test_phone_decoding_on_real_speech():
    from gstalk.io.video import load_audio

    segs = phone_segments(load_audio(SPEECH))
    assert sum(1 for p, _, _ in segs if p != "SIL") > 30


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


def _viseme_windows(ids: np.ndarray, window: int = 32, fps: float = 25.0) -> torch.Tensor:
    """Per-video-frame windows of one-hot visemes from per-10-ms viseme ids."""
    from gstalk.audio.features import frame_windows

    feats = np.eye(len(VISEMES), dtype=np.float32)[ids]
    n = int(len(ids) / 100 * fps)
    return torch.from_numpy(frame_windows(feats, n, fps, window))


def test_viseme_channels_open_close_round_and_lead_the_sound():
    from gstalk.audio.visemes import LEAD_S, VisemeMotion

    vm = VisemeMotion("phoneme", len(VISEMES), 32, 2)
    ids = np.zeros(400, int)  # 4 s of silence
    ids[100:130] = VISEMES.index("aa")  # an open vowel at 1.0-1.3 s
    ids[200:230] = VISEMES.index("PP")  # a bilabial
    ids[300:330] = VISEMES.index("ou")  # a rounded vowel at 3.0-3.3 s
    ch = vm.channels(_viseme_windows(ids)).numpy()  # [100 frames, 2]
    opening, spread = ch[:, 0], ch[:, 1]
    assert opening[28] > 0.9 and opening[53] < 0.05 and opening[10] == pytest.approx(0.1, abs=1e-5)
    assert spread[78] < -0.9 and abs(spread[28] - 0.2) < 0.05
    # the mouth is shaped before the sound: the opening reaches half-way up LEAD_S before the
    # vowel starts at frame 25 and closes LEAD_S before it ends at frame 32.5
    rise = np.flatnonzero(opening > 0.55)[0] / 25.0
    assert rise == pytest.approx(1.0 - LEAD_S, abs=0.045)
    # mel features have no phones: the model says so instead of guessing
    with pytest.raises(InputError, match="phone"):
        VisemeMotion("mel", 83, 32, 2).channels(torch.zeros(3, 32, 83))


def test_viseme_model_calibration_recovers_a_speakers_mouth():
    """Lips that follow the phone channels (opening scaled, width partly following the
    opening), and a jaw and expression that follow the lips: the calibrated model gives that
    jaw and expression back from the audio alone."""
    from gstalk.audio.visemes import MAX_Z, VisemeMotion

    rng = np.random.default_rng(0)
    ids = np.repeat(rng.integers(1, len(VISEMES), 120), 10)  # 100 ms phones, 12 s, no pause
    w = _viseme_windows(ids)
    vm = VisemeMotion("phoneme", len(VISEMES), 32, 2)
    a = vm.channels(w).numpy().astype(np.float64)
    lips = np.stack([0.05 + 0.3 * a[:, 0], 0.6 + 0.05 * a[:, 0] + 0.1 * a[:, 1]], 1)  # opening, width
    jaw = np.zeros((len(a), 3))
    jaw[:, 0] = 2.0 * (lips[:, 0] - 0.05)
    expr = np.stack([-4.0 * (lips[:, 1] - 0.6), np.full(len(a), 0.7)], 1)
    target = torch.from_numpy(np.concatenate([jaw, expr], 1)).float()
    info = vm.fit(w, lips, target, np.arange(len(a)), ridge=0.0)
    assert info["phones_vs_lips"]["opening"] == pytest.approx(1.0, abs=1e-6)
    assert info["rest_lips_z"] is None and not vm.rest_fitted  # no pause to learn the mouth at rest from
    assert info["jaw_open_explained"] == pytest.approx(1.0, abs=1e-6)
    pj, pe = vm(w)
    z_ok = (np.abs(((a - a.mean(0)) / a.std(0))) < MAX_Z - 0.5).all(1)  # frames the clamp leaves alone
    assert z_ok.mean() > 0.9
    np.testing.assert_allclose(pj[z_ok].numpy(), jaw[z_ok], atol=2e-3)
    np.testing.assert_allclose(pe[z_ok].numpy(), expr[z_ok], atol=2e-3)
    # silence only: no channel moved, nothing to calibrate against; it stays at the mean
    silent = _viseme_windows(np.zeros(400, int))
    vm2 = VisemeMotion("phoneme", len(VISEMES), 32, 2)
    vm2.fit(silent, lips[:100], target[:100], np.arange(100))
    pj2, pe2 = vm2(w)
    assert torch.isfinite(pj2).all() and torch.allclose(pj2, target[:100, :3].mean(0).expand_as(pj2), atol=1e-5)
    with pytest.raises(InputError, match="at least 8"):
        vm2.fit(silent, lips[:100], target[:100], np.arange(5))


def test_viseme_model_rests_the_mouth_where_the_speaker_does_in_pauses():
    """A speaker who leaves the mouth parted in pauses (the table closes it): calibrated on a
    clip with pauses, the model rests the mouth there in silence, and speech still follows
    the phones."""
    from gstalk.audio.visemes import VisemeMotion

    rng = np.random.default_rng(1)
    ids = np.repeat(rng.integers(1, len(VISEMES), 160), 10)  # 16 s of 100 ms phones ...
    for start in range(150, 1600, 400):
        ids[start:start + 60] = 0  # ... with a 600 ms pause every 4 s
    w = _viseme_windows(ids)
    vm = VisemeMotion("phoneme", len(VISEMES), 32, 2)
    a = vm.channels(w).numpy().astype(np.float64)
    sil = vm.silence(w).numpy()
    speaking = 0.05 + 0.3 * a[:, 0]
    lips = np.stack([(1 - sil) * speaking + sil * 0.25, np.full(len(a), 0.6)], 1)  # rests parted at 0.25
    target = torch.from_numpy(np.concatenate([2.0 * lips[:, :1], np.zeros((len(a), 4))], 1)).float()
    info = vm.fit(w, lips, target, np.arange(len(a)), ridge=0.0)
    assert vm.rest_fitted and info["silent_frames"] > 30 and info["rest_lips_z"][0] > 0.5
    jaw, _ = vm(w)
    pause, speech = sil > 0.99, sil < 0.01
    assert pause.sum() >= 8 and speech.sum() > 200
    np.testing.assert_allclose(jaw[pause, 0].numpy(), 0.5, atol=0.01)  # 2 x 0.25: parted, where the table closes
    # speech follows the phones; its level is off by less than a spread (the channels are
    # calibrated over every frame, the parted pauses included)
    assert np.corrcoef(jaw[speech, 0].numpy(), target[speech, 0].numpy())[0, 1] > 0.99
    assert np.abs(jaw[speech, 0].numpy() - target[speech, 0].numpy()).mean() < 0.6 * target[speech, 0].std()
    # without the pauses' calibration (an older avatar) the table's nearly closed mouth comes back
    vm.rest_fitted.zero_()
    assert vm(w)[0][pause, 0].mean() < 0.35


def test_viseme_columns_of_mel_plus_phoneme():
    from gstalk.audio.visemes import VisemeMotion

    vm = VisemeMotion("mel+phoneme", feature_dim("mel+phoneme"), 32, 2)
    ids = np.zeros(200, int)
    ids[60:120] = VISEMES.index("aa")
    vis = _viseme_windows(ids)
    both = torch.cat([torch.randn(vis.shape[0], 32, 83), vis], -1)  # mel first, then the visemes
    np.testing.assert_allclose(vm.channels(both).numpy(), VisemeMotion("phoneme", 15, 32, 2).channels(vis).numpy(),
                               atol=1e-6)


def test_fit_warns_when_the_clips_phones_barely_follow_its_mouth(monkeypatch):
    """Where the phones' opening channel hardly follows the mouth's measured opening (hill_8s:
    +0.18, and its lips from audio did worse than a still mouth), the fit says that lips from
    new audio will not be in time with the words; where they follow it, it does not."""
    from types import SimpleNamespace

    import gstalk.train.motion as motion
    from gstalk.audio.visemes import VisemeMotion

    rng = np.random.default_rng(2)
    ids = np.repeat(rng.integers(1, len(VISEMES), 40), 10)
    w = _viseme_windows(ids)
    n = w.shape[0]
    a = VisemeMotion("phoneme", len(VISEMES), 32, 2).channels(w).numpy().astype(np.float64)
    ds = SimpleNamespace(landmarks=lambda: {"valid": np.ones(n, bool), "lmk": np.zeros((n, 478, 3))})
    jaw, expr = np.zeros((n, 3)), np.zeros((n, 2))
    for lips, warned in ((np.stack([0.3 * a[:, 0], 0.6 + 0.1 * a[:, 1]], 1), False),
                         (np.stack([rng.normal(0.1, 0.03, n), rng.normal(0.6, 0.02, n)], 1), True)):
        monkeypatch.setattr(motion, "lip_measures", lambda lmk, lips=lips: lips)
        logs: list[str] = []
        vm = VisemeMotion("phoneme", len(VISEMES), 32, 2)
        assert motion.fit_visemes(vm, ds, w, jaw, expr, np.arange(n), log=logs.append) == "visemes"
        assert any("only weakly" in m for m in logs) == warned, logs
