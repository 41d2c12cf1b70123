"""Utterance manifests: the ``Utterance`` record, JSONL manifests and the LibriSpeech directory layout.

A JSONL manifest holds one JSON object per line::

    {"audio": "wav/utt1.flac", "text": "hello world", "duration": 1.52, "id": "utt1"}

``audio`` may be relative; it is resolved against the folder holding the manifest. ``id`` is optional and
defaults to the audio path as written, without its extension. The readers never crash on a bad line: they skip
it and count it in a :class:`~ebranchformer.asr.skip_report.SkipReport` under one of these reasons:

- ``"non-utf8 line"``: bytes that are not UTF-8 (lines are decoded one by one, so one bad line loses only itself);
- ``"bad json"``: not a JSON object;
- ``"missing key"``: no ``audio``, ``text`` or ``duration``;
- ``"bad field type"``: ``audio``/``text``/``id`` not a string, ``duration`` not a number;
- ``"empty transcript"``: text empty after stripping whitespace;
- ``"bad duration"``: duration not finite or not > 0;
- ``"duplicate id"``: an id seen before in the same manifest (the first one is kept);
- ``"missing audio"``: the audio file does not exist (only with ``check_audio=True``, the default);
- ``"unreadable audio"`` / ``"missing transcript"``: LibriSpeech only, see :func:`read_librispeech_dir`.

Blank lines are ignored without being counted.

Example:
    >>> utts, skipped = read_jsonl_manifest("data/train.jsonl")  # doctest: +SKIP
    >>> print(skipped)  # doctest: +SKIP
    skipped 3 utterances: 1 missing audio, 2 empty transcript
    >>> write_jsonl_manifest("data/clean.jsonl", utts)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ebranchformer.asr.skip_report import SkipReport

__all__ = ["Utterance", "read_jsonl_manifest", "read_librispeech_dir", "write_jsonl_manifest"]


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One utterance of a corpus.

    Attributes:
        id: non-empty unique name.
        audio: absolute path of the audio file (a ``PathLike`` is turned into ``str``).
        text: the transcript (may be empty for untranscribed audio; the manifest readers skip empty ones).
        duration: length in seconds, finite and > 0.

    Example:
        >>> Utterance("utt1", "/data/utt1.flac", "hello", 1.5).duration
        1.5
    """

    id: str
    audio: str
    text: str
    duration: float

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"Utterance id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.audio, (str, os.PathLike)):
            raise TypeError(
                f"Utterance audio must be a path (str or PathLike), got {type(self.audio).__name__}"
            )
        audio = os.fspath(self.audio)
        if not isinstance(audio, str) or not os.path.isabs(audio):
            raise ValueError(
                f"Utterance audio must be an absolute path, got {audio!r} (utterance {self.id!r})"
            )
        object.__setattr__(self, "audio", audio)
        if not isinstance(self.text, str):
            raise TypeError(f"Utterance text must be a string, got {type(self.text).__name__} ({self.id!r})")
        if isinstance(self.duration, bool) or not isinstance(self.duration, (int, float)):
            raise TypeError(
                f"Utterance duration must be a number of seconds, got {self.duration!r} ({self.id!r})"
            )
        if not math.isfinite(self.duration) or self.duration <= 0:
            raise ValueError(
                f"Utterance duration must be finite and > 0 seconds, got {self.duration!r} ({self.id!r})"
            )
        object.__setattr__(self, "duration", float(self.duration))


def _decoded_lines(path: Path, skips: SkipReport) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) for each non-blank line; lines that are not UTF-8 are counted and left out."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                skips.add("non-utf8 line", f"{path}:{lineno}")
                continue
            line = line.strip()
            if line:
                yield lineno, line


