"""Lips from audio: phone timings (recognised words, force-aligned, on speech with known
phones from espeak-ng), the coarticulated viseme model and its calibration to a clip, and
what bad audio gives."""

import numpy as np
import pytest
import torch

import espeak
from gstalk.audio.phones import PhoneTimeline, phone_timeline
from gstalk.audio.visemes import (LAGS, PAUSE_PULL, PHONE_TO_VISEME, POST, PRE, PRE_WINDOWS, SIL, VISEMES,
                                  VisemeMotion, dominance, rest_mouth, viseme_segments)
from gstalk.errors import InputError

needs_espeak = pytest.mark.skipif(not espeak.available(), reason="needs espeak-ng (Debian package espeak-ng)")
SR = 16000


def _say(text: str, voice: str = "en-us+f2"):
    import librosa

    a, sr, events = espeak.speak(text, voice)
    a = librosa.resample(a, orig_sr=sr, target_sr=SR)
    return a, espeak.phones(events, len(a) / SR)


def _viseme_frames(phones, duration: float) -> np.ndarray:
    """[duration at 100 Hz] viseme class per 10 ms (0 = silence)."""
    v = np.zeros(int(duration * 100), int)
    for p, s, e in phones:
        v[int(round(s * 100)):int(round(e * 100))] = VISEMES.index(PHONE_TO_VISEME.get(p, "sil"))
    return v


def _sequence(phones) -> list[str]:
    s = [PHONE_TO_VISEME.get(p, "sil") for p, _, _ in phones]
    return [x for i, x in enumerate(s) if i == 0 or x != s[i - 1]]


def _edit_distance(a, b) -> int:
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, y in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
    return d[-1]


SENTENCES = ["My mother bought a big blue bag from the market before the bus came back.",
             "We will meet at the museum tomorrow morning and then visit the park."]


@needs_espeak
@pytest.mark.parametrize("text", SENTENCES)
def test_aligned_phones_recover_known_phones_and_their_timing(text):
    """espeak-ng says which phones it spoke and when: the recognised words' aligned phones
    give back the viseme sequence (edit distance under a third of its length), most speech
    frames' viseme class, and the lips' closures (p, b, m) within 30 ms."""
    audio, truth = _say(text)
    dur = len(audio) / SR
    tl = phone_timeline(audio)
    assert tl.source == "words" and len(tl.words) >= 8 and not tl.notes
    t_frames = _viseme_frames(truth, dur)
    speech = t_frames > 0
    agree = (_viseme_frames(tl.phones, dur)[speech] == t_frames[speech]).mean()
    assert agree > 0.5, agree
    seq_t, seq_a = _sequence(truth), _sequence(tl.phones)
    assert _edit_distance(seq_t, seq_a) < len(seq_t) / 3, (seq_t, seq_a)
    closures = [s for p, s, _ in truth if PHONE_TO_VISEME.get(p) == "PP"]
    found = np.array([s for p, s, _ in tl.phones if PHONE_TO_VISEME.get(p) == "PP"])
    assert len(closures) >= 5 and len(found)
    err = np.array([np.abs(found - t).min() for t in closures])
    assert np.median(err) < 0.03, err


@needs_espeak
def test_recognised_words_beat_free_phones_on_speech_frames():
    """Free phone decoding, the fallback, gets fewer speech frames' viseme class right than the
    recognised words' aligned phones, over all the sentences together (one sentence's margin
    moves by a few points with the CPU's numerics where a word is misrecognised)."""
    from gstalk.audio.phones import free_phones

    hits = np.zeros(2)
    frames = 0
    for text in SENTENCES:
        audio, truth = _say(text)
        dur = len(audio) / SR
        t_frames = _viseme_frames(truth, dur)
        speech = t_frames > 0
        free = [p for p in free_phones(audio) if p[0] != "SIL"]
        for i, phones in enumerate((phone_timeline(audio).phones, free)):
            hits[i] += (_viseme_frames(phones, dur)[speech] == t_frames[speech]).sum()
        frames += speech.sum()
    words, free = hits / frames
    assert words > free + 0.04, (words, free)


@needs_espeak
def test_speech_not_in_english_falls_back_to_free_phones_with_a_warning():
    audio, _ = _say("Der schnelle braune Fuchs springt über den faulen Hund und läuft zum Fluss.", "de")
    tl = phone_timeline(audio)
    assert tl.source == "phones" and tl.words == [] and len(tl.speech()) > 10
    assert any("not recognised as English" in n for n in tl.notes)


