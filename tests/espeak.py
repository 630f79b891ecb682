"""Speech with known phones and timings, from espeak-ng's library (Debian's espeak-ng; the
tests that use it skip without it).

espeak-ng reports a *phoneme event* at the start of every phoneme it speaks, with its place in
the audio it hands back, so one call gives the waveform and the truth: which phones, and when.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache

import numpy as np

# espeak-ng's own phoneme mnemonics (the en-us voice's) -> ARPAbet
ESPEAK_TO_ARPABET = {
    "p": "P", "b": "B", "m": "M", "f": "F", "v": "V", "T": "TH", "D": "DH", "t": "T", "d": "D", "k": "K", "g": "G",
    "N": "NG", "h": "HH", "tS": "CH", "dZ": "JH", "S": "SH", "Z": "ZH", "s": "S", "z": "Z", "n": "N", "l": "L",
    "r": "R", "r-": "R", "j": "Y", "w": "W", "t#": "T", "*": "T", "n-": "N", "l/": "L", "m-": "M",
    "a": "AE", "aa": "AA", "A:": "AA", "A@": "AA", "0": "AA", "V": "AH", "@": "AH", "@2": "AH", "@5": "AH", "3": "ER",
    "3:": "ER", "a#": "AH", "E": "EH", "e@": "EH", "eI": "EY", "I": "IH", "I2": "IH", "i": "IY", "i:": "IY",
    "i@": "IY", "O:": "AO", "O@": "AO", "o@": "AO", "O": "AO", "oU": "OW", "OI": "OY", "U": "UH", "U@": "UH",
    "u:": "UW", "aI": "AY", "aU": "AW", "aI@": "AY", "aU@": "AW", "I#": "IH", "IR": "IH", "@L": "L", "VR": "ER",
    "A#": "AA", "02": "AA", "ju:": "UW",
}


class _Event(ctypes.Structure):
    class _Id(ctypes.Union):
        _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]

    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _Id)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))
EVENT_PHONEME, EVENT_END, EVENT_LIST_TERMINATED = 7, 5, 0


@lru_cache(maxsize=1)
def _lib():
    name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    # AUDIO_OUTPUT_SYNCHRONOUS = 2; options bit 0: phoneme events
    rate = lib.espeak_Initialize(2, 0, None, 1)
    if rate <= 0:
        return None
    lib._rate = rate
    return lib


def available() -> bool:
    return _lib() is not None


def speak(text: str, voice: str = "en-us", rate_wpm: int = 150) -> tuple[np.ndarray, int, list[tuple[str, float]]]:
    """(samples as float32, sample rate, [(espeak phoneme, start s)]) for ``text``."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("espeak-ng's library is not installed")
    chunks: list[np.ndarray] = []
    events: list[tuple[str, float]] = []

    def cb(wav, n, ev):
        if n > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while ev[i].type != EVENT_LIST_TERMINATED:
            if ev[i].type == EVENT_PHONEME:
                events.append((ev[i].id.string.decode("ascii", "replace"), ev[i].sample / lib._rate))
            i += 1
        return 0

    callback = _CALLBACK(cb)
    lib.espeak_SetSynthCallback(callback)
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise RuntimeError(f"espeak-ng has no voice {voice!r}")
    lib.espeak_SetParameter(1, rate_wpm, 0)  # espeakRATE
    buf = text.encode("utf-8")
    # espeak_Synth(text, size, position, position_type (POS_CHARACTER = 1), end_position, flags (CHARS_UTF8 = 1),
    #              unique_identifier, user_data)
    err = lib.espeak_Synth(buf, len(buf) + 1, 0, 1, 0, 1, None, None)
    if err != 0:
        raise RuntimeError(f"espeak_Synth failed ({err})")
    lib.espeak_Synchronize()
    audio = (np.concatenate(chunks) if chunks else np.zeros(0, np.int16)).astype(np.float32) / 32768.0
    return audio, lib._rate, events


def phones(events: list[tuple[str, float]], duration: float) -> list[tuple[str, float, float]]:
    """espeak's phoneme events as ARPAbet ``(phone, start, end)`` (pauses dropped; unknown
    mnemonics kept as themselves)."""
    out = []
    for k, (p, t) in enumerate(events):
        end = events[k + 1][1] if k + 1 < len(events) else duration
        if p in ("_", "_:", "_!", "_^_", "") or p.startswith("_"):
            continue
        out.append((ESPEAK_TO_ARPABET.get(p, p), t, end))
    return out
