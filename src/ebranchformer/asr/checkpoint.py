"""Training checkpoints: crash-safe directories of weights and training state, retention, averaging.

A checkpoint is a directory ``<folder>/step_<00000123>/`` holding

* ``model.safetensors`` -- the model's state dict;
* ``state.pt`` -- the training state (optimizer, scheduler, grad scaler, RNG states, step counters, sampler
  position), written with ``torch.save`` and read back with ``torch.load(weights_only=True)``; keep it to
  tensors and plain containers of numbers/strings;
* ``meta.json`` -- small facts for choosing checkpoints without loading them (step, epoch, validation
  results), written last.

Each directory is built under a temporary name and renamed into place once complete and synced
(:func:`~ebranchformer.asr.atomic.atomic_directory`), so a process killed while saving leaves the previous
checkpoints intact and only a temporary directory, which :func:`list_checkpoints` ignores and
:func:`~ebranchformer.asr.atomic.remove_stale_temps` removes.

:func:`capture_rng_state` / :func:`restore_rng_state` cover python's ``random``, numpy's global generator,
torch's CPU generator and every CUDA device's generator.

Example:
    >>> path = save_checkpoint("exp/checkpoints", 100, model.state_dict(), {"step": 100}, {"step": 100})
    ... # doctest: +SKIP
    >>> weights, state, meta = load_checkpoint(latest_checkpoint("exp/checkpoints"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ebranchformer.asr.atomic import atomic_directory
from ebranchformer.asr.model_dir import WEIGHTS_NAME, load_weights, save_weights

__all__ = [
    "META_NAME",
    "STATE_NAME",
    "WEIGHTS_NAME",
    "average_checkpoints",
    "capture_rng_state",
    "checkpoint_step",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_meta",
    "remove_checkpoints",
    "restore_rng_state",
    "save_checkpoint",
]

STATE_NAME = "state.pt"
META_NAME = "meta.json"
_NAME = re.compile(r"^step_(\d{8,})$")


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a checkpoint directory name ``step_<digits>``; None for other names."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def save_checkpoint(
    folder: str | os.PathLike,
    step: int,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write checkpoint ``step`` into ``folder`` atomically; returns its directory.

    Args:
        folder: the checkpoints folder (created if missing).
        step: training step (>= 0); the directory is ``step_<step:08d>``. An existing one is replaced.
        model_state: the model's state dict (saved with safetensors).
        train_state: the training state (``torch.save``; must load with ``weights_only=True``).
        meta: JSON-able facts (written to ``meta.json``).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    path = Path(folder) / f"step_{step:08d}"
    with atomic_directory(path) as tmp:
        save_weights(model_state, tmp / WEIGHTS_NAME)
        torch.save(train_state, tmp / STATE_NAME)
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``meta.json`` of a checkpoint; ValueError naming the file when missing or malformed."""
    f = Path(path) / META_NAME
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint file {str(f)!r} is missing or unreadable: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(  # noqa: TRY004 (bad file content)
            f"checkpoint file {str(f)!r} must hold a JSON object"
        )
    return meta


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model state, training state, meta) of a checkpoint directory; ValueError naming a bad file."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint directory {str(path)!r} does not exist")
    meta = read_meta(path)
    weights = load_weights(path / WEIGHTS_NAME, device)
    state_file = path / STATE_NAME
    try:
        state = torch.load(state_file, map_location=device, weights_only=True)
    except Exception as e:  # FileNotFoundError, UnpicklingError, RuntimeError for damaged zips, ...
        raise ValueError(f"checkpoint file {str(state_file)!r} is missing or unreadable: {e}") from e
    if not isinstance(state, dict):
        raise ValueError(  # noqa: TRY004 (bad file content)
            f"checkpoint file {str(state_file)!r} must hold a dict"
        )
    return weights, state, meta


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The complete checkpoint directories in ``folder`` by step, without crash leftovers."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    found = [p for p in found if all((p / n).is_file() for n in (WEIGHTS_NAME, STATE_NAME, META_NAME))]
    return sorted(found, key=lambda p: checkpoint_step(p))


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``folder``, or None."""
    found = list_checkpoints(folder)
    return found[-1] if found else None


def remove_checkpoints(paths: Sequence[str | os.PathLike]) -> None:
    """Delete checkpoint directories (checked to be named ``step_<digits>``)."""
    for p in paths:
        if checkpoint_step(p) is None:
            raise ValueError(f"refusing to delete {str(p)!r}: not a checkpoint directory name")
        shutil.rmtree(p, ignore_errors=True)


def average_checkpoints(paths: Sequence[str | os.PathLike]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the checkpoints' model weights (float tensors, summed in float64 and cast back);
    integer tensors (counters, statistics counts) are taken from the last checkpoint."""
    paths = list(paths)
    if not paths:
        raise ValueError("paths must name at least one checkpoint to average")
    total: dict[str, torch.Tensor] = {}
    last: dict[str, torch.Tensor] = {}
    for p in paths:
        last = load_weights(Path(p) / WEIGHTS_NAME)
        if total and set(total) != {k for k, v in last.items() if v.is_floating_point()}:
            raise ValueError(f"checkpoint {str(p)!r} holds other tensors than {str(paths[0])!r}")
        for k, v in last.items():
            if v.is_floating_point():
                total[k] = total[k] + v.double() if k in total else v.double()
    return {k: (total[k] / len(paths)).to(v.dtype) if v.is_floating_point() else v for k, v in last.items()}


def capture_rng_state() -> dict[str, Any]:
    """The generators' states (python, numpy, torch CPU, all CUDA devices) as weights_only-loadable data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured (CUDA states only when the device count matches)."""
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def _as_tuple(x: Any) -> Any:
    """Lists back to tuples (random.setstate needs tuples)."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