@needs_espeak
def test_the_same_audio_gives_the_same_phones_whatever_was_decoded_before():
    """pocketsphinx's decoders carry state from one utterance to the next; the timeline and
    the free phones of one recording must not depend on what this process decoded before."""
    from gstalk.audio.phones import free_phones

    a, _ = _say("My mother bought a big blue bag from the market before the bus came back.")
    b, _ = _say("The museum opened at nine and people walked slowly past the paintings.")
    first, free = phone_timeline(a), free_phones(a)
    phone_timeline(b), free_phones(b), free_phones(a)
    again = phone_timeline(a)
    assert again.phones == first.phones and again.words == first.words
    assert free_phones(a) == free


def test_audio_without_speech_rests_the_mouth():
    """Silence, noise and music hold no speech: no phones, a note saying so (never a crash),
    and the viseme model gives its resting mouth, the class 'sil'. (The voice-activity
    detector leaves torch's thread count alone: silero's own package sets it to one.)"""
    threads = torch.get_num_threads()
    rng = np.random.default_rng(0)
    t = np.arange(5 * SR) / SR
    f0 = np.array([440.0, 523.3, 659.3, 587.3])[(t * 2).astype(int) % 4]  # a note every 0.5 s
    phase = 2 * np.pi * np.cumsum(f0) / SR
    music = sum(0.2 * np.sin(h * phase) / h for h in (1, 2, 3)) * np.exp(-(t % 0.5) * 4)  # plucked
    music = music.astype(np.float32)
    for name, audio in (("silence", np.zeros(3 * SR, np.float32)), ("noise", rng.normal(0, 0.1, 5 * SR)),
                        ("music", music)):
        tl = phone_timeline(np.asarray(audio, np.float32))
        assert tl.phones == [] and tl.notes, name
        w = dominance(tl, 50, 25.0, 0.08)
        assert np.allclose(w[:, SIL], 1.0), name
    assert torch.get_num_threads() == threads


def _random_timeline(seconds: float, seed: int, pause_every: float = 2.0) -> PhoneTimeline:
    """Phones of 60-160 ms drawn from every class, with a 400 ms pause every ``pause_every`` s."""
    rng = np.random.default_rng(seed)
    names = [p for p in PHONE_TO_VISEME]
    phones, t, next_pause = [], 0.2, pause_every
    while t < seconds - 0.3:
        if t >= next_pause:
            t += 0.4
            next_pause += pause_every
            continue
        d = rng.uniform(0.06, 0.16)
        phones.append((str(rng.choice(names)), t, t + d))
        t += d
    return PhoneTimeline(phones, seconds, "words")


def test_dominance_blends_neighbours_and_leads_the_sound():
    tl = PhoneTimeline([("AA", 0.5, 0.7), ("P", 0.7, 0.76), ("AA", 0.76, 0.96), ("T", 0.96, 1.0),
                        ("UW", 1.0, 1.2)], 2.0)
    assert [c for c, _, _ in viseme_segments(tl)] == [0, VISEMES.index("aa"), VISEMES.index("PP"),
                                                     VISEMES.index("aa"), VISEMES.index("DD"),
                                                     VISEMES.index("ou"), 0]
    fps = 100.0
    w = dominance(tl, 200, fps, 0.0)
    assert np.allclose(w.sum(1), 1.0) and (w >= 0).all()
    pp, dd, aa = VISEMES.index("PP"), VISEMES.index("DD"), VISEMES.index("aa")
    # the strong closure owns its segment; the weak tongue consonant leaves the lips to the vowels
    assert w[72, pp] > 0.8 and w[98, dd] < 0.5 and w[98, aa] + w[98, VISEMES.index("ou")] > 0.5
    # the mouth shapes before the sound: the rounded vowel (1.0 s) has a share before it starts
    ou = VISEMES.index("ou")
    assert w[95, ou] > 0.1 and w[40, aa] > 0.05 and w[150, SIL] > 0.9
    # a lag moves everything earlier by itself
    w2 = dominance(tl, 200, fps, 0.05)
    np.testing.assert_allclose(w2[:150], w[5:155], atol=1e-9)
    # beyond the audio's end: at rest
    assert np.allclose(dominance(tl, 300, fps, 0.0)[250:, SIL], 1.0)


