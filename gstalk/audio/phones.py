"""Phone timings of any speech, offline, from pocketsphinx's shipped US-English models.

:func:`phone_timeline` gives, for 16 kHz mono audio, the phones (ARPAbet, stress removed;
``SIL`` for pauses) with their start and end times:

1. **Pauses** (:func:`speech_regions`): where there is speech at all, by the silero
   voice-activity detector (its model ships in the silero-vad wheel and runs on torch; it
   finds no speech in music or noise, which loudness does). The audio is cut at its pauses
   into utterances of at most :data:`MAX_UTTERANCE_S`.
2. **Words** (:func:`recognise`): each utterance is recognised with pocketsphinx's English
   acoustic model, language model and pronouncing dictionary, then the phones of the
   recognised words are force-aligned to it (a second, sub-word alignment pass), which
   times each phone far better than free phone decoding does.
3. **Fallback** (:func:`free_phones`): where recognition fails (recognised words that
   cover under :data:`MIN_COVERAGE` of the speech: another language, mumbling), free phone
   decoding with the phone language model; the timeline says so in ``notes``, which the
   caller shows the user. ``source='phones'`` asks for free phone decoding outright: an
   avatar whose person's voice the recognised words fit worse (an accent, another language
   the recogniser mistakes for English words) records that choice (see
   :func:`gstalk.train.motion.choose_phones`).

Audio without speech gives a timeline of silence (``source`` 'none'): the lips rest.
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gstalk.errors import GstalkError

SAMPLE_RATE = 16000
FRAME_S = 0.01  # pocketsphinx's frame
MAX_UTTERANCE_S = 20.0  # longer stretches of speech are cut at their quietest point
MIN_PAUSE_S = 0.3  # pauses at least this long separate utterances
MIN_COVERAGE = 0.78  # recognised words must cover this much of the speech, else free phones (docs/benchmarks.md)
EDGE_S = 0.15  # audio kept either side of an utterance (the decoder needs some silence)
_LOCK = threading.Lock()  # the voice-activity detector is shared (the viewer decodes uploads in its threads)
PHONES = ("AA AE AH AO AW AY B CH D DH EH ER EY F G HH IH IY JH K L M N NG OW OY P R S SH T TH UH UW V W Y Z "
          "ZH").split()


@dataclass
class PhoneTimeline:
    """Phones ``(name, start s, end s)`` in time order (gaps are silence), the recognised
    words, where they came from ('words', 'phones', 'words+phones' or 'none') and what the
    user should be told about it."""

    phones: list[tuple[str, float, float]]
    duration: float
    source: str = "none"
    words: list[tuple[str, float, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def speech(self) -> list[tuple[str, float, float]]:
        """The phones that are not silence."""
        return [p for p in self.phones if p[0] != "SIL"]


def _pcm(audio: np.ndarray) -> bytes:
    return (np.clip(np.asarray(audio, np.float64), -1, 1) * 32767).astype("<i2").tobytes()


def _model_dir() -> Path:
    try:
        from pocketsphinx import get_model_path
    except ImportError as e:
        raise GstalkError(f"pocketsphinx is not installed ({e}); it provides the offline speech recogniser") from None
    return Path(get_model_path()) / "en-us"


def _word_decoder():
    """A new word decoder. pocketsphinx's decoders keep state from one utterance to the next
    (the same audio decoded again gives other phones and times), so each timeline gets its
    own: the same audio always gives the same lips."""
    from pocketsphinx import Decoder

    mp = _model_dir()
    return Decoder(hmm=str(mp / "en-us"), lm=str(mp / "en-us.lm.bin"), dict=str(mp / "cmudict-en-us.dict"),
                   samprate=SAMPLE_RATE, loglevel="FATAL")


def _phone_decoder():
    """A new free-phone decoder (see :func:`_word_decoder`)."""
    from pocketsphinx import Decoder

    mp = _model_dir()
    return Decoder(hmm=str(mp / "en-us"), allphone=str(mp / "en-us-phone.lm.bin"), lw=2.0, beam=1e-20, pbeam=1e-20,
                   samprate=SAMPLE_RATE, loglevel="FATAL")


def _clean_phone(name: str) -> str:
    p = re.sub(r"\d", "", name.upper())
    return p if p in PHONES else "SIL"


def free_phones(audio: np.ndarray, dec=None) -> list[tuple[str, float, float]]:
    """Free phone decoding (any sequence of English phones): ``(phone, start s, end s)``;
    ``dec``: the decoder to use (by default a new one)."""
    dec = dec if dec is not None else _phone_decoder()
    dec.start_utt()
    dec.process_raw(_pcm(audio), full_utt=True)
    dec.end_utt()
    return [(_clean_phone(s.word), s.start_frame * FRAME_S, (s.end_frame + 1) * FRAME_S) for s in dec.seg()]


def recognise(audio: np.ndarray, dec=None) -> tuple[list[tuple[str, float, float]], list[tuple[str, float, float]]]:
    """English words recognised in ``audio`` and the force-aligned phones of those words:
    (words, phones), each ``(name, start s, end s)``; two empty lists where nothing was
    recognised; ``dec``: the decoder to use (by default a new one)."""
    dec = dec if dec is not None else _word_decoder()
    pcm = _pcm(audio)
    dec.start_utt()
    dec.process_raw(pcm, full_utt=True)
    dec.end_utt()
    hyp = dec.hyp()
    if hyp is None or not hyp.hypstr.strip():
        return [], []
    # the second pass: phone (sub-word) alignment of the recognised words
    try:
        dec.set_alignment()
        dec.start_utt()
        dec.process_raw(pcm, full_utt=True)
        dec.end_utt()
        al = dec.get_alignment()
    except RuntimeError:  # the aligner can fail on odd input; recognition then counts as failed
        al = None
    finally:
        dec.activate_search()  # back to recognition for the next utterance
    if al is None:
        return [], []
    words, phones = [], []
    for w in al:
        name = re.sub(r"\(\d+\)$", "", w.name)
        if name.startswith("<") or name.startswith("["):  # <s>, </s>, <sil>, [NOISE]...
            continue
        words.append((name, w.start * FRAME_S, (w.start + w.duration) * FRAME_S))
        for p in w:
            phones.append((_clean_phone(p.name), p.start * FRAME_S, (p.start + p.duration) * FRAME_S))
    return words, phones


# ---------------------------------------------------------------- pauses
def _rms_db(audio: np.ndarray, hop: int = 160, win: int = 400) -> np.ndarray:
    import librosa

    rms = librosa.feature.rms(y=np.asarray(audio, np.float32), frame_length=win, hop_length=hop, center=True)[0]
    return 20 * np.log10(rms + 1e-9)


def energy_speech(audio: np.ndarray, floor_db: float = 30.0) -> np.ndarray:
    """[A] bool per 10 ms: louder than ``floor_db`` below the loudest frames (the 99th
    percentile), smoothed over 100 ms."""
    db = _rms_db(audio)
    if not len(db):
        return np.zeros(0, bool)
    on = db > np.percentile(db, 99) - floor_db
    return _close_gaps(on, 10)


def vad_speech(audio: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """[A] bool per 10 ms: speech by the silero voice-activity detector (its model ships in
    the silero-vad wheel and runs on torch)."""
    import torch

    model = _silero()
    x = torch.from_numpy(np.asarray(audio, np.float32))
    n = (len(x) + 511) // 512
    x = torch.nn.functional.pad(x, (0, n * 512 - len(x)))
    model.reset_states()
    with torch.no_grad():
        probs = torch.cat([model(x[i * 512:(i + 1) * 512], SAMPLE_RATE).reshape(-1) for i in range(n)]).numpy()
    a = int(np.ceil(len(audio) / 160)) + 1
    t = (np.arange(a) * 160 // 512).clip(0, n - 1)
    return _close_gaps(probs[t] > threshold, 10)


@functools.lru_cache(maxsize=1)
def _silero():
    """silero's TorchScript model, loaded from the silero-vad wheel without importing its
    package (whose import sets torch to one thread for the whole process)."""
    import importlib.util

    import torch

    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise GstalkError("silero-vad is not installed; it provides the voice-activity detector (pip install "
                          "silero-vad)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "silero_vad.jit"
    if not path.is_file():
        raise GstalkError(f"the silero-vad wheel lacks its model ({path}); reinstall silero-vad")
    model = torch.jit.load(str(path), map_location="cpu")
    model.eval()
    return model


def _close_gaps(on: np.ndarray, k: int) -> np.ndarray:
    """Fill gaps shorter than ``k`` frames between True runs."""
    on = on.copy()
    idx = np.flatnonzero(on)
    if len(idx) > 1:
        gaps = np.flatnonzero(np.diff(idx) > 1)
        for g in gaps:
            a, b = idx[g], idx[g + 1]
            if b - a - 1 < k:
                on[a:b] = True
    return on


SPEECH_DETECTORS = {"energy": energy_speech, "vad": vad_speech}


def speech_regions(audio: np.ndarray, detector: str = "vad") -> list[tuple[float, float]]:
    """(start s, end s) of the stretches of speech, separated by pauses of at least
    :data:`MIN_PAUSE_S`, each at most :data:`MAX_UTTERANCE_S` long."""
    on = SPEECH_DETECTORS[detector](audio)
    gap = int(round(MIN_PAUSE_S / FRAME_S))
    on = _close_gaps(on, gap)
    d = np.diff(np.concatenate([[0], on.astype(int), [0]]))
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    db = _rms_db(audio)
    out = []
    for a, b in zip(starts, ends):
        if b - a < 5:  # under 50 ms: a click, not speech
            continue
        out += _split_long(a, b, db)
    return [(a * FRAME_S, b * FRAME_S) for a, b in out]


def _split_long(a: int, b: int, db: np.ndarray) -> list[tuple[int, int]]:
    n = int(MAX_UTTERANCE_S / FRAME_S)
    if b - a <= n:
        return [(a, b)]
    lo, hi = a + n // 4, a + n  # cut at the quietest 100 ms inside the allowed range
    smooth = np.convolve(db[lo:hi], np.ones(10) / 10, mode="same")
    cut = lo + int(np.argmin(smooth))
    return [(a, cut)] + _split_long(cut, b, db)


# ---------------------------------------------------------------- the timeline
PHONE_SOURCES = ("auto", "phones")


def phone_timeline(audio: np.ndarray, detector: str = "vad", source: str = "auto") -> PhoneTimeline:
    """Phones with times for 16 kHz mono ``audio`` (see the module's docstring); ``source``:
    'auto' (recognised words, else free phones) or 'phones' (free phone decoding)."""
    if source not in PHONE_SOURCES:
        raise GstalkError(f"unknown phone source {source!r}: choose {' or '.join(PHONE_SOURCES)}")
    audio = np.asarray(audio, np.float32)
    dur = len(audio) / SAMPLE_RATE
    tl = PhoneTimeline([], dur)
    if not len(audio) or float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) < 1e-4:
        tl.notes.append("the audio is silent: the mouth rests")
        return tl
    with _LOCK:  # the voice-activity detector's state is shared
        return _timeline(audio, tl, detector, source)


def _timeline(audio: np.ndarray, tl: PhoneTimeline, detector: str, source: str) -> PhoneTimeline:
    dur = tl.duration
    regions = speech_regions(audio, detector)
    if not regions:
        tl.notes.append("no speech found in the audio (music or noise?): the mouth rests")
        return tl
    chunks = []
    for a, b in regions:
        a0, b0 = max(0.0, a - EDGE_S), min(dur, b + EDGE_S)
        chunks.append((a, b, a0, audio[int(a0 * SAMPLE_RATE):int(b0 * SAMPLE_RATE)]))
    speech_s = sum(b - a for a, b in regions)
    recognised, spoken = [], 0.0
    if source == "auto":
        words = _word_decoder()  # one per timeline: its result depends on the audio alone
        recognised = [recognise(c, words) for *_, c in chunks]
        spoken = sum(e - s for _, phones in recognised for p, s, e in phones if p != "SIL")
    if source == "auto" and spoken >= MIN_COVERAGE * speech_s:
        tl.source = "words"
        for (a, b, a0, _), (words, _) in zip(chunks, recognised):
            tl.words += [(w, s + a0, e + a0) for w, s, e in words]
        found = [phones for _, phones in recognised]
    else:
        tl.source = "phones"
        if source == "auto":
            tl.notes.append(f"the speech was not recognised as English (words cover {spoken / speech_s:.0%} of its "
                            f"{speech_s:.1f} s; music, noise or another language?): the lips follow free phone "
                            "decoding, which times them less well")
        phones = _phone_decoder()
        found = [free_phones(c, phones) for *_, c in chunks]
    for (a, b, a0, _), phones in zip(chunks, found):
        for p, s, e in phones:  # phones inside the speech (the edges were there for the decoder only)
            s, e = max(s + a0, a), min(e + a0, b)
            if e > s and p != "SIL":
                tl.phones.append((p, s, e))
    tl.phones.sort(key=lambda p: p[1])
    return tl
