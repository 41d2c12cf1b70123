"""Manifests: Utterance validation, JSONL reading (every bad-line case) and writing, LibriSpeech folders."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

from ebranchformer.asr.manifest import (
    Utterance,
    read_jsonl_manifest,
    read_librispeech_dir,
    write_jsonl_manifest,
)


def write_tone(path: Path, num_samples: int, sample_rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(num_samples) / sample_rate
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32), sample_rate)
    return path


def write_lines(path: Path, lines: list[bytes | str | dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = [
        line if isinstance(line, bytes) else (json.dumps(line) if isinstance(line, dict) else line).encode()
        for line in lines
    ]
    path.write_bytes(b"\n".join(raw) + b"\n")
    return path


# --- Utterance -------------------------------------------------------------------------------------------


def test_utterance_normalises_pathlike_and_duration(tmp_path):
    u = Utterance("a", tmp_path / "a.wav", "hi", 2)
    assert u.audio == str(tmp_path / "a.wav") and isinstance(u.audio, str)
    assert u.duration == 2.0 and isinstance(u.duration, float)


@pytest.mark.parametrize(
    "args, exc, word",
    [
        (("", "/a.wav", "t", 1.0), ValueError, "id"),
        (("a", "rel/a.wav", "t", 1.0), ValueError, "absolute"),
        (("a", 5, "t", 1.0), TypeError, "audio"),
        (("a", "/a.wav", None, 1.0), TypeError, "text"),
        (("a", "/a.wav", "t", 0.0), ValueError, "duration"),
        (("a", "/a.wav", "t", float("nan")), ValueError, "duration"),
        (("a", "/a.wav", "t", "1.0"), TypeError, "duration"),
    ],
)
def test_utterance_rejects_bad_fields(args, exc, word):
    with pytest.raises(exc, match=word):
        Utterance(*args)


# --- read_jsonl_manifest -----------------------------------------------------------------------------------


def test_relative_audio_paths_resolve_against_the_manifest_folder(tmp_path):
    a = write_tone(tmp_path / "corpus" / "wav" / "a.wav", 1600)
    b = write_tone(tmp_path / "elsewhere" / "b.wav", 3200)
    c = write_tone(tmp_path / "c.wav", 800)
    manifest = write_lines(
        tmp_path / "corpus" / "lists" / "train.jsonl",
        [
            {"audio": "../wav/a.wav", "text": "alpha", "duration": 0.1, "id": "A"},
            {"audio": "../../elsewhere/b.wav", "text": "  beta ", "duration": 0.2},
            {"audio": str(c), "text": "gamma", "duration": 0.05},
        ],
    )
    cwd = os.getcwd()
    os.chdir(tmp_path / "elsewhere")  # the working folder must not matter
    try:
        utts, skips = read_jsonl_manifest(manifest)
    finally:
        os.chdir(cwd)
    assert skips.total == 0
    assert [u.audio for u in utts] == [str(a), str(b), str(c)]
    assert [u.id for u in utts] == ["A", "../../elsewhere/b", str(c)[: -len(".wav")]]  # default: path w/o ext
    assert [u.text for u in utts] == ["alpha", "beta", "gamma"]  # stripped
    assert [u.duration for u in utts] == [0.1, 0.2, 0.05]


GOOD = {"audio": "good.wav", "text": "fine", "duration": 1.0}


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        (b'{"audio": "x.wav", "text": "caf\xe9", "duration": 1.0}', "non-utf8 line"),  # latin-1 byte
        (b"\xff\xfe\x00garbage", "non-utf8 line"),
        ('{"audio": "x.wav", "text": "oops", "duration": 1.0', "bad json"),
        ('["x.wav", "text", 1.0]', "bad json"),
        ({"audio": "x.wav", "duration": 1.0}, "missing key"),
        ({"text": "no audio", "duration": 1.0}, "missing key"),
        ({"audio": "x.wav", "text": "no duration"}, "missing key"),
        ({"audio": "x.wav", "text": "", "duration": 1.0}, "empty transcript"),
        ({"audio": "x.wav", "text": " \t ", "duration": 1.0}, "empty transcript"),
        ({"audio": "x.wav", "text": "t", "duration": 0}, "bad duration"),
        ({"audio": "x.wav", "text": "t", "duration": -2.5}, "bad duration"),
        ('{"audio": "x.wav", "text": "t", "duration": NaN}', "bad duration"),
        ({"audio": "x.wav", "text": "t", "duration": "1.0"}, "bad field type"),
        ({"audio": "x.wav", "text": 7, "duration": 1.0}, "bad field type"),
        ({"audio": "x.wav", "text": "t", "duration": True}, "bad field type"),
        ({"audio": "missing.wav", "text": "t", "duration": 1.0}, "missing audio"),
        (dict(GOOD), "duplicate id"),
    ],
)
def test_each_bad_line_is_skipped_and_counted_without_losing_the_good_ones(tmp_path, bad_line, reason):
    write_tone(tmp_path / "good.wav", 160)
    write_tone(tmp_path / "x.wav", 160)
    manifest = write_lines(tmp_path / "m.jsonl", [GOOD, bad_line, {**GOOD, "id": "after"}])
    utts, skips = read_jsonl_manifest(manifest)
    assert [u.id for u in utts] == ["good", "after"]
    assert skips.counts == {reason: 1}
    assert len(skips.examples[reason]) == 1


def test_missing_audio_kept_when_not_checked(tmp_path):
    manifest = write_lines(tmp_path / "m.jsonl", [{"audio": "nope.wav", "text": "t", "duration": 1.0}])
    utts, skips = read_jsonl_manifest(manifest, check_audio=False)
    assert [u.audio for u in utts] == [str(tmp_path / "nope.wav")] and skips.total == 0


def test_skip_report_of_a_mixed_manifest(tmp_path):
    for name in ("a", "b", "c"):
        write_tone(tmp_path / f"{name}.wav", 160)
    manifest = write_lines(
        tmp_path / "m.jsonl",
        [
            {"audio": "a.wav", "text": "one", "duration": 1.0},
            {"audio": "gone.wav", "text": "two", "duration": 1.0},
            "",  # blank lines are not counted
            {"audio": "b.wav", "text": "", "duration": 1.0},
            {"audio": "c.wav", "text": "   ", "duration": 1.0},
            {"audio": "c.wav", "text": "three", "duration": 1.5},
        ],
    )
    utts, skips = read_jsonl_manifest(manifest)
    assert [u.text for u in utts] == ["one", "three"]
    assert skips.counts == {"missing audio": 1, "empty transcript": 2}
    assert skips.examples["empty transcript"] == ["b", "c"]
    assert str(skips) == "skipped 3 utterances: 1 missing audio, 2 empty transcript"


def test_missing_manifest_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        read_jsonl_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(TypeError, match="manifest path"):
        read_jsonl_manifest(3)


# --- write_jsonl_manifest ----------------------------------------------------------------------------------

texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20).filter(
    lambda s: s.strip() == s and s
)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(texts, st.floats(min_value=1e-3, max_value=1e4, allow_nan=False)), min_size=0, max_size=6
    ),
    st.booleans(),
)
def test_write_then_read_round_trips(records, relative):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d).resolve()
        utts = [
            Utterance(f"u{i}", root / "audio" / f"{i}.flac", t, dur) for i, (t, dur) in enumerate(records)
        ]
        path = root / "m.jsonl"
        write_jsonl_manifest(path, utts, relative=relative)
        back, skips = read_jsonl_manifest(path, check_audio=False)
        assert back == utts and skips.total == 0
        # JSONL lines end in "\n" only; str.splitlines() would also split inside texts at U+0085, U+2028, ...
        lines = path.read_text(encoding="utf-8").split("\n")[:-1]
        stored = [json.loads(line)["audio"] for line in lines]
        assert all(os.path.isabs(a) != relative for a in stored)
        assert sorted(os.listdir(root)) == ["m.jsonl"]  # no temporary file left behind


def test_write_replaces_an_existing_manifest_and_checks_input(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("old content that is much longer than the new one\n" * 10)
    write_jsonl_manifest(path, [Utterance("a", tmp_path / "a.wav", "x", 1.0)])
    assert path.read_text().count("\n") == 1
    with pytest.raises(TypeError, match=r"utterances\[0\]"):
        write_jsonl_manifest(path, [{"id": "a"}])
    assert path.read_text().count("\n") == 1  # a failed write leaves the old file
    with pytest.raises(FileNotFoundError, match="folder"):
        write_jsonl_manifest(tmp_path / "no" / "m.jsonl", [])


# --- read_librispeech_dir ----------------------------------------------------------------------------------


def test_librispeech_layout(tmp_path):
    root = tmp_path / "LibriSpeech" / "dev-clean"
    ch1, ch2 = root / "19" / "198", root / "26" / "495"
    write_tone(ch1 / "19-198-0001.flac", 16000)
    write_tone(ch1 / "19-198-0000.flac", 8000)
    write_tone(ch2 / "26-495-0000.flac", 4000, sample_rate=8000)  # 0.5 s at its own rate
    write_tone(ch2 / "26-495-0009.flac", 1600)  # no transcript line names it
    (ch2 / "26-495-0002.flac").write_bytes(np.random.default_rng(0).bytes(300))  # corrupt
    write_lines(
        ch1 / "19-198.trans.txt",
        ["19-198-0000 NORTHANGER ABBEY", "19-198-0001 THIS LITTLE WORK", "19-198-0003 NO SUCH FILE"],
    )
    write_lines(
        ch2 / "26-495.trans.txt",
        ["26-495-0000 HELLO THERE", "26-495-0001", "26-495-0002 CORRUPT AUDIO", b"26-495-0004 \xe9T\xe9"],
    )
    utts, skips = read_librispeech_dir(root)
    assert [u.id for u in utts] == ["19-198-0000", "19-198-0001", "26-495-0000"]
    assert [u.text for u in utts] == ["NORTHANGER ABBEY", "THIS LITTLE WORK", "HELLO THERE"]
    assert [u.duration for u in utts] == [0.5, 1.0, 0.5]
    assert utts[0].audio == str((ch1 / "19-198-0000.flac").resolve())
    assert skips.counts == {
        "missing audio": 1,
        "empty transcript": 1,
        "unreadable audio": 1,
        "non-utf8 line": 1,
        "missing transcript": 1,
    }
    assert skips.examples["missing transcript"] == [str((ch2 / "26-495-0009.flac").resolve())]


def test_librispeech_root_must_be_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="LibriSpeech root"):
        read_librispeech_dir(tmp_path / "missing")
