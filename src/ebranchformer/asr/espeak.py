"""A minimal ctypes binding to the espeak-ng library shipped by the ``espeakng-loader`` wheel.

Nothing outside the wheel is needed: the shared library and its voice data both come from
``espeakng_loader`` (``pip install ebranchformer[demo]``). espeak-ng keeps its state in the process,
so every call goes through one lock, and the library is initialised once per process, lazily.

espeak-ng's wave generator carries hidden state from one utterance to the next (pitch flutter
phase, gain control, ``rand()``), so the same request can give slightly different samples
depending on what was spoken before. To make calls reproducible, :func:`synthesize_batch` speaks
in a child forked from the initialised (never used) library; where ``os.fork`` is missing it
speaks in-process, and equal requests are only equal in a fresh process.

Example:
    >>> from ebranchformer.asr.espeak import synthesize, SAMPLE_RATE
    >>> pcm = synthesize("seven red cats", voice="en-us", variant="m3", rate=180)  # doctest: +SKIP
    >>> pcm.dtype, SAMPLE_RATE  # doctest: +SKIP
    (dtype('int16'), 22050)
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["SAMPLE_RATE", "EspeakError", "SpeechRequest", "list_languages", "list_variants", "synthesize",
           "synthesize_batch"]

SAMPLE_RATE = 22050
"""espeak-ng's native output rate in Hz (checked against the library at initialisation)."""

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE = 1, 3, 4
_RATE_LIMITS, _PITCH_LIMITS = (80, 450), (0, 100)

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                   ctypes.c_void_p)

_lock = threading.Lock()
_state: dict = {}  # "lib", "callback", "chunks", "pid"


def _new_lock_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # a lock held by another thread at fork time would never be released


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)


class EspeakError(RuntimeError):
    """espeak-ng is missing or rejected a request (unknown voice, failed synthesis)."""


def _data_dir() -> str:
    try:
        import espeakng_loader
    except ImportError as e:
        raise EspeakError("espeak-ng is not installed: pip install 'ebranchformer[demo]' "
                          "(espeakng-loader)") from e
    return espeakng_loader.get_data_path()


def _library() -> ctypes.CDLL:
    """The initialised library for this process (call with ``_lock`` held)."""
    if _state.get("pid") == os.getpid():
        return _state["lib"]
    import espeakng_loader

    data_dir = _data_dir()
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_ng_SetRandSeed.restype = None
    # The path may name the data folder itself; espeak-ng then uses it as is.
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_dir.encode(), _INITIALIZE_DONT_EXIT)
    if rate != SAMPLE_RATE:
        raise EspeakError(f"espeak_Initialize failed or gave an unexpected sample rate ({rate}); "
                          f"data: {data_dir}")
    chunks: list[bytes] = []

    def collect(wav, n, _events):
        if wav and n > 0:
            chunks.append(ctypes.string_at(wav, 2 * n))
        return 0  # 0: continue synthesis

    callback = _SYNTH_CALLBACK(collect)  # kept in _state: ctypes must not free it
    lib.espeak_SetSynthCallback(callback)
    lib.espeak_SetVoiceByName(b"en")  # loads the English dictionary once, for all forked children
    _state.update(lib=lib, callback=callback, chunks=chunks, pid=os.getpid())
    return lib


@functools.cache
def _voice_names(kind: str) -> tuple[str, ...]:
    base = os.path.join(_data_dir(), *(("voices", "!v") if kind == "variant" else ("lang",)))
    return tuple(sorted({f.lower() for _root, _dirs, files in os.walk(base) for f in files}))


def list_variants() -> list[str]:
    """Names of the voice variants in the shipped data (``m1``..``m8``, ``f1``..``f5``, ``klatt``...)."""
    return list(_voice_names("variant"))


def list_languages() -> list[str]:
    """Names of the language voices in the shipped data (``en``, ``en-us``, ``en-gb-x-rp``...)."""
    return list(_voice_names("language"))


def _check_int(name: str, value, limits: tuple[int, int]) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not limits[0] <= value <= limits[1]:
        raise ValueError(f"{name} must be in [{limits[0]}, {limits[1]}], got {value}")
    return int(value)


@dataclass(frozen=True)
class SpeechRequest:
    """One utterance for espeak-ng.

    Attributes:
        text: what to say (UTF-8 text; SSML is not interpreted).
        voice: a language voice, see :func:`list_languages` (``en``, ``en-us``, ``en-gb-x-rp``...).
        variant: an optional voice variant, see :func:`list_variants` (``m3``, ``f2``, ``klatt``...).
        rate: speaking rate in words per minute, 80-450.
        pitch: base pitch, 0-100 (50 is the voice's own).
        pitch_range: intonation range, 0-100 (0 is monotone, 50 the voice's own).
        seed: seeds espeak's random generators (noise in breathy and Klatt voices), 0 to 2**31 - 1.
    """

    text: str
    voice: str = "en-us"
    variant: str | None = None
    rate: int = 175
    pitch: int = 50
    pitch_range: int = 50
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.text, str) or not self.text.strip() or "\0" in self.text:
            raise ValueError(f"text must be a non-empty string, got {self.text!r}")
        for name in ("voice", "variant"):
            value = getattr(self, name)
            if (value is not None or name == "voice") and (
                    not isinstance(value, str) or not value or any(c in value for c in "+/ \0")):
                raise ValueError(f"{name} must be a plain espeak-ng voice name, got {value!r}")
        _check_int("rate", self.rate, _RATE_LIMITS)
        _check_int("pitch", self.pitch, _PITCH_LIMITS)
        _check_int("pitch_range", self.pitch_range, _PITCH_LIMITS)
        _check_int("seed", self.seed, (0, 2**31 - 1))

    @property
    def voice_name(self) -> str:
        """The name espeak-ng takes: ``voice`` or ``voice+variant``."""
        return self.voice if self.variant is None else f"{self.voice}+{self.variant}"


