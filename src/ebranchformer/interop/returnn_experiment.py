"""Convert a RETURNN (PyTorch engine) checkpoint of a ``ConformerEncoder`` into an encoder-only directory.

A RETURNN checkpoint (``epoch.NNN.pt``: ``{"model": params, "epoch", "step", ...}``) holds parameters but not
the network definition, so the encoder's options come from a small YAML file: the keyword arguments of
:func:`ebranchformer.interop.returnn.load_returnn_encoder`, e.g.::

    in_dim: 80                 # feature dim
    out_dim: 512               # model dim D
    num_layers: 12
    input_layer:               # RETURNN ConformerConvSubsample options, or null for none
      out_dims: [32, 64, 64]
      filter_sizes: [[3, 3], [3, 3], [3, 3]]
      strides: [[1, 1], [3, 1], [2, 1]]
      pool_sizes: [[1, 2]]
    encoder_layer:             # rf.build_dict(EBranchformerLayer, ...) options; class: ConformerLayer for Conformer
      ff_dim: 2048
      num_heads: 8
      cgmlp_ff_dim: 1536
      merge_conv_kernel: 31
    prefix: "encoder."         # where the encoder lives in the RETURNN model (default "")
    padding: masked            # or espnet_legacy (RETURNN's rf_use_mask=False)

Other top-level keys are further :class:`~ebranchformer.nn.EncoderConfig` options (``num_heads``,
``input_embedding_scale``, ...). The result is an encoder-only directory (see
:mod:`ebranchformer.interop.encoder_dir`): no features, tokenizer or output layer; load it with
:func:`ebranchformer.interop.encoder_dir.load_encoder`.

Example:
    >>> convert_returnn_checkpoint("epoch.100.pt", "encoder.yaml", "exp/returnn_encoder")  # doctest: +SKIP
    >>> enc = load_encoder("exp/returnn_encoder")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ._files import check_out_dir, load_torch_file, read_yaml_mapping
from .encoder_dir import load_encoder, save_encoder
from .returnn import load_returnn_encoder

__all__ = ["convert_returnn_checkpoint", "load_encoder", "read_returnn_checkpoint"]

_REQUIRED = ("in_dim", "out_dim", "num_layers")


def read_returnn_checkpoint(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """Load a RETURNN PyTorch-engine checkpoint safely (``weights_only=True``); returns the whole dict.

    Raises FileNotFoundError for a missing file, ValueError naming the file for a truncated or corrupt one
    or one that is not a RETURNN checkpoint (no ``"model"`` dict of tensors).
    """
    ckpt = load_torch_file(checkpoint)
    where = repr(os.fspath(checkpoint))
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model"), Mapping):
        raise ValueError(f"checkpoint {where} is not a RETURNN checkpoint: no 'model' dict of parameters")  # noqa: TRY004
    bad = [k for k, v in ckpt["model"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint {where}: 'model' entries {bad[:5]} are not tensors")
    return dict(ckpt)


def _read_options(encoder_options: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(encoder_options, Mapping):
        opts = dict(encoder_options)
    else:
        opts = read_yaml_mapping(encoder_options, "encoder_options_yaml")
    missing = [k for k in _REQUIRED if k not in opts]
    if missing:
        raise ValueError(f"encoder options lack {missing} (needed: {list(_REQUIRED)}, input_layer, encoder_layer)")
    opts.setdefault("input_layer", None)
    opts.setdefault("encoder_layer", None)
    return opts


def convert_returnn_checkpoint(
    checkpoint: str | os.PathLike,
    encoder_options_yaml: str | os.PathLike | Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Write the encoder in a RETURNN checkpoint as an encoder-only directory at ``out_dir``; returns its path.

    Args:
        checkpoint: the RETURNN checkpoint (``.pt``), read with ``weights_only=True``.
        encoder_options_yaml: the YAML file of encoder options (see the module doc), or those options as a dict.
        out_dir: the directory to write (atomically: complete, or nothing at all).
        overwrite: replace an existing ``out_dir``. Default False (FileExistsError).

    Raises ValueError (naming the file or key) for a truncated checkpoint, options that do not fit the weights
    (unknown, missing or mis-shaped parameters) and invalid options; ``out_dir`` is then left untouched.
    """
    out = check_out_dir(out_dir, overwrite)
    opts = _read_options(encoder_options_yaml)
    ckpt = read_returnn_checkpoint(checkpoint)
    try:
        enc = load_returnn_encoder(ckpt["model"], **opts)
    except TypeError as e:  # an unknown option name reaches ConformerEncoder / the layer as a keyword
        raise ValueError(f"invalid encoder options in {encoder_options_yaml!r}: {e}") from e
    source = {
        "kind": "returnn",
        "checkpoint": os.fspath(Path(checkpoint).resolve()),
        "epoch": ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None,
        "step": ckpt.get("step") if isinstance(ckpt.get("step"), int) else None,
        "prefix": opts.get("prefix", ""),
    }
    return save_encoder(enc.eval(), out, source=source)
