"""The JSONL metrics log (append, torn lines, truncation on resume) and the learning-curve PNG."""

from __future__ import annotations

import json

import pytest

from ebranchformer.asr.metrics_log import MetricsLog, plot_learning_curves


def test_append_read_and_truncate(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    assert log.records() == []
    for step in (1, 2, 3):
        log.append({"kind": "train", "step": step, "loss": 1.0 / step, "lr": 0.1})
    log.append({"kind": "valid", "step": 3, "loss": float("nan"), "wer": float("inf")})
    recs = log.records()
    assert [r["step"] for r in recs] == [1, 2, 3, 3] and recs[-1]["loss"] is None and recs[-1]["wer"] is None
    with open(log.path, "a") as f:
        f.write('{"kind": "train", "st')  # a record torn by a crash
    assert len(log.records()) == 4
    log.truncate_after(2)
    assert [r["step"] for r in log.records()] == [1, 2]
    assert all(json.loads(line) for line in log.path.read_text().splitlines())
    with pytest.raises(TypeError, match="dict"):
        log.append([1, 2])


def test_plot_writes_a_png(tmp_path):
    recs = [{"kind": "train", "step": s, "loss": 5.0 / s, "lr": 1e-3 * min(s, 5) / 5} for s in range(1, 21)]
    recs += [{"kind": "valid", "step": s, "loss": 4.0 / s, "wer": 1.0 / s, "cer": 0.5 / s} for s in (10, 20)]
    path = plot_learning_curves(recs, tmp_path / "curves.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    empty = plot_learning_curves([], tmp_path / "empty.png")  # no data yet: still a valid (empty) figure
    assert empty.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "empty.png"]  # no temp files left
