"""Load and save RETURNN (PyTorch engine) parameters of a ``ConformerEncoder``.

RETURNN names its parameters after its modules (``layers.0.self_att.qkv.weight``, ...) and stores Linear
weights as ``[in, out]``. This module maps them to and from our torch-native layout, exactly (only transposes,
permutations and sign flips), so ``export_returnn_params(load_returnn_encoder(p))`` gives ``p`` back bit for bit.

The mapping per parameter (RETURNN -> ours):

- ``*.weight`` of a Linear ``[in, out]`` -> ``weight`` ``[out, in]`` (transpose); ``self_att.proj`` ->
  ``self_att.out_proj``.
- ``self_att.qkv``: RETURNN's outputs are head-major, ``[q_h | k_h | v_h]`` per head (column
  ``h*3dk + s*dk + e``); ours are ``[Q; K; V]`` blocks (row ``s*D + h*dk + e``).
- ``self_att.linear_pos``: RETURNN's sinusoid table has features ``[sin(r w) | cos(r w)]`` at the relative
  distance ``r = key - query``; ours interleaves ``[sin(d w_0), cos(d w_0), ...]`` at ``d = query - key = -r``. So
  our input feature ``2n`` is RETURNN's row ``n`` negated (sin is odd), feature ``2n+1`` is row ``D/2 + n``.
- ``cgmlp.linear_ff``: RETURNN's outputs are ``[gate | values]``, ours ``[values | gate]`` (ESPnet's): halves swap.
- LayerNorm ``scale`` -> ``weight``; conv ``filter`` -> ``weight`` (same layout); BatchNorm ``gamma``/``beta``/
  ``running_mean``/``running_variance`` -> ``weight``/``bias``/``running_mean``/``running_var``.

Example:
    >>> enc = load_returnn_encoder(
    ...     "model.pt", in_dim=80, out_dim=512, num_layers=12,
    ...     input_layer=dict(out_dims=[32, 64, 64], filter_sizes=[(3, 3)] * 3, pool_sizes=[(1, 2)],
    ...                      strides=[(1, 1), (3, 1), (2, 1)]),
    ...     encoder_layer=dict(ff_dim=2048, num_heads=8, cgmlp_ff_dim=1536, merge_conv_kernel=31),
    ...     prefix="encoder.")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..asr.atomic import atomic_write
from ..config import build_dict, resolve_class
from ..nn.attention import RelPosSelfAttention, SelfAttention
from ..nn.cgmlp import FeedForwardConvGated
from ..nn.conformer_layer import ConformerLayer, MaskedBatchNorm
from ..nn.conv_subsample import ConformerConvSubsample
from ..nn.ebranchformer_layer import EBranchformerLayer
from ..nn.encoder import ConformerEncoder
from ._strict import raise_key_problems, raise_non_float

__all__ = ["export_returnn_params", "load_returnn_encoder", "returnn_param_names", "save_returnn_checkpoint"]

Convert = Callable[[torch.Tensor], torch.Tensor]
# our state_dict key -> (RETURNN key, RETURNN shape, ours -> RETURNN, RETURNN -> ours)
_Entry = tuple[str, tuple[int, ...], Convert, Convert]

# RETURNN class names accepted for the encoder layer, besides our registered ones.
_LAYER_ALIASES = {"ConformerEncoderLayer": ConformerLayer}


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _transpose(t: torch.Tensor) -> torch.Tensor:
    return t.t()


def _qkv_weight_to_returnn(w: torch.Tensor, heads: int) -> torch.Tensor:
    three_d, d = w.shape
    dk = d // heads
    w = w.reshape(3, heads, dk, d).transpose(0, 1)  # (3D, D) -> (3, H, dk, D) -> (H, 3, dk, D)
    return w.reshape(three_d, d).t()  # (H*3*dk, D) -> (D, 3D), column h*3dk + s*dk + e


def _qkv_weight_from_returnn(w: torch.Tensor, heads: int) -> torch.Tensor:
    d, three_d = w.shape
    dk = d // heads
    w = w.t().reshape(heads, 3, dk, d).transpose(0, 1)  # (3D, D) -> (H, 3, dk, D) -> (3, H, dk, D)
    return w.reshape(three_d, d)  # (3*H*dk, D), row s*D + h*dk + e


def _qkv_bias_to_returnn(b: torch.Tensor, heads: int) -> torch.Tensor:
    dk = b.shape[0] // (3 * heads)
    return b.reshape(3, heads, dk).transpose(0, 1).reshape(-1)  # (3D,) -> (3, H, dk) -> (H, 3, dk) -> (3D,)


def _qkv_bias_from_returnn(b: torch.Tensor, heads: int) -> torch.Tensor:
    dk = b.shape[0] // (3 * heads)
    return b.reshape(heads, 3, dk).transpose(0, 1).reshape(-1)  # (3D,) -> (H, 3, dk) -> (3, H, dk) -> (3D,)


def _pos_weight_to_returnn(w: torch.Tensor) -> torch.Tensor:
    d_out, d_in = w.shape
    pairs = w.t().reshape(d_in // 2, 2, d_out)  # (D_in, D_out) -> (D/2, [sin, cos], D_out)
    return torch.cat([-pairs[:, 0], pairs[:, 1]], dim=0)  # (D_in, D_out): [-sin rows | cos rows]


def _pos_weight_from_returnn(w: torch.Tensor) -> torch.Tensor:
    d_in, d_out = w.shape
    sin, cos = w[: d_in // 2], w[d_in // 2 :]  # (D/2, D_out) each
    return torch.stack([-sin, cos], dim=1).reshape(d_in, d_out).t()  # (D/2, 2, D_out) -> (D_out, D_in)


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """Swap the two halves of the first axis (the Linear output axis of a torch weight, or a bias)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _cgmlp_weight_to_returnn(w: torch.Tensor) -> torch.Tensor:
    return _swap_halves(w).t()  # (2C, D) rows [values; gate] -> (D, 2C) columns [gate | values]


