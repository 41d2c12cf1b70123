"""Reading the inputs of the converters (YAML configs, PyTorch checkpoints) with errors that name the file, and
the ``out_dir`` check they share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ..config import load_yaml

__all__ = ["check_out_dir", "existing_file", "load_torch_file", "read_yaml_mapping"]


def existing_file(path: Any, name: str) -> Path:
    """``path`` as a Path; TypeError when it is not a path, FileNotFoundError (naming ``name``) when missing."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, got {type(path).__name__}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{name} {str(p)!r} does not exist")
    return p


def read_yaml_mapping(path: Any, name: str) -> dict[str, Any]:
    """The mapping in the YAML file ``path``; ValueError naming the file when unreadable or not a mapping."""
    p = existing_file(path, name)
    try:
        data = load_yaml(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{name} {str(p)!r} is not readable YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{name} {str(p)!r} must hold a YAML mapping, got {type(data).__name__}")  # noqa: TRY004
    return data


def load_torch_file(path: Any, name: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; ValueError naming the file when it is truncated,
    corrupt or holds anything but tensors and plain containers."""
    import torch

    p = existing_file(path, name)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip ("failed finding central directory"), pickle errors, unsafe globals
        raise ValueError(f"{name} {str(p)!r} is not a readable PyTorch checkpoint (truncated?): {e}") from e


def check_out_dir(out_dir: Any, overwrite: bool) -> Path:
    """``out_dir`` as a Path; FileExistsError when it exists (and is not an empty directory) unless
    ``overwrite``. The converters call it before doing any work."""
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
    out = Path(out_dir)
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"out_dir {str(out)!r} already exists (pass overwrite=True to replace it)")
    return out