def test_calibration_recovers_a_speakers_own_visemes_and_lag():
    """A speaker whose jaw and expression follow the dominance-blended phones with their own
    targets per class and a 100 ms lead: the calibrated model finds that lead and those
    targets (the frequent classes), keeps the non-driven expression at its mean, and predicts
    frames it was not fitted on."""
    fps, seconds = 25.0, 30.0
    tl = _random_timeline(seconds, 0)
    n = int(seconds * fps)
    rng = np.random.default_rng(1)
    true = rng.normal(0, 1, (len(VISEMES), 5))
    true[:, 4] = 0.0
    y = dominance(tl, n, fps, 0.10) @ true + rng.normal(0, 0.02, (n, 5))
    y[:, 4] = 0.3 + rng.normal(0, 0.5, n)  # an expression the lips do not drive: noise
    lips = np.stack([y[:, 0], y[:, 1]], 1)
    vm = VisemeMotion(2)
    frames = np.arange(0, int(0.8 * n))
    info = vm.fit(tl, fps, y, lips, frames, driven=np.array([True, False]), ridge=1e-3)
    assert float(vm.lag) == pytest.approx(0.10, abs=0.011) and info["lag_s"] == pytest.approx(0.10, abs=0.011)
    assert info["table_classes"] == [] and info["phones_vs_opening"] > 0.95
    assert info["gain"] > 0.9 and float(vm.gain) == pytest.approx(info["gain"])  # predictable: full amplitude
    t = vm.targets.numpy()
    assert float(vm.pre_s) == 0.0 == float(vm.post_s)  # nothing of its own before or after speech
    np.testing.assert_allclose(t[1:PRE, :4], true[1:PRE, :4], atol=0.15)  # the speech classes: their own
    # the pauses' class: k pauses' shape pulled PAUSE_PULL pauses' worth towards the rest mouth
    k = sum(1 for c, s, e in viseme_segments(tl) if c == SIL and e <= frames[-1] / fps)
    rest = vm.mean.numpy()[:4]
    np.testing.assert_allclose(t[SIL, :4], rest + k / (k + PAUSE_PULL) * (true[SIL, :4] - rest), atol=0.15)
    np.testing.assert_allclose(t[:, 4], y[frames, 4].mean(), atol=1e-9)  # not driven: the clip's mean
    jaw, expr = vm(tl, n, fps)
    held = np.arange(int(0.8 * n), n)
    assert np.corrcoef(jaw[held, 0].numpy(), y[held, 0])[0, 1] > 0.95
    assert expr.shape == (n, 2) and torch.allclose(expr[:, 1], expr[0, 1].expand(n))


def test_a_few_pauses_pull_their_mouth_towards_the_rest():
    """Two pauses, the mouth shut in one and wide open (a breath) in the other: the pause's
    target stays near the rest mouth, since two pauses say little of this person's pauses;
    twenty pauses that all hold the same open mouth give the pause that mouth."""
    fps = 25.0
    rng = np.random.default_rng(7)

    def clip(seconds, pause_every, pause_mouth):
        tl = _random_timeline(seconds, 8, pause_every)
        n = int(seconds * fps)
        true = rng.normal(0, 0.3, (len(VISEMES), 3))
        y = dominance(tl, n, fps, 0.08) @ true
        pauses = [(s, e) for c, s, e in viseme_segments(tl) if c == SIL and s > 0.1 and e < seconds - 0.1]
        for i, (s, e) in enumerate(pauses):
            y[int(np.ceil((s - 0.08) * fps)):int(np.ceil((e - 0.08) * fps)), 0] = pause_mouth(i)
        y = np.concatenate([y, np.zeros((n, 1))], 1)
        vm = VisemeMotion(1)
        vm.fit(tl, fps, y, y[:, :2], np.arange(n), driven=np.array([False]), ridge=1e-3)
        return len(pauses), vm.targets[SIL, 0].item(), vm.mean[0].item()

    k, sil, rest = clip(5.5, 2.0, lambda i: (0.0, 3.0)[i % 2])  # shut, then wide open
    assert k == 2 and abs(sil - rest) < 0.3 * 1.5  # not the pauses' own mean (1.5) nor either of them
    k, sil, rest = clip(44.0, 2.0, lambda i: 2.0)
    assert k >= 20 and abs(rest - 2.0) > 1.0 and rest + 0.75 * (2.0 - rest) < sil < 2.1  # most of the way


