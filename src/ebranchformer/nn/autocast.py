"""The CPU autocast state, looked up the same way wherever a CPU path depends on it, and whether the CPU has AMX
(which decides whether a bf16 kernel beats its float32 one)."""

from __future__ import annotations

import functools

import torch

__all__ = ["cpu_amx_bf16", "cpu_autocast_dtype"]


def cpu_autocast_dtype() -> torch.dtype | None:
    """The dtype CPU autocast casts to in this thread (``torch.autocast("cpu", dtype=...)``), or None when CPU
    autocast is off. Autocast state is thread-local."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


@functools.cache
def cpu_amx_bf16() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon 4th generation and later), on which oneDNN runs bf16 matrix
    products at many times the float32 rate (13x on the project's 2-core Xeon VM: 2.3-2.5 TFLOP/s against 190-330
    GFLOP/s for a 2048^3 product on 2 threads). Without AMX (AVX-512 bf16 dot products only, e.g. AMD EPYC) bf16
    products gain about 2x, and some bf16 kernels are slower than their float32 ones."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a torch without the query
        return False
