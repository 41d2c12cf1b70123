"""Sinusoidal position tables (ESPnet's layout: interleaved sin/cos, ``PE(p)[2i] = sin(p w_i)``).

``w_i = 10000^(-2i/D)``. All tables are computed in float32 and cast to the requested dtype.
"""

from __future__ import annotations

import math

import torch

__all__ = ["abs_pos_table", "legacy_rel_pos_table", "rel_pos_table", "sinusoid"]


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) float positions -> (N, D) with ``[sin(p w_0), cos(p w_0), sin(p w_1), ...]``."""
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even dim, got {dim}")
    i2 = torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device)  # (D/2,)
    w = torch.exp(i2 * (-math.log(10000.0) / dim))  # (D/2,)
    a = positions.to(torch.float32)[:, None] * w[None, :]  # (N, D/2)
    return torch.stack([torch.sin(a), torch.cos(a)], dim=-1).reshape(positions.shape[0], dim)  # (N, D)


def rel_pos_table(t: int, dim: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """(2T-1, D): row k is ``PE(T-1-k)``, relative distance query - key from +(T-1) down to -(T-1)."""
    p = torch.arange(t - 1, -t, -1, device=device)  # (2T-1,)
    return sinusoid(p, dim).to(dtype)


def legacy_rel_pos_table(t: int, dim: int, max_len: int = 5000, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """(T, D): ESPnet's legacy rel_pos, row k is ``PE(L-1-k)`` with ``L = max(max_len, T)`` (absolute positions
    counted from the far end of a fresh module's table)."""
    top = max(max_len, t) - 1
    p = torch.arange(top, top - t, -1, device=device)  # (T,)
    return sinusoid(p, dim).to(dtype)


def abs_pos_table(t: int, dim: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """(T, D): ``PE(t)`` for t = 0..T-1 (ESPnet abs_pos)."""
    return sinusoid(torch.arange(t, device=device), dim).to(dtype)
