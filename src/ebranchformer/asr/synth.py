"""An offline speech corpus for the demo: random sentences spoken by espeak-ng voices, with noise.

:func:`synthesize_corpus` writes 16 kHz 16-bit mono wav files and four JSONL manifests
(``{"audio": relative path, "text": ..., "duration": seconds}`` per line):

- ``train.jsonl``: the training voices;
- ``valid.jsonl`` and ``test_seen.jsonl``: the training voices, sentences not in any other split;
- ``test_heldout.jsonl``: voices never used for training, new sentences too;

plus ``corpus.json``, a summary written last (so its presence means the corpus is complete).
Each utterance draws its speaking rate, base pitch, intonation range, silent padding, noise
colour, SNR and level from the ranges in :class:`CorpusConfig`. The output depends only on the
config and the seed (byte for byte), not on the number of worker processes.

Example:
    >>> from ebranchformer.asr.synth import CorpusConfig, synthesize_corpus
    >>> config = CorpusConfig(n_train=3000, n_valid=200, n_test_seen=200, n_test_heldout=300)
    >>> manifests = synthesize_corpus("data/espeak", config, seed=0)  # doctest: +SKIP
    >>> sorted(manifests)  # doctest: +SKIP
    ['test_heldout', 'test_seen', 'train', 'valid']
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from ebranchformer.asr.synth_noise import NOISE_TYPES, colored_noise, scale_to_snr
from ebranchformer.asr.synth_text import VOCABULARY, sample_sentences, sentence_capacity
from ebranchformer.asr.synth_workers import run_in_workers

__all__ = ["SPLITS", "CorpusConfig", "UtteranceSpec", "plan_corpus", "render_utterances", "synthesize_corpus"]

SPLITS = ("train", "valid", "test_seen", "test_heldout")
"""The corpus splits, in the order their sentences are drawn."""

_SHARD_SIZE = 32  # utterances per espeak batch (one fork each); part of what fixes the output


def _check_pair(name: str, value, lo: float, hi: float, integer: bool) -> tuple:
    kinds = (int,) if integer else (int, float)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, kinds) for v in value)):
        kind = "ints" if integer else "numbers"
        raise TypeError(f"{name} must be a pair of {kind} (low, high), got {value!r}")
    if not (lo <= value[0] <= value[1] <= hi):
        raise ValueError(f"{name} must satisfy {lo} <= low <= high <= {hi}, got {tuple(value)}")
    return tuple(value)


def _check_voices(name: str, voices) -> tuple[str, ...]:
    if isinstance(voices, str) or not isinstance(voices, (tuple, list)) or not voices:
        raise TypeError(f"{name} must be a non-empty sequence of 'language+variant' strings, got {voices!r}")
    for v in voices:
        parts = v.split("+") if isinstance(v, str) else []
        if not 1 <= len(parts) <= 2 or not all(p and p.replace("-", "").isalnum() for p in parts):
            raise ValueError(f"{name} holds {v!r}; expected an espeak-ng voice like 'en-us' or 'en-us+m3'")
    if len(set(voices)) != len(voices):
        raise ValueError(f"{name} lists a voice twice: {voices!r}")
    return tuple(voices)


@dataclass(frozen=True)
class CorpusConfig:
    """What to synthesize; every range is (low, high), inclusive, drawn uniformly per utterance.

    Attributes:
        n_train, n_valid, n_test_seen, n_test_heldout: utterances per split (each >= 1).
        train_voices: espeak-ng voices (``language+variant``) for train, valid and test_seen.
        heldout_voices: voices for test_heldout only; must not overlap ``train_voices``.
        min_words, max_words: words per sentence.
        rate_wpm: speaking rate in words per minute (espeak allows 80-450).
        pitch: base pitch, espeak units 0-100 (50 is the voice's own).
        pitch_range: intonation range, espeak units 0-100 (0 is monotone, 50 the voice's own).
        snr_db: signal-to-noise ratio of the added noise, in dB, against the speech's mean power.
        pad_s: silence in seconds added before and after the speech (each drawn apart); the noise
            covers it too.
        noise_types: noise colours to choose from: "white" and/or "pink".
        peak: peak amplitude of the final (noisy) signal, in (0, 1).
        sample_rate: output rate in Hz (espeak speaks at 22050; soxr resamples).
        num_workers: worker processes (0: synthesize in the calling process).
    """

    n_train: int = 3000
    n_valid: int = 200
    n_test_seen: int = 200
    n_test_heldout: int = 300
    train_voices: tuple[str, ...] = ("en-us+m1", "en-us+f1", "en+m2", "en+f2", "en-gb-x-rp+m3",
                                     "en-gb-scotland+f3", "en-029+m5", "en-us-nyc+m6", "en-gb-x-gbclan+m8",
                                     "en+klatt")
    heldout_voices: tuple[str, ...] = ("en-us+m4", "en-gb-x-rp+f4", "en+m7")
    min_words: int = 3
    max_words: int = 8
    rate_wpm: tuple[int, int] = (130, 220)
    pitch: tuple[int, int] = (30, 70)
    pitch_range: tuple[int, int] = (20, 80)
    snr_db: tuple[float, float] = (10.0, 30.0)
    pad_s: tuple[float, float] = (0.05, 0.25)
    noise_types: tuple[str, ...] = NOISE_TYPES
    peak: tuple[float, float] = (0.3, 0.9)
    sample_rate: int = 16000
    num_workers: int = 2

    def __post_init__(self):
        for name in ("n_train", "n_valid", "n_test_seen", "n_test_heldout", "min_words", "max_words",
                     "sample_rate", "num_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        for name in ("n_train", "n_valid", "n_test_seen", "n_test_heldout"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.min_words <= self.max_words <= 30:
            raise ValueError(f"need 1 <= min_words <= max_words <= 30, got min_words={self.min_words}, "
                             f"max_words={self.max_words}")
        total = self.n_train + self.n_valid + self.n_test_seen + self.n_test_heldout
        if total > sentence_capacity(self.min_words, self.max_words):
            raise ValueError(f"{total} distinct sentences of {self.min_words}-{self.max_words} words "
                             "(n_train + n_valid + n_test_seen + n_test_heldout) do not exist")
        if not 8000 <= self.sample_rate <= 48000:
            raise ValueError(f"sample_rate must be in [8000, 48000], got {self.sample_rate}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        pairs = {"rate_wpm": (80, 450, True), "pitch": (0, 100, True), "pitch_range": (0, 100, True),
                 "snr_db": (-20.0, 100.0, False), "pad_s": (0.0, 5.0, False), "peak": (0.01, 0.99, False)}
        for name, (lo, hi, integer) in pairs.items():
            object.__setattr__(self, name, _check_pair(name, getattr(self, name), lo, hi, integer))
        for name in ("train_voices", "heldout_voices"):
            object.__setattr__(self, name, _check_voices(name, getattr(self, name)))
        shared = set(self.train_voices) & set(self.heldout_voices)
        if shared:
            raise ValueError(f"heldout_voices must not overlap train_voices, both hold {sorted(shared)}")
        noise = self.noise_types
        if isinstance(noise, str) or not isinstance(noise, (tuple, list)) or not noise or \
                not set(noise) <= set(NOISE_TYPES) or len(set(noise)) != len(noise):
            raise ValueError(f"noise_types must be distinct names from {NOISE_TYPES}, got {noise!r}")
        object.__setattr__(self, "noise_types", tuple(noise))

    def split_size(self, split: str) -> int:
        """Number of utterances in ``split`` (one of :data:`SPLITS`)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return getattr(self, f"n_{split}")

    def split_voices(self, split: str) -> tuple[str, ...]:
        """The voices that speak ``split``."""
        self.split_size(split)  # validates the name
        return self.heldout_voices if split == "test_heldout" else self.train_voices


@dataclass(frozen=True)
class UtteranceSpec:
    """Everything that determines one utterance's audio."""

    text: str
    voice: str  # espeak-ng "language+variant"
    rate_wpm: int
    pitch: int
    pitch_range: int
    noise_type: str
    snr_db: float
    lead_s: float  # silence before the speech
    trail_s: float  # silence after the speech
    peak: float
    seed: int  # for espeak's and the noise's random generators


def plan_corpus(config: CorpusConfig, seed: int) -> dict[str, list[UtteranceSpec]]:
    """The utterances of every split: distinct sentences, voices in turn, parameters drawn per utterance."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rng = np.random.default_rng([seed, 0])
    seen: set[str] = set()
    plan = {}
    for split_ix, split in enumerate(SPLITS):
        sentences = sample_sentences(rng, config.split_size(split), config.min_words, config.max_words, seen)
        seen.update(sentences)
        voices = config.split_voices(split)
        offset = int(rng.integers(len(voices)))
        specs = []
        for i, text in enumerate(sentences):
            r = np.random.default_rng([seed, 1, split_ix, i])
            specs.append(UtteranceSpec(
                text=text, voice=voices[(offset + i) % len(voices)],
                rate_wpm=int(r.integers(config.rate_wpm[0], config.rate_wpm[1] + 1)),
                pitch=int(r.integers(config.pitch[0], config.pitch[1] + 1)),
                pitch_range=int(r.integers(config.pitch_range[0], config.pitch_range[1] + 1)),
                noise_type=config.noise_types[int(r.integers(len(config.noise_types)))],
                snr_db=round(float(r.uniform(*config.snr_db)), 3),
                lead_s=round(float(r.uniform(*config.pad_s)), 3),
                trail_s=round(float(r.uniform(*config.pad_s)), 3),
                peak=round(float(r.uniform(*config.peak)), 3),
                seed=int(r.integers(2**31 - 1))))
        plan[split] = specs
    return plan


def _mix(speech: np.ndarray, spec: UtteranceSpec, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    if not np.any(speech):
        raise RuntimeError(f"espeak-ng produced silence for {spec.text!r} with voice {spec.voice!r}")
    clean = np.pad(speech, (round(spec.lead_s * sample_rate), round(spec.trail_s * sample_rate)))
    noise = colored_noise(np.random.default_rng(spec.seed), clean.size, spec.noise_type)
    noisy = clean + scale_to_snr(noise, speech, spec.snr_db)
    gain = spec.peak / float(np.max(np.abs(noisy)))
    return (clean * gain).astype(np.float32), (noisy * gain).astype(np.float32)


def render_utterances(specs: list[UtteranceSpec], sample_rate: int = 16000,
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Speak ``specs`` (as one espeak batch) and add their noise: (clean, noisy) float32 (T,) each.

    ``clean`` is the speech between ``spec.lead_s`` and ``spec.trail_s`` seconds of silence. Both
    signals of a pair are scaled by the same gain (the noisy peak becomes ``spec.peak``), so
    ``noisy - clean`` is exactly the noise, ``spec.snr_db`` below the speech's mean power.
    Equal lists give equal signals.
    """
    from ebranchformer.asr.audio import resample
    from ebranchformer.asr.espeak import SAMPLE_RATE, SpeechRequest, synthesize_batch

    requests = []
    for spec in specs:
        voice, _, variant = spec.voice.partition("+")
        requests.append(SpeechRequest(spec.text, voice, variant or None, spec.rate_wpm, spec.pitch,
                                      spec.pitch_range, spec.seed))
    pcms = synthesize_batch(requests)
    return [_mix(resample(pcm.astype(np.float64) / 32768.0, SAMPLE_RATE, sample_rate), spec, sample_rate)
            for pcm, spec in zip(pcms, specs)]


def _write_shards(shards: list, sample_rate: int) -> None:
    """Render each shard, a list of (wav path, spec fields), to its wav files."""
    from ebranchformer.asr.audio import save_audio

    for shard in shards:
        rendered = render_utterances([UtteranceSpec(**fields) for _, fields in shard], sample_rate)
        for (path, _), (_, noisy) in zip(shard, rendered):
            save_audio(path, noisy, sample_rate)


def _write_job(job: dict) -> None:
    """Worker entry point: ``{"shards": [...], "sample_rate": int}``."""
    _write_shards(job["shards"], job["sample_rate"])


def _config_record(config: CorpusConfig) -> dict:
    """The config as corpus.json stores it (JSON types; the worker count does not change the output)."""
    return json.loads(json.dumps(dataclasses.asdict(config) | {"num_workers": None}))


def _summary(config: CorpusConfig, seed: int, plan: dict, durations: dict) -> dict:
    return {
        "seed": seed,
        "config": _config_record(config),
        "sample_rate": config.sample_rate,
        "vocabulary": list(VOCABULARY),
        "splits": {split: {"manifest": f"{split}.jsonl", "utterances": len(plan[split]),
                           "hours": round(sum(durations[split]) / 3600.0, 4),
                           "voices": sorted(config.split_voices(split))} for split in SPLITS},
    }


def synthesize_corpus(out_dir: str | os.PathLike, config: CorpusConfig | None = None, seed: int = 0,
                      overwrite: bool = False) -> dict[str, Path]:
    """Write the corpus under ``out_dir``; returns {split: manifest path} for the :data:`SPLITS`.

    A complete corpus already there from the same config and seed is reused, unless ``overwrite``.
    """
    config = CorpusConfig() if config is None else config
    if not isinstance(config, CorpusConfig):
        raise TypeError(f"config must be a CorpusConfig, got {type(config).__name__}")
    out = Path(out_dir)
    manifests = {split: out / f"{split}.jsonl" for split in SPLITS}
    plan = plan_corpus(config, seed)
    summary_path = out / "corpus.json"
    if not overwrite and summary_path.is_file() and all(p.is_file() for p in manifests.values()):
        old = json.loads(summary_path.read_text())
        if old.get("seed") == seed and old.get("config") == _config_record(config):
            return manifests
    _check_voices_exist(config)
    jobs, rel_paths = [], {}
    for split in SPLITS:
        (out / "wav" / split).mkdir(parents=True, exist_ok=True)
        rel_paths[split] = [f"wav/{split}/{split}_{i:05d}.wav" for i in range(len(plan[split]))]
        jobs += [(str(out / rel), dataclasses.asdict(spec))
                 for rel, spec in zip(rel_paths[split], plan[split])]
    summary_path.unlink(missing_ok=True)
    shards = [jobs[i:i + _SHARD_SIZE] for i in range(0, len(jobs), _SHARD_SIZE)]
    if config.num_workers == 0:
        _write_shards(shards, config.sample_rate)
    else:
        n = config.num_workers
        per_worker = [{"sample_rate": config.sample_rate, "shards": shards[k::n]}
                      for k in range(min(n, len(shards)))]
        run_in_workers("ebranchformer.asr.synth:_write_job", per_worker)
    durations = {}
    for split in SPLITS:
        durations[split] = [round(sf.info(str(out / rel)).frames / config.sample_rate, 4)
                            for rel in rel_paths[split]]
        lines = [json.dumps({"audio": rel, "text": spec.text, "duration": d})
                 for rel, spec, d in zip(rel_paths[split], plan[split], durations[split])]
        manifests[split].write_text("".join(line + "\n" for line in lines))
    summary_path.write_text(json.dumps(_summary(config, seed, plan, durations), indent=1) + "\n")
    return manifests


def _check_voices_exist(config: CorpusConfig) -> None:
    from ebranchformer.asr.espeak import list_languages, list_variants

    languages, variants = set(list_languages()), set(list_variants())
    for voice in config.train_voices + config.heldout_voices:
        language, _, variant = voice.partition("+")
        if language.lower() not in languages or (variant and variant.lower() not in variants):
            raise ValueError(f"voice {voice!r} is not in the shipped espeak-ng data (see "
                             "espeak.list_languages() and espeak.list_variants())")