def test_the_rest_mouth_is_the_lips_median_not_their_mean():
    """Frames that mostly hold one mouth and, for a fifth of them, a laugh far from it: the
    rest mouth stays at the usual mouth (the mean moves a fifth of the way to the laugh), and
    its lip points are nearer the frames in the sum of distances than the mean's."""
    rng = np.random.default_rng(9)
    proj = rng.normal(0, 1, (4, 3 * 5))  # 4 outputs moving 5 lip points
    usual, laugh = np.zeros(4), np.array([3.0, -2.0, 1.0, 0.5])
    y = np.where((np.arange(200) % 5 == 0)[:, None], laugh, usual) + rng.normal(0, 0.05, (200, 4))
    m = rest_mouth(y, proj)
    np.testing.assert_allclose(m, usual, atol=0.05)

    def dist(c):
        return np.linalg.norm(((y - c) @ proj).reshape(200, 5, 3), axis=-1).mean()

    assert dist(m) < dist(y.mean(0))
    np.testing.assert_allclose(rest_mouth(y, None), y.mean(0))  # without the lips' map: the mean


def test_classes_the_clip_lacks_keep_the_phonetic_table():
    """A clip with only open vowels and closures: those classes take the clip's mouth, the
    others the table's order (a rounded vowel opens less than an open one)."""
    fps, seconds = 25.0, 20.0
    rng = np.random.default_rng(2)
    phones, t = [], 0.2
    while t < seconds - 0.3:
        p = "AA" if rng.random() < 0.5 else "M"
        d = rng.uniform(0.08, 0.2)
        phones.append((p, t, t + d))
        t += d
    tl = PhoneTimeline(phones, seconds, "words")
    n = int(seconds * fps)
    w = dominance(tl, n, fps, 0.08)
    opening = w[:, VISEMES.index("aa")] * 0.3 + 0.05
    lips = np.stack([opening, 0.6 - 0.2 * opening], 1)
    y = np.concatenate([2.0 * lips[:, :1], np.zeros((n, 2)), np.zeros((n, 1))], 1)
    vm = VisemeMotion(1)
    info = vm.fit(tl, fps, y, lips, np.arange(n))
    assert {"aa", "PP"} <= set(info["own_classes"]) and "ou" in info["table_classes"]
    jaw_open = vm.targets[:, 0].numpy()
    assert jaw_open[VISEMES.index("aa")] > jaw_open[VISEMES.index("PP")] + 0.3
    assert jaw_open[VISEMES.index("aa")] > jaw_open[VISEMES.index("ou")] > jaw_open[VISEMES.index("PP")]


def test_the_lag_stays_within_its_bounds_and_short_clips_are_refused():
    fps = 25.0
    tl = _random_timeline(12.0, 3)
    n = int(12 * fps)
    y = dominance(tl, n, fps, 0.6) @ np.random.default_rng(4).normal(0, 1, (len(VISEMES), 3))  # 600 ms: out of bounds
    vm = VisemeMotion(0)
    vm.fit(tl, fps, y, y[:, :2], np.arange(n))
    assert min(LAGS) - 1e-6 <= float(vm.lag) <= max(LAGS) + 1e-6
    with pytest.raises(InputError, match="at least 8"):
        VisemeMotion(0).fit(tl, fps, y, y[:, :2], np.arange(5))
    with pytest.raises(InputError, match="never calibrated"):
        VisemeMotion(0)(tl, n, fps)