def _check_file(path: str | os.PathLike, what: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path (str or PathLike), got {type(path).__name__}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {str(p)!r}")
    return p


def read_jsonl_manifest(
    path: str | os.PathLike, check_audio: bool = True
) -> tuple[list[Utterance], SkipReport]:
    """Read a JSONL manifest; returns the good utterances in file order and a report of the skipped lines.

    Args:
        path: the manifest file (must exist: a missing manifest raises ``FileNotFoundError``).
        check_audio: when True (default), lines whose audio file does not exist are skipped as
            ``"missing audio"``; set False to skip the ``stat`` per line on slow file systems.
    """
    manifest = _check_file(path, "manifest path")
    base = manifest.resolve().parent
    skips = SkipReport()
    utts: list[Utterance] = []
    seen: set[str] = set()
    for lineno, line in _decoded_lines(manifest, skips):
        where = f"{manifest}:{lineno}"
        try:
            obj = json.loads(line)
        except ValueError:
            skips.add("bad json", where)
            continue
        if not isinstance(obj, dict):
            skips.add("bad json", where)
            continue
        if not all(k in obj for k in ("audio", "text", "duration")):
            skips.add("missing key", where)
            continue
        audio, text, duration, uid = obj["audio"], obj["text"], obj["duration"], obj.get("id")
        if (
            not isinstance(audio, str)
            or not audio
            or not isinstance(text, str)
            or isinstance(duration, bool)
            or not isinstance(duration, (int, float))
            or (uid is not None and not isinstance(uid, str))
        ):
            skips.add("bad field type", where)
            continue
        if uid is None or not uid:
            uid = os.path.splitext(audio)[0]
        text = text.strip()
        if not text:
            skips.add("empty transcript", uid)
            continue
        if not math.isfinite(duration) or duration <= 0:
            skips.add("bad duration", uid)
            continue
        if uid in seen:
            skips.add("duplicate id", uid)
            continue
        audio_path = os.path.normpath(base / audio)  # an absolute `audio` replaces `base`
        if check_audio and not os.path.isfile(audio_path):
            skips.add("missing audio", audio_path)
            continue
        seen.add(uid)
        utts.append(Utterance(uid, audio_path, text, duration))
    return utts, skips


def write_jsonl_manifest(
    path: str | os.PathLike, utterances: Iterable[Utterance], relative: bool = False
) -> None:
    """Write ``utterances`` as a JSONL manifest, atomically (a temporary file in the same folder, then a rename).

    Args:
        path: the manifest to (over)write; its folder must exist.
        utterances: :class:`Utterance` objects, written in order as ``{"id", "audio", "text", "duration"}``.
        relative: write audio paths relative to the manifest's folder (a portable corpus); default absolute.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a path (str or PathLike), got {type(path).__name__}")
    target = Path(path)
    folder = target.resolve().parent
    if not folder.is_dir():
        raise FileNotFoundError(f"folder for the manifest does not exist: {str(folder)!r}")
    lines = []
    for i, u in enumerate(utterances):
        if not isinstance(u, Utterance):
            raise TypeError(f"utterances[{i}] must be an Utterance, got {type(u).__name__}")
        audio = os.path.relpath(u.audio, folder) if relative else u.audio
        record = {"id": u.id, "audio": audio, "text": u.text, "duration": u.duration}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_librispeech_dir(root: str | os.PathLike) -> tuple[list[Utterance], SkipReport]:
    """Read a LibriSpeech split: ``root/<spk>/<chapter>/<spk>-<chapter>-<utt>.flac`` + ``<spk>-<chapter>.trans.txt``.

    Each transcript line is ``UTT-ID TEXT``; the duration comes from ``soundfile.info`` (frames / rate). Skips:
    ``"missing audio"`` (a transcript line without its flac), ``"unreadable audio"`` (``soundfile.info`` fails
    or the file holds no frames), ``"empty transcript"``, ``"non-utf8 line"``, ``"duplicate id"``, and
    ``"missing transcript"`` (a flac no transcript line names). Returns utterances sorted by id.
    """
    import soundfile as sf

    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path (str or PathLike), got {type(root).__name__}")
    root_path = Path(root).resolve()
    if not root_path.is_dir():
        raise FileNotFoundError(f"LibriSpeech root is not a folder: {str(root_path)!r}")
    skips = SkipReport()
    utts: dict[str, Utterance] = {}
    mentioned: set[Path] = set()  # flac files some transcript line names, good or not
    for trans in sorted(root_path.glob("*/*/*.trans.txt")):
        chapter_dir = trans.parent
        for _, line in _decoded_lines(trans, skips):
            uid, _, text = line.partition(" ")
            flac = chapter_dir / f"{uid}.flac"
            mentioned.add(flac)
            text = text.strip()
            if not text:
                skips.add("empty transcript", uid)
                continue
            if uid in utts:
                skips.add("duplicate id", uid)
                continue
            if not flac.is_file():
                skips.add("missing audio", str(flac))
                continue
            try:
                info = sf.info(str(flac))
            except (RuntimeError, TypeError, ValueError, OSError):  # LibsndfileError is a RuntimeError
                skips.add("unreadable audio", str(flac))
                continue
            if info.frames <= 0 or info.samplerate <= 0:
                skips.add("unreadable audio", str(flac))
                continue
            utts[uid] = Utterance(uid, str(flac), text, info.frames / info.samplerate)
    for flac in sorted(root_path.glob("*/*/*.flac")):
        if flac not in mentioned:
            skips.add("missing transcript", str(flac))
    return [utts[k] for k in sorted(utts)], skips
