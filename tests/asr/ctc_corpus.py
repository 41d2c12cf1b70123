"""A tiny, learnable speech-like corpus for the CTC model and training tests: letters spoken as tones.

Each letter of ``LETTERS`` is a short sine burst at its own frequency (plus a little noise, a random length
and a short pause), so a 2-layer model learns to transcribe within a few dozen steps. Written as 8 kHz wav
files with JSONL manifests (``{"audio", "text", "duration"}``) as the data layer reads them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from ebranchformer.asr.train_config import TrainConfig

__all__ = [
    "LETTERS",
    "SAMPLE_RATE",
    "single_thread",
    "tiny_model_config",
    "tiny_train_config",
    "tone_wave",
    "write_tone_corpus",
]

SAMPLE_RATE = 8000
LETTERS = "abcd"
_FREQS = {"a": 350.0, "b": 700.0, "c": 1200.0, "d": 2000.0}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` intra-op threads (the previous count restored afterwards)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def single_thread() -> contextlib.AbstractContextManager[None]:
    """Run torch on one intra-op thread (restored afterwards). The tiny models gain nothing from more, and
    on a shared, busy machine OpenMP threads waiting for each other make training runs 10-20x slower."""
    return torch_threads(1)


def tone_wave(text: str, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """float32 (S,) waveform of ``text`` (letters of LETTERS): 70-110 ms bursts, 30 ms pauses."""
    parts = [np.zeros(int(0.03 * sample_rate), np.float32)]
    for ch in text:
        n = int(rng.uniform(0.07, 0.11) * sample_rate)
        t = np.arange(n) / sample_rate
        burst = 0.5 * np.sin(2 * np.pi * _FREQS[ch] * t) * np.hanning(n)
        parts += [burst.astype(np.float32), np.zeros(int(0.03 * sample_rate), np.float32)]
    wav = np.concatenate(parts)
    return (wav + 0.01 * rng.standard_normal(wav.shape[0])).astype(np.float32)


def _write_split(
    root: Path, name: str, n: int, rng: np.random.Generator, fixed_duration: float | None
) -> Path:
    (root / "wav").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        text = "".join(rng.choice(list(LETTERS), size=int(rng.integers(2, 6))))
        wav = tone_wave(text, rng)
        rel = f"wav/{name}_{i:03d}.wav"
        sf.write(root / rel, wav, SAMPLE_RATE, subtype="PCM_16")
        duration = fixed_duration if fixed_duration is not None else len(wav) / SAMPLE_RATE
        lines.append(json.dumps({"audio": rel, "text": text, "duration": duration, "id": f"{name}_{i:03d}"}))
    path = root / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_tone_corpus(
    root: str | Path, n_train: int = 32, n_valid: int = 8, seed: int = 0, fixed_duration: float | None = None
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``valid.jsonl`` (and their wavs) under ``root``; returns the two paths.

    ``fixed_duration``: write this duration for every manifest line instead of the true one (all utterances
    then look equally long to the batch sampler, which makes batch packing independent of the group size).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    return (
        _write_split(root, "train", n_train, rng, fixed_duration),
        _write_split(root, "valid", n_valid, rng, fixed_duration),
    )


def tiny_model_config(dropout: float = 0.0, **model: Any) -> dict[str, Any]:
    """ModelConfig dict of a tiny model (8 kHz, 23 mels, D=32, 2 E-Branchformer layers, conv2d x4)."""
    cfg: dict[str, Any] = {
        "features": {
            "sample_rate": SAMPLE_RATE,
            "n_fft": 256,
            "win_length": 200,
            "hop_length": 80,
            "n_mels": 23,
        },
        "specaug": None,
        "encoder": {
            "out_dim": 32,
            "num_layers": 2,
            "num_heads": 2,
            "input_layer": {"class": "Conv2dSubsampling", "kind": "conv2d"},
            "encoder_layer": {
                "class": "EBranchformerLayer",
                "ff_dim": 64,
                "cgmlp_ff_dim": 32,
                "cgmlp_conv_kernel": 7,
                "merge_conv_kernel": 3,
            },
            "dropout": dropout,
            "att_dropout": dropout,
            "input_dropout": dropout,
            "final_norm": True,
        },
    }
    cfg.update(model)
    return cfg


def tiny_train_config(
    out: str | Path, train: str | Path, valid: str | Path | None, **sections: Any
) -> TrainConfig:
    """A TrainConfig for the tiny model; ``sections`` are merged into the top-level dict (a section's dict
    is merged into its defaults here, e.g. ``optim={"total_steps": 8}``)."""
    doc: dict[str, Any] = {
        "output_dir": str(out),
        "data": {
            "train": str(train),
            "valid": None if valid is None else str(valid),
            "sample_rate": SAMPLE_RATE,
            "max_frames": 600.0,
            "num_buckets": 2,
        },
        "tokenizer": {"kind": "char"},
        "model": tiny_model_config(),
        "optim": {
            "name": "adamw",
            "lr": 0.004,
            "scheduler": "noam",
            "warmup_steps": 8,
            "total_steps": 40,
            "grad_clip": 5.0,
        },
        "checkpoint": {"every_steps": 20, "keep_last": 2, "average_best": 2},
        "log": {"every_steps": 5, "progress_bar": False, "plot": True},
        "seed": 0,
        "deterministic": True,
        "device": "cpu",
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return TrainConfig.from_dict(doc)