def test_fit_warns_when_the_clips_phones_barely_follow_its_mouth(monkeypatch):
    """Where the mouth's opening predicted from the phones hardly follows the measured one on
    held-back frames, the fit says that lips from new audio will not be in time with the
    words; where it follows it, it does not."""
    from types import SimpleNamespace

    import gstalk.train.motion as motion

    fps = 25.0
    tl = _random_timeline(16.0, 5)
    n = int(16 * fps)
    rng = np.random.default_rng(6)
    follow = dominance(tl, n, fps, 0.08) @ rng.normal(0, 1, len(VISEMES))
    for opening, warned in ((follow, False), (rng.normal(0, 1, n), True)):
        lmk = np.zeros((n, 478, 3))
        lips = np.stack([0.1 + 0.02 * opening, np.full(n, 0.6)], 1)
        ds = SimpleNamespace(fps=fps, landmarks=lambda: {"valid": np.ones(n, bool), "lmk": lmk})
        jaw = np.zeros((n, 3))
        jaw[:, 0] = lips[:, 0]
        logs: list[str] = []
        monkeypatch.setattr(motion, "lip_measures", lambda _lmk, lips=lips: lips)
        assert motion.fit_visemes(VisemeMotion(2), ds, tl, jaw, np.zeros((n, 2)), np.arange(n),
                                  log=logs.append) == "visemes"
        assert any("only weakly" in m for m in logs) == warned, logs
        assert any("leads the sound by" in m for m in logs)
        # a mouth the phones do not predict moves little from the clip's mean, one they do, fully
        vm = VisemeMotion(2)
        vm.fit(tl, fps, np.concatenate([jaw, np.zeros((n, 2))], 1), lips, np.arange(n))
        assert (float(vm.gain) < 0.5) if warned else (float(vm.gain) > 0.9), float(vm.gain)


def test_calibration_weighs_the_lag_by_what_moves_the_lips():
    """A speaker whose lips follow the phones through an expression coefficient, 120 ms ahead,
    while the jaw's tracked opening is unrelated noise: told how far each output moves the
    lips, the calibration finds the lead and keeps the amplitude; judged on the jaw alone, it
    does not find the lead."""
    fps, seconds = 25.0, 24.0
    tl = _random_timeline(seconds, 7)
    n = int(seconds * fps)
    rng = np.random.default_rng(8)
    y = np.zeros((n, 5))
    y[:, 0] = rng.normal(0, 0.05, n)  # the jaw: noise
    y[:, 3] = dominance(tl, n, fps, 0.12) @ rng.normal(0, 1, len(VISEMES))  # the lips' expression
    lips = np.stack([0.1 + 0.02 * y[:, 3], np.full(n, 0.6)], 1)
    lip_map = np.zeros((5, 6))
    lip_map[0, 1] = 0.01  # the jaw hardly moves these lips
    lip_map[3, :] = 1.0
    vm = VisemeMotion(2)
    info = vm.fit(tl, fps, y, lips, np.arange(n), ridge=1e-3, lip_map=lip_map)
    assert info["lag_s"] == pytest.approx(0.12, abs=0.011) and info["gain"] > 0.9, info
    blind = VisemeMotion(2).fit(tl, fps, y, lips, np.arange(n), ridge=1e-3)
    assert blind["lag_s"] != pytest.approx(0.12, abs=0.011) or blind["gain"] < 0.5, blind


def test_lip_jacobian_follows_the_head_models_mouth():
    """How far the lip landmarks move per unit of jaw and expression: opening the jaw moves
    the lips by millimetres, the lip expressions move them more than the others do."""
    from gstalk.avatar.init import lip_jacobian, mouth_expressions
    from gstalk.head.flame import load_head_model

    head = load_head_model()
    shape = torch.zeros(head.n_shape)
    J = lip_jacobian(head, shape, np.zeros(3), np.zeros(head.n_expr))
    from gstalk.face.regions import LIPS

    assert J.shape[0] == 3 + head.n_expr and J.shape[1] % 3 == 0 and J.shape[1] // 3 <= len(LIPS)
    per = np.linalg.norm(J.reshape(len(J), -1, 3), axis=-1).mean(1)  # mm per unit, mean over the lip points
    assert 10 < per[0] < 200, per[0]  # opening the jaw (about x): tens of mm per radian at the lips
    d = J[0].reshape(-1, 3)
    assert np.linalg.norm(d[:, 0]) < 0.3 * np.linalg.norm(d), d  # up, down and back, not sideways
    driven = mouth_expressions(head, shape).numpy()
    assert driven.any() and (~driven).any()
    assert per[3:][driven].mean() > 2 * per[3:][~driven].mean()
    # where the mouth is already open the jaw moves the lips as much (a rotation, near linear)
    J2 = lip_jacobian(head, shape, np.array([0.15, 0, 0]), np.zeros(head.n_expr))
    assert np.linalg.norm(J2[0]) == pytest.approx(np.linalg.norm(J[0]), rel=0.25)