def _cgmlp_weight_from_returnn(w: torch.Tensor) -> torch.Tensor:
    return _swap_halves(w.t())  # (D, 2C) columns [gate | values] -> (2C, D) rows [values; gate]


def _check_exportable(enc: ConformerEncoder) -> None:
    """Raise ValueError for parts of ``enc`` that RETURNN's ConformerEncoder does not have."""
    problems = []
    if enc.final_layer_norm is not None:
        problems.append("final_norm=True (RETURNN has no final LayerNorm after the layers)")
    if enc.conditioning_layer is not None:
        problems.append("interCTC self-conditioning")
    if enc.input_layer is not None and not isinstance(enc.input_layer, ConformerConvSubsample):
        problems.append(f"input_layer {type(enc.input_layer).__name__} (only ConformerConvSubsample or None)")
    for i, layer in enumerate(enc.layers):
        if not isinstance(layer, (EBranchformerLayer, ConformerLayer)):
            problems.append(f"layers.{i} is a {type(layer).__name__}")
            continue
        if isinstance(layer, EBranchformerLayer) and not (layer.config.macaron_ffn and layer.config.use_ffn):
            problems.append(f"layers.{i}: RETURNN's EBranchformerLayer always has both FFNs (macaron)")
        att = layer.self_att
        if isinstance(att, RelPosSelfAttention) and (att.legacy or att.zero_triu):
            problems.append(f"layers.{i}.self_att: legacy/zero_triu rel-pos attention")
        cgmlp = getattr(layer, "cgmlp", None)
        if isinstance(cgmlp, FeedForwardConvGated) and cgmlp.linear_after_conv is not None:
            problems.append(f"layers.{i}.cgmlp: use_linear_after_conv")
    if problems:
        raise ValueError("enc cannot be expressed as a RETURNN ConformerEncoder: " + "; ".join(problems))


def _param_map(enc: ConformerEncoder) -> dict[str, _Entry]:
    """For each entry of our state_dict (except BatchNorm's ``num_batches_tracked``): its RETURNN name, shape and
    the two conversions."""
    _check_exportable(enc)
    modules = dict(enc.named_modules())
    out: dict[str, _Entry] = {}
    for key, value in enc.state_dict().items():
        mod_name, _, leaf = key.rpartition(".")
        mod = modules[mod_name]
        parent_name, _, child = mod_name.rpartition(".")
        parent = modules.get(parent_name) if mod_name else None
        rname, shape = key, tuple(value.shape)
        to_r: Convert = _same
        from_r: Convert = _same
        if isinstance(mod, MaskedBatchNorm):
            if leaf == "num_batches_tracked":
                continue
            leaf_r = {
                "weight": "gamma",
                "bias": "beta",
                "running_mean": "running_mean",
                "running_var": "running_variance",
            }
            rname = f"{mod_name}.{leaf_r[leaf]}"
        elif isinstance(mod, nn.LayerNorm):
            rname = f"{mod_name}.{'scale' if leaf == 'weight' else leaf}"
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            rname = f"{mod_name}.{'filter' if leaf == 'weight' else leaf}"
        elif isinstance(mod, nn.Linear):
            is_att = isinstance(parent, (RelPosSelfAttention, SelfAttention))
            if is_att and child == "out_proj":
                rname = f"{parent_name}.proj.{leaf}"
            if leaf == "weight":
                shape = shape[::-1]
                to_r, from_r = _transpose, _transpose
            if is_att and child == "qkv":
                h = parent.num_heads
                if leaf == "weight":
                    to_r = functools.partial(_qkv_weight_to_returnn, heads=h)
                    from_r = functools.partial(_qkv_weight_from_returnn, heads=h)
                else:
                    to_r = functools.partial(_qkv_bias_to_returnn, heads=h)
                    from_r = functools.partial(_qkv_bias_from_returnn, heads=h)
            elif isinstance(parent, RelPosSelfAttention) and child == "linear_pos":
                to_r, from_r = _pos_weight_to_returnn, _pos_weight_from_returnn
            elif isinstance(parent, FeedForwardConvGated) and child == "linear_ff":
                if leaf == "weight":  # ours (2C, D): swap rows; RETURNN (D, 2C): swap columns
                    to_r, from_r = _cgmlp_weight_to_returnn, _cgmlp_weight_from_returnn
                else:
                    to_r, from_r = _swap_halves, _swap_halves
        elif not isinstance(mod, RelPosSelfAttention) or leaf not in ("pos_bias_u", "pos_bias_v"):
            raise ValueError(f"no RETURNN equivalent known for parameter {key!r} ({type(mod).__name__})")
        out[key] = (rname, shape, to_r, from_r)
    return out


