"""The one mask convention (bool ``valid`` (B, T), True on real frames) and input checks with clear errors."""

from __future__ import annotations

import torch

__all__ = ["check_encoder_input", "check_frames", "lengths_to_valid", "mask_padded"]


def lengths_to_valid(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Bool mask (B, T) with ``valid[b, t] = t < lengths[b]``."""
    t = torch.arange(max_len, device=lengths.device)  # (T,)
    return t[None, :] < lengths[:, None]  # (B, T)


def mask_padded(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Zero the padded frames of x (B, T, D); identity when ``valid`` is None."""
    if valid is None:
        return x
    return x * valid[:, :, None].to(x.dtype)


def check_encoder_input(x: torch.Tensor, lengths: torch.Tensor, in_dim: int, like: torch.Tensor | None = None) -> None:
    """Validate (x, lengths) for an encoder; raise TypeError/ValueError that name the argument. ``like`` (one of
    the module's parameters) also checks that x is on its device and, outside autocast, of its dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, T, {in_dim}), got {type(x).__name__}")
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"lengths must be an integer torch.Tensor of shape (B,), got {type(lengths).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, T, {in_dim}), got {tuple(x.shape)}")
    if x.shape[-1] != in_dim:
        raise ValueError(f"x feature dim must be in_dim={in_dim}, got x.shape[-1]={x.shape[-1]}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
    if lengths.dim() != 1:
        raise ValueError(f"lengths must have shape (B,), got {tuple(lengths.shape)}")
    if lengths.shape[0] != x.shape[0]:
        raise ValueError(f"lengths has batch size {lengths.shape[0]} but x has batch size {x.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError(f"x must hold at least one utterance, got batch size 0 (x.shape={tuple(x.shape)})")
    _check_like(x, like, "x")
    if not torch.compiler.is_compiling():
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo <= 0:
            raise ValueError(f"lengths must be >= 1, got min(lengths)={lo}")
        if hi > x.shape[1]:
            raise ValueError(f"lengths must be <= T={x.shape[1]} (x.shape[1]), got max(lengths)={hi}")


def check_frames(
    x: torch.Tensor,
    valid: torch.Tensor | None,
    dim: int,
    *,
    name: str = "x",
    like: torch.Tensor | None = None,
    valid_optional: bool = False,
) -> None:
    """Validate a layer's input ``name`` (B, T, ``dim``) and its ``valid`` (B, T) bool mask (None allowed with
    ``valid_optional``); ``like`` (one of the module's parameters) as in :func:`check_encoder_input`. Shape checks
    only: nothing is read from the tensors."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, T, {dim}), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"{name} must have shape (B, T, {dim}), got {tuple(x.shape)}")
    _check_like(x, like, name)
    if valid is None:
        if not valid_optional:
            raise TypeError(f"valid must be a bool tensor of shape (B, T) = {tuple(x.shape[:2])}, got None")
        return
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        got = valid.dtype if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise TypeError(f"valid must be a bool tensor of shape (B, T) = {tuple(x.shape[:2])}, got {got}")
    if valid.shape != x.shape[:2]:
        raise ValueError(f"valid must have shape (B, T) = {tuple(x.shape[:2])} as {name}, got {tuple(valid.shape)}")
    if valid.device != x.device:
        raise ValueError(f"valid is on {valid.device} but {name} is on {x.device}")


def _check_like(x: torch.Tensor, like: torch.Tensor | None, name: str) -> None:
    """``x`` on ``like``'s device and, outside autocast, of its dtype (``like`` None: no check)."""
    if like is None:
        return
    if x.device != like.device:
        raise ValueError(
            f"{name} is on {x.device} but the module's parameters are on {like.device}: move {name}"
            f" ({name}.to('{like.device}')) or the module"
        )
    if x.dtype != like.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{name} has dtype {x.dtype} but the module's parameters are {like.dtype}: cast {name}"
            f" ({name}.to({like.dtype})) or the module, or run under torch.autocast"
        )
