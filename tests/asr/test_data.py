"""AudioDataset (bad items skipped and counted, resampling, tokens) and collate_audio (padding and lengths)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from ebranchformer.asr.data import (
    TOKEN_PAD,
    AudioDataset,
    BucketBatchSampler,
    SkipReport,
    Utterance,
    collate_audio,
    read_jsonl_manifest,
)


class CharTokenizer:
    """a..z -> 0..25; anything else is dropped (so "!!" encodes to nothing)."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) - ord("a") for c in text.lower() if "a" <= c <= "z"]


def sine(num_samples: int, sample_rate: int, freq: float = 440.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(num_samples) / sample_rate)).astype(np.float32)


def utt(tmp_path: Path, name: str, num_samples: int | None, text: str = "abc", sr: int = 16000) -> Utterance:
    """An Utterance for `name`.wav; None samples leaves the file missing."""
    path = tmp_path / f"{name}.wav"
    if num_samples is not None:
        sf.write(str(path), sine(num_samples, sr), sr, subtype="FLOAT")
    return Utterance(name, path, text, (num_samples or 1) / sr)


def test_item_holds_the_audio_text_and_tokens(tmp_path):
    ds = AudioDataset([utt(tmp_path, "a", 1234, text="Hi yo")], tokenizer=CharTokenizer())
    item = ds[0]
    assert item["id"] == "a" and item["text"] == "Hi yo"
    assert item["wav"].dtype == torch.float32 and item["wav"].shape == (1234,)
    np.testing.assert_array_equal(item["wav"].numpy(), sine(1234, 16000))  # FLOAT subtype: exact
    assert item["tokens"].dtype == torch.int64
    assert item["tokens"].tolist() == [7, 8, 24, 14]
    assert "tokens" not in AudioDataset(ds.utterances)[0]
    assert ds.skips.total == 0 and len(ds) == 1 and ds.durations == [1234 / 16000]


def test_missing_audio_is_skipped_and_counted(tmp_path):
    ds = AudioDataset([utt(tmp_path, "gone", None)])
    assert ds[0] is None
    assert ds.skips.counts == {"missing audio": 1}
    assert ds.skips.examples["missing audio"] == [str(tmp_path / "gone.wav")]


def test_corrupt_audio_is_skipped_and_counted(tmp_path):
    path = tmp_path / "noise.wav"
    path.write_bytes(np.random.default_rng(0).bytes(2048))
    ds = AudioDataset([Utterance("noise", path, "abc", 1.0)])
    assert ds[0] is None
    assert ds.skips.counts == {"unreadable audio": 1}


def test_empty_token_sequence_is_skipped_and_counted(tmp_path):
    ds = AudioDataset([utt(tmp_path, "a", 100, text="!!! ???")], tokenizer=CharTokenizer())
    assert ds[0] is None
    assert ds.skips.counts == {"empty tokens": 1} and ds.skips.examples["empty tokens"] == ["a"]


def test_audio_at_8khz_is_resampled_to_16khz(tmp_path):
    ds = AudioDataset([utt(tmp_path, "lo", 4000, sr=8000)], sample_rate=16000)
    wav = ds[0]["wav"].numpy()
    assert wav.shape == (8000,)  # 0.5 s at the target rate
    ref = sine(8000, 16000)  # the same 440 Hz tone sampled at 16 kHz
    mid = slice(400, 7600)  # away from the filter's edge effects
    assert np.max(np.abs(wav[mid] - ref[mid])) < 5e-3
    assert ds.skips.total == 0


def test_bad_tokenizers_and_arguments_raise(tmp_path):
    u = utt(tmp_path, "a", 100)
    with pytest.raises(TypeError, match="encode"):
        AudioDataset([u], tokenizer=object())
    with pytest.raises(TypeError, match=r"utterances\[0\]"):
        AudioDataset([{"id": "a"}])
    with pytest.raises(ValueError, match="sample_rate"):
        AudioDataset([u], sample_rate=0)

    class Negative:
        def encode(self, text):
            return [1, -3]

    class Floats:
        def encode(self, text):
            return [1.5, 2.0]

    with pytest.raises(ValueError, match="negative id"):
        AudioDataset([u], tokenizer=Negative())[0]
    with pytest.raises(TypeError, match="list of ints"):
        AudioDataset([u], tokenizer=Floats())[0]


# --- collate_audio -----------------------------------------------------------------------------------------


