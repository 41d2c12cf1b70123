"""Training data helpers: tokenizer building, the short-item filter in collation, loaders that leave torch's
global RNG alone, atomic statistics files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ebranchformer.asr.data import AudioDataset
from ebranchformer.asr.global_mvn import GlobalMVN, compute_stats
from ebranchformer.asr.manifest import Utterance
from ebranchformer.asr.tokenizer import load_tokenizer
from ebranchformer.asr.train_config import TokenizerConfig
from ebranchformer.asr.train_data import (
    MinLengthCollate,
    build_tokenizer,
    frames_of,
    make_loader,
    save_stats_atomic,
)

TEXTS = ["hello world", "hold the door", "word for word"]


def test_build_char_bpe_and_existing_tokenizers(tmp_path):
    char = build_tokenizer(TokenizerConfig(kind="char"), TEXTS, tmp_path / "char")
    assert (
        load_tokenizer(tmp_path / "char").tokens == char.tokens and char.decode(char.encode("hold")) == "hold"
    )
    bpe = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=20), TEXTS * 5, tmp_path / "bpe")
    assert bpe.vocab_size == 20 and (tmp_path / "bpe" / "bpe.model").is_file()
    again = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=20), TEXTS * 5, tmp_path / "bpe2")
    assert again.tokens == bpe.tokens  # deterministic
    copied = build_tokenizer(TokenizerConfig(dir=str(tmp_path / "bpe")), [], tmp_path / "copy")
    assert copied.tokens == bpe.tokens and load_tokenizer(tmp_path / "copy").tokens == bpe.tokens
    with pytest.raises(ValueError, match="transcripts"):
        build_tokenizer(TokenizerConfig(kind="char"), [], tmp_path / "none")
    assert not (tmp_path / "none").exists()


def _items(lengths):
    return [
        {"id": f"u{i}", "wav": torch.ones(n), "text": "a", "tokens": torch.tensor([1])} if n else None
        for i, n in enumerate(lengths)
    ]


def test_min_length_collate_drops_and_counts_short_items():
    collate = MinLengthCollate(AudioDataset([]), min_samples=10)
    batch = collate(_items([12, 5, 20, 0]))
    assert batch["ids"] == ["u0", "u2"] and batch["wav_lengths"].tolist() == [12, 20]
    assert batch["skips"].counts == {"too short": 1} and batch["skips"].examples == {"too short": ["u1"]}
    assert collate(_items([3, 4])) is None  # all too short: counted with the next batch
    assert collate(_items([11]))["skips"].counts == {"too short": 2}
    assert collate(_items([11]))["skips"].total == 0


def test_make_loader_leaves_the_global_rng_alone():
    ds = torch.utils.data.TensorDataset(torch.arange(10.0))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    out = list(make_loader(ds, [[0, 1], [2]], lambda items: [x[0].item() for x in items], num_workers=0))
    assert out == [[0.0, 1.0], [2.0]] and torch.equal(torch.rand(3), expected)


def test_frames_of_and_stats_file(tmp_path):
    assert frames_of([0.5, 1.0], 8000, 80) == [50.0, 100.0]
    mvn = compute_stats([np.random.default_rng(0).standard_normal((30, 4))])
    path = save_stats_atomic(mvn, tmp_path / "feats_stats.npz")
    back = GlobalMVN.from_espnet_stats(path)
    assert torch.equal(back.feat_sum, mvn.feat_sum) and int(back.count) == 30
    assert [p.name for p in tmp_path.iterdir()] == ["feats_stats.npz"]


def test_an_all_bad_batch_is_none_and_counted_by_the_dataset(tmp_path):
    ds = AudioDataset([Utterance("a", str(tmp_path / "missing.wav"), "x", 1.0)])
    collate = MinLengthCollate(ds, 1)
    assert collate([ds[0]]) is None and ds.skips.counts == {"missing audio": 1}
