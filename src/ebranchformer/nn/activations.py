"""Activation functions by name, as ESPnet's ``get_activation`` and RETURNN's defaults name them."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "activation_name", "get_activation"]

Activation = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _relu_squared(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


ACTIVATIONS: dict[str, Activation] = {
    "identity": _identity,
    "swish": F.silu,  # x * sigmoid(x); ESPnet's Swish, RETURNN's rf.swish
    "silu": F.silu,
    "gelu": F.gelu,  # exact erf GELU
    "relu": F.relu,
    "tanh": torch.tanh,
    "hardtanh": F.hardtanh,
    "selu": F.selu,
    "sigmoid": torch.sigmoid,
    "relu_squared": _relu_squared,
}


def get_activation(act: str | Activation | None) -> Activation:
    """Resolve an activation given by name (see ``ACTIVATIONS``), callable, or None (identity)."""
    if act is None:
        return _identity
    if isinstance(act, str):
        try:
            return ACTIVATIONS[act]
        except KeyError:
            raise ValueError(f"unknown activation {act!r}; expected one of {sorted(ACTIVATIONS)}") from None
    if callable(act):
        return act
    raise TypeError(f"activation must be a name or a callable, got {type(act).__name__}")


def activation_name(act: str | Activation | None) -> str | Activation:
    """The registered name of ``act`` when it has one (for configs), else ``act`` itself."""
    if act is None:
        return "identity"
    if isinstance(act, str):
        get_activation(act)
        return act
    for name, fn in ACTIVATIONS.items():
        if fn is act:
            return name
    return act