def returnn_param_names(enc: ConformerEncoder) -> dict[str, str]:
    """Our state_dict key -> RETURNN's parameter name, for every parameter (and BatchNorm statistic) of ``enc``."""
    return {k: e[0] for k, e in _param_map(enc).items()}


def export_returnn_params(enc: ConformerEncoder) -> dict[str, torch.Tensor]:
    """The parameters of ``enc`` under RETURNN's names and layouts (the ``"model"`` dict of a RETURNN PyTorch-engine
    checkpoint of a ``ConformerEncoder``, BatchNorm running statistics included), as new contiguous CPU tensors.

    Raises ValueError if ``enc`` has parts RETURNN's encoder lacks (a final LayerNorm, another frontend, ...).
    """
    if not isinstance(enc, ConformerEncoder):
        raise TypeError(f"enc must be a ConformerEncoder, got {type(enc).__name__}")
    state = enc.state_dict()
    out = {}
    with torch.no_grad():
        for key, (rname, _, to_r, _) in _param_map(enc).items():
            out[rname] = to_r(state[key].detach().cpu()).contiguous().clone()
    return out


def _as_tensor(key: str, v: Any) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach()
    if isinstance(v, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(v))
    raise TypeError(f"params[{key!r}] must be a torch.Tensor or a numpy array, got {type(v).__name__}")


