"""The CPU autocast state, looked up the same way wherever a CPU path depends on it."""

from __future__ import annotations

import torch

__all__ = ["cpu_autocast_dtype"]


def cpu_autocast_dtype() -> torch.dtype | None:
    """The dtype CPU autocast casts to in this thread (``torch.autocast("cpu", dtype=...)``), or None when CPU
    autocast is off. Autocast state is thread-local."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