@settings(deadline=None, max_examples=50)
@given(
    st.lists(st.one_of(st.none(), st.tuples(st.integers(1, 40), st.integers(1, 8))), min_size=1, max_size=6),
    st.booleans(),
)
def test_collate_pads_and_reports_lengths(specs, with_tokens):
    gen = torch.Generator().manual_seed(0)
    items = [
        None
        if s is None
        else {
            "id": f"u{k}",
            "wav": torch.randn(s[0], generator=gen),
            "text": "t",
            **({"tokens": torch.randint(0, 50, (s[1],), generator=gen)} if with_tokens else {}),
        }
        for k, s in enumerate(specs)
    ]
    good = [it for it in items if it is not None]
    batch = collate_audio(items)
    if not good:
        assert batch is None
        return
    assert batch["ids"] == [it["id"] for it in good]
    assert batch["wav"].dtype == torch.float32 and batch["wav_lengths"].dtype == torch.int64
    assert batch["wav"].shape == (len(good), max(it["wav"].shape[0] for it in good))
    for b, it in enumerate(good):
        n = it["wav"].shape[0]
        assert batch["wav_lengths"][b] == n
        assert torch.equal(batch["wav"][b, :n], it["wav"]) and not batch["wav"][b, n:].any()
    if with_tokens:
        assert batch["tokens"].dtype == torch.int64 and batch["token_lengths"].dtype == torch.int64
        assert batch["tokens"].shape == (len(good), max(it["tokens"].shape[0] for it in good))
        for b, it in enumerate(good):
            u = it["tokens"].shape[0]
            assert batch["token_lengths"][b] == u
            assert torch.equal(batch["tokens"][b, :u], it["tokens"])
            assert (batch["tokens"][b, u:] == TOKEN_PAD).all()
    else:
        assert "tokens" not in batch and "token_lengths" not in batch


def test_collate_rejects_malformed_items():
    a = {"id": "a", "wav": torch.zeros(3), "text": "x"}
    with pytest.raises(ValueError, match="tokens"):
        collate_audio([a, {**a, "tokens": torch.tensor([1])}])
    with pytest.raises(TypeError, match="'wav'"):
        collate_audio([{**a, "wav": torch.zeros(2, 3)}])
    with pytest.raises(TypeError, match="dict"):
        collate_audio([("a", torch.zeros(3))])
    assert collate_audio([]) is None and collate_audio([None, None]) is None


# --- end to end ----------------------------------------------------------------------------------------------


def make_corpus(tmp_path: Path) -> tuple[list[Utterance], dict[str, int]]:
    """Good and bad utterances; returns them and the number of samples of each good one."""
    good = {"g0": 800, "g1": 1600, "g2": 400, "g3": 1200}
    utts = [utt(tmp_path, k, n) for k, n in good.items()]
    utts.insert(1, utt(tmp_path, "missing", None))
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really a wave file")
    utts.insert(3, Utterance("bad", tmp_path / "bad.wav", "abc", 0.05))
    utts.append(utt(tmp_path, "notext", 500, text="..."))
    return utts, good


@pytest.mark.parametrize("num_workers", [0, 1])
def test_dataloader_epoch_survives_bad_items_and_reports_them(tmp_path, num_workers):
    utts, good = make_corpus(tmp_path)
    ds = AudioDataset(utts, tokenizer=CharTokenizer())
    # every batch mixes good and bad items, so each worker's skips ride on a non-None batch
    batch_sampler = [[0, 1], [2, 3, 4], [5, 6]]
    loader = DataLoader(ds, batch_sampler=batch_sampler, collate_fn=ds.collate, num_workers=num_workers)
    seen, total = {}, SkipReport()
    for batch in loader:
        assert batch is not None
        total = total.merge(batch["skips"])
        for k, n in zip(batch["ids"], batch["wav_lengths"].tolist()):
            seen[k] = n
    assert seen == good
    assert total.counts == {"missing audio": 1, "unreadable audio": 1, "empty tokens": 1}
    if num_workers == 0:
        assert ds.skips == total
    else:
        assert ds.skips.total == 0  # the worker's copy counted them, not the main process's


def test_all_bad_batch_is_none_and_its_skips_ride_with_the_next_batch(tmp_path):
    utts, _ = make_corpus(tmp_path)
    ds = AudioDataset(utts, tokenizer=CharTokenizer())
    assert ds.collate([ds[1], ds[3]]) is None
    nxt = ds.collate([ds[0]])
    assert nxt["skips"].counts == {"missing audio": 1, "unreadable audio": 1}
    assert ds.collate([ds[2]])["skips"].total == 0


def test_manifest_to_batches(tmp_path):
    for k, n in {"a": 1600, "b": 3200, "c": 800}.items():
        sf.write(str(tmp_path / f"{k}.wav"), sine(n, 16000), 16000)
    (tmp_path / "m.jsonl").write_text(
        "\n".join(
            f'{{"audio": "{k}.wav", "text": "{k * r}", "duration": {n / 16000}}}'
            for k, n, r in [("a", 1600, 1), ("b", 3200, 2), ("c", 800, 3)]
        )
        + "\n"
    )
    utts, skips = read_jsonl_manifest(tmp_path / "m.jsonl")
    ds = AudioDataset(utts, tokenizer=CharTokenizer())
    sampler = BucketBatchSampler(ds.durations, max_frames=0.25, num_buckets=1, shuffle=False)
    batches = list(DataLoader(ds, batch_sampler=sampler, collate_fn=collate_audio))
    # sorted by duration: c (0.05 s), a (0.1 s), b (0.2 s); 3 * 0.1 > 0.25 so b gets its own batch
    assert [b["ids"] for b in batches] == [["c", "a"], ["b"]]
    assert [b["wav_lengths"].tolist() for b in batches] == [[800, 1600], [3200]]
    assert batches[0]["tokens"].tolist() == [[2, 2, 2], [0, TOKEN_PAD, TOKEN_PAD]]
    assert batches[0]["token_lengths"].tolist() == [3, 1] and skips.total == 0