def _speak(lib: ctypes.CDLL, request: SpeechRequest) -> bytes | None:
    """Synthesize in this process; returns little-endian int16 bytes, or None on failure."""
    if lib.espeak_SetVoiceByName(request.voice_name.encode()) != 0:
        return None
    for param, value in ((_PARAM_RATE, request.rate), (_PARAM_PITCH, request.pitch),
                         (_PARAM_RANGE, request.pitch_range)):
        lib.espeak_SetParameter(param, value, 0)
    lib.espeak_ng_SetRandSeed(request.seed)
    chunks = _state["chunks"]
    chunks.clear()
    data = request.text.encode("utf-8") + b"\0"
    status = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
    lib.espeak_Synchronize()
    pcm = b"".join(chunks)
    chunks.clear()
    return pcm if status == 0 and pcm else None


def _speak_forked(lib: ctypes.CDLL, requests: Sequence[SpeechRequest]) -> list[bytes]:
    """Run :func:`_speak` in a forked child, so this process's espeak state stays untouched.

    Returns the samples of the requests spoken before the first failure (all of them on success).
    """
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():  # Python >= 3.12 warns about fork in threaded processes; the child only
        warnings.simplefilter("ignore", DeprecationWarning)  # runs espeak and writes to a pipe.
        pid = os.fork()
    if pid == 0:  # child: never return into the caller's stack
        try:
            os.close(read_fd)
            srand = ctypes.CDLL(None).srand  # breath noise uses libc rand()
            for request in requests:
                srand(request.seed)
                pcm = _speak(lib, request)
                if pcm is None:
                    break
                view = memoryview(struct.pack("<q", len(pcm)) + pcm)
                while view:
                    view = view[os.write(write_fd, view):]
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    out, pos = [], 0
    while pos + 8 <= len(data):
        (size,) = struct.unpack_from("<q", data, pos)
        if pos + 8 + size > len(data):  # the child died while writing
            break
        out.append(data[pos + 8:pos + 8 + size])
        pos += 8 + size
    return out


def synthesize_batch(requests: Sequence[SpeechRequest]) -> list[np.ndarray]:
    """Speak ``requests`` in order; returns 16-bit mono samples (T,) at :data:`SAMPLE_RATE` for each.

    With ``os.fork`` (Linux, macOS) the batch runs in a child forked from the freshly initialised
    library, so equal batches give equal samples; an utterance may still depend on those before it
    in the same batch. Raises :class:`EspeakError` naming the voice that failed.
    """
    requests = list(requests)
    for request in requests:
        if not isinstance(request, SpeechRequest):
            raise TypeError(f"requests must hold SpeechRequest objects, got {type(request).__name__}")
        if request.voice.lower() not in _voice_names("language"):
            raise EspeakError(f"unknown espeak-ng voice {request.voice!r}; see list_languages()")
        if request.variant is not None and request.variant.lower() not in _voice_names("variant"):
            raise EspeakError(f"unknown espeak-ng variant {request.variant!r}; see list_variants()")
    if not requests:
        return []
    with _lock:
        lib = _library()
        if hasattr(os, "fork"):
            pcms = _speak_forked(lib, requests)
        else:
            pcms = []
            for request in requests:
                pcm = _speak(lib, request)
                if pcm is None:
                    break
                pcms.append(pcm)
    if len(pcms) < len(requests):
        failed = requests[len(pcms)]
        raise EspeakError(f"espeak-ng failed to speak {failed.text!r} with voice {failed.voice_name!r}")
    return [np.frombuffer(pcm, dtype="<i2").astype(np.int16) for pcm in pcms]


def synthesize(text: str, voice: str = "en-us", variant: str | None = None, rate: int = 175, pitch: int = 50,
               pitch_range: int = 50, seed: int = 0) -> np.ndarray:
    """Speak one utterance; returns 16-bit mono samples (T,) at :data:`SAMPLE_RATE`.

    The arguments are those of :class:`SpeechRequest`. Equal arguments give equal samples
    (where ``os.fork`` exists, see :func:`synthesize_batch`).
    """
    return synthesize_batch([SpeechRequest(text, voice, variant, rate, pitch, pitch_range, seed)])[0]