def test_calibration_finds_a_mouth_that_readies_before_speech():
    """A speaker who opens the mouth 300 ms before each stretch of speech (a breath), and
    otherwise rests it in pauses: the calibration finds that window and that shape, the
    pauses' other frames keep the resting mouth, and a short gap between words gets neither."""
    fps, seconds = 25.0, 30.0
    tl = _random_timeline(seconds, 9, pause_every=1.5)
    n = int(seconds * fps)
    rng = np.random.default_rng(10)
    true = rng.normal(0, 1, (len(VISEMES), 3))
    true[SIL] = [0.0, 0.0, 0.0]
    true[PRE] = [2.0, -1.0, 0.5]
    y = dominance(tl, n, fps, 0.08, pre_s=0.3) @ true + rng.normal(0, 0.02, (n, 3))
    vm = VisemeMotion(0)
    info = vm.fit(tl, fps, y, y[:, :2], np.arange(n), ridge=1e-3)
    assert 0.3 in PRE_WINDOWS and info["pre_s"] == pytest.approx(0.3) and float(vm.pre_s) == pytest.approx(0.3)
    assert info["lag_s"] == pytest.approx(0.08, abs=0.011) and "pre" in info["own_classes"]
    assert info["post_s"] == 0.0 and "post" not in info["own_classes"] + info["table_classes"]
    # k pauses' shapes, each pulled PAUSE_PULL pauses' worth towards the rest mouth
    rest = vm.mean.numpy()
    for c in (PRE, SIL):
        k = sum(1 for v, _, _ in viseme_segments(tl, pre_s=0.3) if v == c)
        np.testing.assert_allclose(vm.targets[c].numpy(), rest + k / (k + PAUSE_PULL) * (true[c] - rest), atol=0.15)
    segs = viseme_segments(PhoneTimeline([("AA", 1.0, 1.2), ("M", 1.25, 1.3)], 2.0), pre_s=0.3)
    assert [c for c, _, _ in segs] == [SIL, PRE, VISEMES.index("aa"), SIL, VISEMES.index("PP"), SIL]
    assert segs[1][1:] == pytest.approx((0.7, 1.0))
    segs = viseme_segments(PhoneTimeline([("AA", 1.0, 1.2), ("M", 1.25, 1.3)], 2.0), pre_s=0.3, post_s=0.3)
    assert [c for c, _, _ in segs] == [SIL, PRE, VISEMES.index("aa"), SIL, VISEMES.index("PP"), POST, SIL]
    assert segs[5][1:] == pytest.approx((1.3, 1.6)) and segs[6][1:] == pytest.approx((1.6, 2.0))


def test_the_pause_classes_are_the_lip_models_own_not_the_audio_features():
    """The audio features keep one channel per phone class (15, what every avatar's audio
    encoder reads); 'pre' and 'post' exist only in the lip model."""
    from gstalk.audio.features import feature_dim, viseme_features
    from gstalk.audio.visemes import PHONE_CLASSES

    assert len(PHONE_CLASSES) == 15 and "pre" not in PHONE_CLASSES and "post" not in PHONE_CLASSES
    assert feature_dim("phoneme") == 15 and feature_dim("mel+phoneme") == 83 + 15
    f = viseme_features(PhoneTimeline([("AA", 0.1, 0.2)], 0.5), 50)
    assert f.shape == (50, 15) and f[15, VISEMES.index("aa")] == 1 and f[40, SIL] == 1


def test_the_fit_takes_free_phones_only_where_they_predict_the_lips_clearly_better(monkeypatch):
    """Two timelines of one clip, one that the mouth follows and one it does not (the
    recognised words of a voice the recogniser mistakes): the chooser takes the one that
    predicts held-back frames' lips, the words on a tie, and the words where the clip is too
    short to tell."""
    from types import SimpleNamespace

    import gstalk.train.motion as motion

    fps, seconds = 25.0, 24.0
    n = int(seconds * fps)
    good, bad = _random_timeline(seconds, 11), _random_timeline(seconds, 12)
    rng = np.random.default_rng(13)
    jaw = np.zeros((n, 3))
    jaw[:, 0] = dominance(good, n, fps, 0.08) @ rng.normal(0, 1, len(VISEMES)) + rng.normal(0, 0.05, n)
    lips = np.stack([0.1 + 0.02 * jaw[:, 0], np.full(n, 0.6)], 1)
    monkeypatch.setattr(motion, "lip_measures", lambda _lmk: lips)
    ds = SimpleNamespace(fps=fps, landmarks=lambda: {"valid": np.ones(n, bool), "lmk": np.zeros((n, 478, 3))})
    expr = np.zeros((n, 2))
    train = np.arange(int(0.8 * n))
    pick, line = motion.choose_phones(ds, bad, good, jaw, expr, train, 2)
    assert pick == "phones" and "free phone decoding" in line
    assert motion.choose_phones(ds, good, bad, jaw, expr, train, 2)[0] == "auto"
    assert motion.choose_phones(ds, good, good, jaw, expr, train, 2)[0] == "auto"  # a tie: the words
    assert motion.choose_phones(ds, bad, good, jaw, expr, train[:100], 2)[0] == "auto"  # 4 s: too few to tell


