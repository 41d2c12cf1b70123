"""The offline demo end to end on a tiny corpus (a few utterances, a few steps, a 1-layer model): it runs,
writes its outputs, is deterministic for a seed, and ends with the exact ``held-out WER: X.X%`` line."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("espeakng_loader")

from ebranchformer.asr.demo import demo_corpus_config, demo_train_config, run_demo  # noqa: E402
from ebranchformer.asr.model_dir import load_weights  # noqa: E402
from ebranchformer.asr.train_config import TrainConfig  # noqa: E402
from ebranchformer.cli import main  # noqa: E402

TINY_CORPUS = {"n_valid": 3, "n_test_seen": 3, "n_test_heldout": 4}
TINY_RECIPE = ["model.encoder.num_layers=2", "model.encoder.interctc_layers=[1]", "data.max_frames=1500"]


def _run(out, seed=0, procs=1, minutes=None):
    lines: list[str] = []
    summary = run_demo(seed=seed, out_dir=out, steps=3, procs=procs, threads=1, n_train=12, corpus=TINY_CORPUS,
                       overrides=TINY_RECIPE, examples=2, minutes=minutes, log=lines.append)
    return summary, lines


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    a = tmp_path_factory.mktemp("demo_a") / "out"
    b = tmp_path_factory.mktemp("demo_b") / "out"
    return (a, *_run(a)), (b, *_run(b))


def test_demo_writes_its_outputs(two_runs):
    out, summary, _ = two_runs[0]
    for name in ("summary.json", "learning_curves.png", "metrics.jsonl", "lexicon.txt", "train.yaml",
                 "model/config.json", "model/model.safetensors", "corpus/corpus.json",
                 "corpus/test_heldout.jsonl"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "summary.json").read_text())
    assert doc["steps"] == 3 and doc["seed"] == 0
    assert doc["corpus_utterances"] == {"train": 12, "valid": 3, "test_seen": 3, "test_heldout": 4}
    for split in ("test_heldout", "test_seen"):
        for decoder in ("greedy", "lexicon"):
            assert 0.0 <= doc[split][decoder]["cer"]
            assert doc[split][decoder]["wer"] >= 0.0
    assert summary["test_heldout"]["lexicon"]["wer"] == doc["test_heldout"]["lexicon"]["wer"]
    assert set(doc["timings_s"]) == {"synthesis_s", "training_s", "evaluation_s", "total_s"}


def test_demo_last_line_format(two_runs):
    _, summary, lines = two_runs[0]
    assert re.fullmatch(r"held-out WER: \d+\.\d%", lines[-1])
    assert lines[-1] == f"held-out WER: {100 * summary['test_heldout']['lexicon']['wer']:.1f}%"
    assert any(line.strip().startswith("REF:") for line in lines)
    assert any(line.strip().startswith("HYP:") for line in lines)


def test_demo_is_deterministic_for_a_seed(two_runs):
    (out_a, sum_a, lines_a), (out_b, sum_b, lines_b) = two_runs
    wa, wb = load_weights(out_a / "model" / "model.safetensors"), load_weights(out_b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)
    for split in ("test_heldout", "test_seen"):
        assert sum_a[split]["greedy"]["wer"] == sum_b[split]["greedy"]["wer"]
        assert sum_a[split]["examples"] == sum_b[split]["examples"]
    assert lines_a[-1] == lines_b[-1]
    assert (out_a / "corpus" / "train.jsonl").read_text() == (out_b / "corpus" / "train.jsonl").read_text()


def test_demo_rerun_in_place_reuses_the_corpus(two_runs):
    out, summary, _ = two_runs[0]
    again, lines = _run(out)
    assert again["timings_s"]["synthesis_s"] < summary["timings_s"]["synthesis_s"] + 1.0
    assert again["test_heldout"]["greedy"]["wer"] == summary["test_heldout"]["greedy"]["wer"]
    assert lines[-1] == f"held-out WER: {100 * again['test_heldout']['lexicon']['wer']:.1f}%"


def test_demo_trains_with_two_cpu_processes(two_runs, tmp_path):
    out = tmp_path / "ddp"
    summary, lines = _run(out, procs=2)
    assert summary["steps"] == 3 and "2 processes" in summary["device"]
    assert (out / "model" / "model.safetensors").is_file() and (out / "learning_curves.png").is_file()
    assert re.fullmatch(r"held-out WER: \d+\.\d%", lines[-1])


def test_demo_wall_clock_budget_stops_training(two_runs, tmp_path):
    out = tmp_path / "budget"
    summary, lines = _run(out, minutes=1e-6)  # spent before the first step
    assert summary["steps"] == 0 and (out / "model" / "config.json").is_file()
    assert re.fullmatch(r"held-out WER: \d+\.\d%", lines[-1])


def test_demo_recipe_is_a_valid_train_config(tmp_path):
    cfg = TrainConfig.from_dict(demo_train_config(tmp_path / "o", tmp_path / "c", seed=3, steps=500))
    assert cfg.optim.total_steps == 500 and cfg.seed == 3 and cfg.deterministic
    assert cfg.model.encoder["input_layer"]["class"] == "FrameStacking"
    corpus = demo_corpus_config()
    assert len(corpus.train_voices) >= 8 and len(corpus.heldout_voices) >= 3
    assert corpus.rate_wpm == (130, 220) and corpus.snr_db == (10.0, 30.0) and corpus.sample_rate == 16000
    assert (corpus.min_words, corpus.max_words) == (3, 8)


def test_demo_argument_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="steps"):
        run_demo(out_dir=tmp_path, steps=0)
    with pytest.raises(ValueError, match="decoder"):
        run_demo(out_dir=tmp_path, decoder="oracle")
    with pytest.raises(ValueError, match="minutes"):
        run_demo(out_dir=tmp_path, minutes=-1)
    assert main(["demo", "--out", str(tmp_path), "--set", "optim.lr=oops"]) == 2
    assert "optim.lr" in capsys.readouterr().err
