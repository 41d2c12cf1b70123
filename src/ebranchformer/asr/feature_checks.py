"""Input check shared by the feature-space modules (GlobalMVN, SpecAugment): ``check_features``.

Example:
    >>> import torch
    >>> from ebranchformer.asr.feature_checks import check_features
    >>> check_features(torch.zeros(2, 7, 80), None).tolist()
    [7, 7]
"""

from __future__ import annotations

import torch

from ebranchformer.nn.masking import check_encoder_input

__all__ = ["check_features"]


def check_features(x: torch.Tensor, lengths: torch.Tensor | None, dim: int | None = None) -> torch.Tensor:
    """Validate features x (B, T, F) and lengths (B,) in [1, T]; return the lengths as int64 on x's device.

    ``lengths=None`` means every row is T frames long. ``dim`` is the required F (None: any). Raises TypeError
    / ValueError naming ``x`` or ``lengths`` (the messages of
    :func:`ebranchformer.nn.masking.check_encoder_input`).
    """
    is_3d = isinstance(x, torch.Tensor) and x.dim() == 3
    if lengths is None:
        # an empty stand-in for a malformed x lets the check report x itself
        n, t = (x.shape[0], x.shape[1]) if is_3d else (0, 0)
        lengths = torch.full((n,), t, dtype=torch.int64, device=x.device if is_3d else None)
    check_encoder_input(x, lengths, (x.shape[-1] if is_3d else 0) if dim is None else dim)
    return lengths.to(device=x.device, dtype=torch.int64)
