"""The build records of reused training artifacts: equal settings pass, differing ones raise naming them."""

from __future__ import annotations

import pytest

from ebranchformer.asr.provenance import check_source, record_source


def test_equal_settings_pass_through_json(tmp_path):
    path = tmp_path / "source.json"
    record_source(path, {"features": {"n_mels": 80, "fmax": None, "shape": (1, 2)}, "train": "a.jsonl"})
    check_source(path, {"features": {"n_mels": 80, "fmax": None, "shape": [1, 2]}, "train": "a.jsonl"}, "x", "dir")


def test_differences_raise_naming_each_setting(tmp_path):
    path = tmp_path / "source.json"
    record_source(path, {"tokenizer": {"kind": "char"}, "train": "a.jsonl", "extra": 1})
    with pytest.raises(ValueError) as err:
        check_source(path, {"tokenizer": {"kind": "bpe"}, "train": "a.jsonl"}, "tokenizer", "out/tokenizer")
    msg = str(err.value)
    assert "tokenizer: built with {'kind': 'char'}, now {'kind': 'bpe'}" in msg
    assert "extra: built with 1, now None" in msg and "remove 'out/tokenizer'" in msg and "train" not in msg


def test_warn_only_keys_and_missing_records_warn(tmp_path, caplog):
    path = tmp_path / "source.json"
    with caplog.at_level("WARNING"):
        check_source(path, {"train": "a.jsonl"}, "tokenizer", "out/tokenizer")  # no record yet
        assert "no record" in caplog.text
        record_source(path, {"train": "a.jsonl", "tokenizer": 1})
        check_source(path, {"train": "b.jsonl", "tokenizer": 1}, "tokenizer", "out/tokenizer", warn_only=("train",))
        assert "built with a different train: built with 'a.jsonl', now 'b.jsonl'" in caplog.text
    with pytest.raises(ValueError, match="train"):
        check_source(path, {"train": "b.jsonl", "tokenizer": 1}, "tokenizer", "out/tokenizer")