@needs_espeak
def test_free_phone_decoding_asked_for_outright():
    from gstalk.errors import GstalkError

    audio, _ = _say(SENTENCES[0])
    tl = phone_timeline(audio, source="phones")
    assert tl.source == "phones" and tl.words == [] and not tl.notes and len(tl.speech()) > 20
    with pytest.raises(GstalkError, match="unknown phone source"):
        phone_timeline(audio, source="words")


def test_the_avatars_choice_of_phones_decodes_every_audio_that_drives_it(tmp_path, monkeypatch):
    """An avatar whose fit chose free phones ('phones' in config.json) gets free phones for
    any audio that drives it (render, eval, the viewer), an older or 'auto' one the words."""
    import gstalk.audio.features as features
    import gstalk.avatar.conditions as conditions
    from gstalk.avatar.io import load_avatar, save_avatar
    from tinyavatar import make_avatar

    asked = []

    def fake(audio, detector="vad", source="auto"):
        asked.append(source)
        return PhoneTimeline([("AA", 0.1, 0.3)], len(audio) / SR, "phones" if source == "phones" else "words")

    monkeypatch.setattr(features, "phone_timeline", fake)
    monkeypatch.setattr(conditions, "phone_timeline", fake)
    av, motion = load_avatar(make_avatar(tmp_path / "av", n_frames=6), "cpu")
    audio = np.random.default_rng(0).normal(0, 0.1, SR).astype(np.float32)
    av.visemes.fitted.fill_(1.0)  # a calibrated viseme model needs the timeline
    assert av.cfg.phones == "auto"
    conditions.audio_features(av, audio, 25, 25.0)
    av.cfg.phones = "phones"
    save_avatar(av, tmp_path / "av2", motion)
    again, _ = load_avatar(tmp_path / "av2", "cpu")
    assert again.cfg.phones == "phones"
    feats = conditions.audio_features(again, audio, 25, 25.0)
    assert asked[0] == "auto" and set(asked[1:]) == {"phones"} and feats.timeline.source == "phones"


def test_the_opening_correlations_interval_covers_the_truth_with_neighbouring_frames_counted_as_fewer():
    from gstalk.eval.evaluate import CORR_LEVEL, corr_interval

    rng = np.random.default_rng(0)

    def pair(n, phi, rho):  # two AR(1) series whose innovations, and so the series, correlate at rho
        e = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=n + 50)
        x = np.zeros_like(e)
        for t in range(1, len(e)):
            x[t] = phi * x[t - 1] + e[t]
        return x[50:, 0], x[50:, 1]

    rho, hits, widths = 0.5, [], {}
    for phi in (0.0, 0.7):
        for _ in range(300):
            a, b = pair(46, phi, rho)  # portrait_man_20s's held-out tail: 46 frames
            lo, hi = corr_interval(a, b)
            assert lo < np.corrcoef(a, b)[0, 1] < hi
            widths.setdefault(phi, []).append(hi - lo)
            if phi:
                hits.append(lo <= rho <= hi)
    assert abs(np.mean(hits) - CORR_LEVEL) < 0.06, np.mean(hits)  # slow mouths: still the stated coverage
    assert np.mean(widths[0.7]) > 1.4 * np.mean(widths[0.0])  # ...because their frames count as fewer
    assert all(np.isnan(corr_interval(np.ones(20), rng.normal(size=20))))  # a still mouth: undefined
    assert all(np.isnan(corr_interval(np.arange(3.0), np.arange(3.0))))
