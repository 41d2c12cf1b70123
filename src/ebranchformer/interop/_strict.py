"""Strict checkpoint loading with errors that list every unknown, missing and mis-shaped key."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["load_strict", "raise_key_problems", "raise_non_float"]


def load_strict(
    module: nn.Module,
    converted: Mapping[str, Any],
    source: str,
    source_name: Callable[[str, nn.Module], str],
) -> None:
    """Load ``converted`` (our names) into ``module``. Keys ``<unknown>NAME`` are source keys with no counterpart;
    ``<missing>OURS`` maps one of our keys to the source names whose absence left it unfilled. Raises ValueError naming the keys in the source's own naming when anything does not fit."""
    target = module.state_dict()
    hints = {k[len("<missing>") :]: v for k, v in converted.items() if k.startswith("<missing>")}
    unknown = sorted(k.split(">", 1)[1] for k in converted if k.startswith("<unknown>"))
    unknown += sorted(source_name(k, module) for k in converted if not k.startswith("<") and k not in target)
    missing = sorted(n for k in target if k not in converted for n in hints.get(k, [source_name(k, module)]))
    shaped = []
    tensors: dict[str, torch.Tensor] = {}
    for k, v in converted.items():
        if k.startswith("<") or k not in target:
            continue
        t = torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
        if tuple(t.shape) != tuple(target[k].shape):
            shaped.append(f"{source_name(k, module)}: expected {tuple(target[k].shape)}, got {tuple(t.shape)}")
        tensors[k] = t
    raise_key_problems(f"{source} checkpoint does not fit this encoder", unknown, missing, shaped)
    not_float = [k for k, t in tensors.items() if target[k].is_floating_point() and not t.is_floating_point()]
    raise_non_float(f"{source} checkpoint does not fit this encoder", [source_name(k, module) for k in not_float])
    module.load_state_dict(tensors, strict=True)


def raise_key_problems(what: str, unknown: list[str], missing: list[str], shaped: list[str]) -> None:
    """Raise one ValueError listing every unknown, missing and mis-shaped key (nothing if all lists are empty)."""
    problems = []
    if unknown:
        problems.append(f"unknown keys {unknown}")
    if missing:
        problems.append(f"missing keys {missing}")
    if shaped:
        problems.append(f"mis-shaped keys [{'; '.join(shaped)}]")
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def raise_non_float(what: str, names: list[str]) -> None:
    """Raise one TypeError naming the parameters given integer or bool tensors (nothing if ``names`` is empty)."""
    if names:
        raise TypeError(f"{what}: integer/bool tensors for the parameters {names}")
