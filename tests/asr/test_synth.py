"""The synthetic espeak-ng corpus: files, manifests, voices, noise, determinism, config checks."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("espeakng_loader")

from ebranchformer.asr.synth import SPLITS, CorpusConfig, plan_corpus, render_utterances, synthesize_corpus
from ebranchformer.asr.synth_text import VOCABULARY

TINY = CorpusConfig(n_train=6, n_valid=2, n_test_seen=2, n_test_heldout=3, num_workers=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return out, synthesize_corpus(out, TINY, seed=7)


def _read(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_default_config_meets_the_demo_needs():
    config = CorpusConfig()
    assert len(config.train_voices) >= 8 and len(config.heldout_voices) >= 3
    assert (config.min_words, config.max_words) == (3, 8)
    assert (config.rate_wpm, config.snr_db) == ((130, 220), (10, 30))
    assert config.sample_rate == 16000 and len(VOCABULARY) >= 150
    held_variants = {v.partition("+")[2] for v in config.heldout_voices}
    assert held_variants.isdisjoint(v.partition("+")[2] for v in config.train_voices)


def test_manifests_point_at_16k_mono_pcm16_audio_of_plausible_length(corpus):
    out, manifests = corpus
    assert set(manifests) == set(SPLITS)
    plan = plan_corpus(TINY, seed=7)
    for split in SPLITS:
        rows = _read(manifests[split])
        assert len(rows) == TINY.split_size(split)
        for row, spec in zip(rows, plan[split]):
            assert set(row) == {"audio", "text", "duration"} and row["text"] == spec.text
            info = sf.info(str(out / row["audio"]))
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert row["duration"] == pytest.approx(info.frames / 16000, abs=1e-4)
            words = row["text"].split()
            assert 3 <= len(words) <= 8 and set(words) <= set(VOCABULARY)
            nominal = len(words) * 60.0 / spec.rate_wpm  # seconds at the nominal words per minute
            speech = row["duration"] - spec.lead_s - spec.trail_s
            assert 0.55 * nominal < speech < 1.4 * nominal
            wav, _ = sf.read(str(out / row["audio"]))
            assert 0.25 < np.abs(wav).max() < 0.95


def test_summary_and_splits(corpus):
    out, manifests = corpus
    summary = json.loads((out / "corpus.json").read_text())
    assert summary["seed"] == 7 and summary["sample_rate"] == 16000
    assert summary["splits"]["test_heldout"]["voices"] == sorted(TINY.heldout_voices)
    assert summary["splits"]["train"]["utterances"] == 6
    texts = {split: {row["text"] for row in _read(manifests[split])} for split in SPLITS}
    for split in ("valid", "test_seen", "test_heldout"):
        assert texts[split].isdisjoint(texts["train"])


def test_heldout_voices_are_disjoint_from_training_voices():
    plan = plan_corpus(TINY, seed=7)
    train_side = {spec.voice for split in ("train", "valid", "test_seen") for spec in plan[split]}
    heldout = {spec.voice for spec in plan["test_heldout"]}
    assert train_side <= set(TINY.train_voices) and heldout == set(TINY.heldout_voices)
    assert train_side.isdisjoint(heldout)
    assert len({spec.voice for spec in plan["train"]}) == 6  # voices taken in turn


def test_same_seed_same_bytes_with_workers_and_other_seed_differs(corpus, tmp_path):
    out, _ = corpus
    again = synthesize_corpus(tmp_path / "again", dataclasses.replace(TINY, num_workers=2), seed=7)
    assert _tree_bytes(out) == _tree_bytes(tmp_path / "again")
    synthesize_corpus(tmp_path / "other", TINY, seed=8)
    other = _tree_bytes(tmp_path / "other")
    assert other.keys() == _tree_bytes(out).keys()
    assert all(other[k] != v for k, v in _tree_bytes(out).items() if k.endswith((".wav", ".jsonl")))
    assert again["train"] == tmp_path / "again" / "train.jsonl"


def test_existing_corpus_is_reused_unless_overwrite(corpus):
    out, manifests = corpus
    wav = out / _read(manifests["train"])[0]["audio"]
    before = wav.stat().st_mtime_ns
    assert synthesize_corpus(out, TINY, seed=7) == manifests
    assert wav.stat().st_mtime_ns == before
    synthesize_corpus(out, TINY, seed=7, overwrite=True)
    assert wav.stat().st_mtime_ns != before


def test_noise_is_added_at_the_drawn_snr():
    config = CorpusConfig(n_train=6, n_valid=1, n_test_seen=1, n_test_heldout=1, snr_db=(10, 30))
    specs = plan_corpus(config, seed=3)["train"]
    assert {s.noise_type for s in specs} == {"white", "pink"}
    for spec, (clean, noisy) in zip(specs, render_utterances(specs)):
        lead, trail = round(spec.lead_s * 16000), round(spec.trail_s * 16000)
        assert 800 <= lead <= 4000 and 800 <= trail <= 4000
        assert not clean[:lead].any() and not clean[-trail:].any() and noisy[:lead].all()
        noise = noisy.astype(np.float64) - clean
        speech = clean[lead:-trail].astype(np.float64)
        snr = 10 * np.log10(np.mean(speech**2) / np.mean(noise**2))
        assert 10 <= snr <= 30 and snr == pytest.approx(spec.snr_db, abs=0.01)
        assert np.abs(noisy).max() == pytest.approx(spec.peak, rel=1e-5)


@pytest.mark.parametrize("kwargs, error", [
    ({"n_train": 0}, ValueError),
    ({"n_valid": 1.5}, TypeError),
    ({"min_words": 5, "max_words": 4}, ValueError),
    ({"rate_wpm": (60, 200)}, ValueError),
    ({"rate_wpm": (220, 130)}, ValueError),
    ({"pitch": (30, 170)}, ValueError),
    ({"snr_db": (10,)}, TypeError),
    ({"noise_types": ("brown",)}, ValueError),
    ({"peak": (0.5, 1.5)}, ValueError),
    ({"pad_s": (-0.1, 0.2)}, ValueError),
    ({"train_voices": ()}, TypeError),
    ({"train_voices": ("en-us+m1", "en-us+m1")}, ValueError),
    ({"heldout_voices": ("en us",)}, ValueError),
    ({"heldout_voices": ("en-us+m1",)}, ValueError),  # also a training voice
    ({"num_workers": -1}, ValueError),
    ({"n_train": 300, "min_words": 1, "max_words": 1}, ValueError),  # not that many distinct sentences
])
def test_bad_config_values_raise(kwargs, error):
    with pytest.raises(error):
        CorpusConfig(**kwargs)


def test_bad_seed_and_unknown_voice_raise(tmp_path):
    with pytest.raises(ValueError, match="seed"):
        plan_corpus(TINY, seed=-1)
    with pytest.raises(TypeError):
        synthesize_corpus(tmp_path, config={"n_train": 3})
    config = dataclasses.replace(TINY, heldout_voices=("en-us+nobody",))
    with pytest.raises(ValueError, match="en-us\\+nobody"):
        synthesize_corpus(tmp_path, config, seed=0)