def _read_params(params: Any, prefix: str) -> dict[str, torch.Tensor]:
    if isinstance(params, (str, os.PathLike)):
        ckpt = torch.load(params, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, Mapping):
            raise TypeError(f"checkpoint {os.fspath(params)!r} holds a {type(ckpt).__name__}, not a dict")
        params = ckpt.get("model", ckpt)  # as RETURNN's engine reads it
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of tensors or a checkpoint path, got {type(params).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    return {k[len(prefix) :]: _as_tensor(k, v) for k, v in params.items() if k.startswith(prefix)}


def _layer_spec(encoder_layer: Mapping[str, Any] | None) -> dict[str, Any]:
    if encoder_layer is None:
        return build_dict(ConformerLayer)
    if not isinstance(encoder_layer, Mapping):
        raise TypeError(
            f"encoder_layer must be a dict of layer options or None, got {type(encoder_layer).__name__}"
        )
    opts = dict(encoder_layer)
    cls = opts.pop("class", EBranchformerLayer)
    cls = _LAYER_ALIASES.get(cls, cls) if isinstance(cls, str) else cls
    cls = resolve_class(cls)
    if cls not in (EBranchformerLayer, ConformerLayer):
        raise ValueError(
            f"encoder_layer class must be EBranchformerLayer or ConformerLayer, got {cls.__name__}"
        )
    return build_dict(cls, **opts)


def _frontend_spec(input_layer: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if input_layer is None:
        return None
    if not isinstance(input_layer, Mapping):
        raise TypeError(
            f"input_layer must be a dict of ConformerConvSubsample options or None, got "
            f"{type(input_layer).__name__}"
        )
    opts = dict(input_layer)
    cls = opts.pop("class", ConformerConvSubsample)
    if resolve_class(cls) is not ConformerConvSubsample:
        raise ValueError(f"input_layer class must be ConformerConvSubsample, got {cls!r}")
    if "in_dim" in opts:
        raise ValueError("input_layer must not set in_dim: it is the encoder's in_dim")
    return build_dict(ConformerConvSubsample, **opts)


def load_returnn_encoder(
    params: Mapping[str, Any] | str | os.PathLike,
    *,
    in_dim: int,
    out_dim: int,
    num_layers: int,
    input_layer: Mapping[str, Any] | None,
    encoder_layer: Mapping[str, Any] | None,
    padding: str = "masked",
    prefix: str = "",
    dtype: torch.dtype | None = None,
    **encoder_opts: Any,
) -> ConformerEncoder:
    """Build a :class:`ConformerEncoder` equal to RETURNN's ``ConformerEncoder`` and load RETURNN's parameters.

    Args:
        params: RETURNN parameter name -> tensor (torch or numpy) in RETURNN's layout, e.g. the ``"model"`` dict of a
            RETURNN PyTorch-engine checkpoint; or the path of such a checkpoint (its ``"model"`` entry is used).
        in_dim: input feature dim (RETURNN ``in_dim``).
        out_dim: model dim D.
        num_layers: number of layers.
        input_layer: None (no frontend) or the options of RETURNN's ``ConformerConvSubsample`` (``out_dims``,
            ``filter_sizes``, ``strides``, ``pool_sizes``, ``activation``, ``padding``; ``in_dim`` is filled in).
        encoder_layer: the layer options as given to RETURNN's ``rf.build_dict(EBranchformerLayer, ...)``
            (``ff_dim``, ``num_heads``, ``cgmlp_ff_dim``, ``cgmlp_conv_kernel``, ``merge_conv_kernel``, ...); with
            ``"class": "ConformerLayer"`` (or ``"ConformerEncoderLayer"``) RETURNN's Conformer layer instead;
            None is RETURNN's default, a Conformer layer.
        padding: ``"masked"`` (Default; RETURNN behavior version >= 24) or ``"espnet_legacy"`` (no masking, as
            RETURNN's ``rf_use_mask=False``).
        prefix: only keys starting with it are read, with it removed (e.g. ``"encoder."`` for a whole model's
            checkpoint); others are ignored.
        dtype: the encoder's dtype (Default: the dtype of the floating-point parameters if they all agree, else
            float32).
        encoder_opts: further :class:`~ebranchformer.nn.EncoderConfig` options (dropout, num_heads,
            input_embedding_scale, ``dropout_broadcast=True`` for RETURNN's training dropout, ...). RETURNN's
            defaults hold otherwise: LayerNorm eps 1e-6, no final norm,
            input_embedding_scale 1.0, a bias-free input projection (iff the frontend's output dim is not D).

    Loading is strict: unknown, missing and mis-shaped keys raise one ValueError listing them all.
    """
    state = _read_params(params, prefix)
    enc = ConformerEncoder(
        in_dim,
        out_dim,
        num_layers=num_layers,
        input_layer=_frontend_spec(input_layer),
        encoder_layer=_layer_spec(encoder_layer),
        padding=padding,
        **encoder_opts,
    )
    mapping = _param_map(enc)
    expected = {rname: (key, shape, from_r) for key, (rname, shape, _, from_r) in mapping.items()}
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    bad_shape = [
        f"{k}: got {tuple(state[k].shape)}, expected {expected[k][1]}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != expected[k][1]
    ]
    what = f"params do not fit this RETURNN ConformerEncoder ({prefix=!r})"
    raise_key_problems(what, unknown, missing, bad_shape)
    raise_non_float(what, [k for k, v in state.items() if not v.is_floating_point()])
    if dtype is None:
        dtypes = {v.dtype for v in state.values()}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    enc = enc.to(dtype)
    own = enc.state_dict()
    new_state = {}
    with torch.no_grad():
        for rname, (key, _, from_r) in expected.items():
            new_state[key] = from_r(state[rname]).to(dtype)
    for key, v in own.items():  # buffers RETURNN does not have (BatchNorm's num_batches_tracked)
        new_state.setdefault(key, v)
    enc.load_state_dict(new_state, strict=True)
    return enc


def save_returnn_checkpoint(
    path: str | os.PathLike, enc: ConformerEncoder, *, epoch: int = 1, step: int = 0, prefix: str = ""
) -> None:
    """Write ``enc`` as a RETURNN PyTorch-engine checkpoint ``{"model": params, "epoch", "step",
    "effective_learning_rate": None}`` (what RETURNN's engine writes and reads), atomically
    (:func:`~ebranchformer.asr.atomic.atomic_write`: a temporary file in the same directory, synced, then renamed
    over ``path``). ``prefix`` is prepended to every parameter name (e.g.
    ``"encoder."`` when the RETURNN model holds the encoder under that attribute).
    """
    if not isinstance(epoch, int) or not isinstance(step, int):
        raise TypeError(f"epoch and step must be ints, got {epoch!r}, {step!r}")
    params = {prefix + k: v for k, v in export_returnn_params(enc).items()}
    ckpt = {"model": params, "epoch": epoch, "step": step, "effective_learning_rate": None}
    atomic_write(path, lambda f: torch.save(ckpt, f))
