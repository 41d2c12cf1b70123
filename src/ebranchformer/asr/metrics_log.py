"""The training metrics log (JSONL, one record per line) and its learning-curve plot (PNG).

Records are flat JSON objects with a ``"kind"`` (``"train"``, ``"valid"``, ...) and a ``"step"``; the trainer
writes ``{"kind": "train", "step", "epoch", "loss", "loss_ctc", ..., "lr", "frames_per_s", "grad_norm"}`` and
``{"kind": "valid", "step", "loss", "wer", "cer", ...}``. When a run resumes from step k, the records after
k (written after that checkpoint by the interrupted run) are dropped first with
:meth:`MetricsLog.truncate_after`, so the log reads like one uninterrupted run.

:func:`plot_learning_curves` draws train/valid loss, WER/CER and the learning rate against the step with
matplotlib's Agg canvas (no display, no global backend switch) and writes the PNG atomically.

Example:
    >>> import tempfile, pathlib
    >>> log = MetricsLog(pathlib.Path(tempfile.mkdtemp()) / "metrics.jsonl")
    >>> log.append({"kind": "train", "step": 1, "loss": 3.5, "lr": 1e-4})
    >>> log.append({"kind": "valid", "step": 1, "loss": 3.2, "wer": 0.9, "cer": 0.6})
    >>> [r["kind"] for r in log.records()]
    ['train', 'valid']
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ebranchformer.asr.atomic import atomic_write

__all__ = ["MetricsLog", "plot_learning_curves"]


class MetricsLog:
    """Append-only JSONL file of metric records.

    Args:
        path: the ``.jsonl`` file (created on the first append; its folder must exist).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record (a dict of JSON-able values; non-finite floats become null) and flush it."""
        if not isinstance(record, dict):
            raise TypeError(f"record must be a dict, got {type(record).__name__}")
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()

    def records(self) -> list[dict[str, Any]]:
        """All complete records in file order (a torn last line, from a crash, is ignored)."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def truncate_after(self, step: int) -> None:
        """Drop the records whose ``step`` is greater than ``step`` (rewrites the file atomically)."""
        keep = [r for r in self.records() if not isinstance(r.get("step"), int) or r["step"] <= step]
        if self.path.is_file():
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in keep))


def _series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    pts = [
        (r["step"], r[key]) for r in records if r.get("kind") == kind and isinstance(r.get(key), (int, float))
    ]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def plot_learning_curves(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Draw loss, error rates and learning rate against the step into a PNG at ``path`` (atomic write)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_err, ax_lr = fig.subplots(1, 3)
    for kind, label in (("train", "train"), ("valid", "valid")):
        x, y = _series(records, kind, "loss")
        if x:
            ax_loss.plot(x, y, label=label, marker="o" if kind == "valid" else None, markersize=3)
    ax_loss.set(title="CTC loss", xlabel="step", ylabel="loss")
    for key in ("wer", "cer"):
        x, y = _series(records, "valid", key)
        if x:
            ax_err.plot(x, [100 * v for v in y], label=key.upper(), marker="o", markersize=3)
    ax_err.set(title="valid error rate (greedy)", xlabel="step", ylabel="%")
    x, y = _series(records, "train", "lr")
    if x:
        ax_lr.plot(x, y)
    ax_lr.set(title="learning rate", xlabel="step")
    for ax in (ax_loss, ax_err):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    for ax in (ax_loss, ax_err, ax_lr):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))
