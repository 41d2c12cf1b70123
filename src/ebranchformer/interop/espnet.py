"""Load ESPnet ``EBranchformerEncoder`` configs and weights (espnet 202511), and export them back.

Example:
    >>> import yaml
    >>> conf = yaml.safe_load(open("exp/asr_train/config.yaml"))["encoder_conf"]  # doctest: +SKIP
    >>> enc = load_espnet_encoder(conf, input_size=80, state_dict=torch.load("valid.acc.ave.pth", weights_only=True))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..config import build_dict
from ..nn.attention import RelPosSelfAttention, SelfAttention
from ..nn.cgmlp import FeedForwardConvGated
from ..nn.ebranchformer_layer import EBranchformerLayer
from ..nn.encoder import ConformerEncoder
from ..nn.subsampling import Conv2dSubsampling, LinearInput
from ._strict import load_strict

__all__ = ["ESPNET_DEFAULTS", "espnet_encoder_config", "export_espnet_state_dict", "load_espnet_encoder"]

# EBranchformerEncoder.__init__ defaults in espnet 202511 (not the recipes': see the reference spec).
ESPNET_DEFAULTS: dict[str, Any] = dict(
    output_size=256, attention_heads=4, attention_layer_type="rel_selfattn", pos_enc_layer_type="rel_pos",
    rel_pos_type="latest", cgmlp_linear_units=2048, cgmlp_conv_kernel=31, use_linear_after_conv=False,
    gate_activation="identity", num_blocks=12, dropout_rate=0.1, positional_dropout_rate=0.1,
    attention_dropout_rate=0.0, input_layer="conv2d", zero_triu=False, padding_idx=-1, layer_drop_rate=0.0,
    max_pos_emb_len=5000, use_ffn=False, macaron_ffn=False, ffn_activation_type="swish", linear_units=2048,
    positionwise_layer_type="linear", merge_conv_kernel=3, interctc_layer_idx=None,
    interctc_use_conditioning=False, qk_norm=False, use_flash_attn=True, gradient_checkpoint_layers=None,
)  # fmt: skip
_GATES = ("identity", "hardtanh", "tanh", "relu", "selu", "swish")  # what espnet 202511 accepts
_FFN_ACTS = ("hardtanh", "tanh", "relu", "selu", "swish")
_ATT_POS = {  # (attention_layer_type, pos_enc_layer_type) pairs ESPnet can run
    ("rel_selfattn", "rel_pos"): "rel",
    ("legacy_rel_selfattn", "legacy_rel_pos"): "legacy",
    ("selfattn", "abs_pos"): "abs",
}
_CONV_INPUTS = ("conv2d", "conv2d2", "conv2d6", "conv2d8")


def espnet_encoder_config(
    encoder_conf: Mapping[str, Any], input_size: int, *, padding: str = "espnet_legacy", vocab_size: int | None = None
) -> dict[str, Any]:
    """Our :class:`ConformerEncoder` options for an ESPnet ``encoder_conf`` (keys verbatim; omitted keys take
    ESPnet 202511's defaults). Raises ValueError for unknown keys and for what ESPnet cannot run or we do not
    support (naming the option)."""
    if not isinstance(encoder_conf, Mapping):
        raise TypeError(f"encoder_conf must be a mapping of ESPnet encoder options, got {type(encoder_conf).__name__}")
    if isinstance(input_size, bool) or not isinstance(input_size, numbers.Integral):
        raise TypeError(f"input_size must be an int (the feature dim), got {type(input_size).__name__}")
    if input_size <= 0:
        raise ValueError(f"input_size must be positive (the feature dim), got {input_size}")
    input_size = int(input_size)
    unknown = sorted(set(encoder_conf) - set(ESPNET_DEFAULTS) - {"input_size"})
    if unknown:
        raise ValueError(f"unknown ESPnet EBranchformerEncoder option(s) {unknown} in encoder_conf")
    c = {**ESPNET_DEFAULTS, **encoder_conf}
    if "input_size" in encoder_conf and encoder_conf["input_size"] != input_size:
        raise ValueError(f"encoder_conf input_size={encoder_conf['input_size']} disagrees with input_size={input_size}")
    d, u = int(c["output_size"]), int(c["cgmlp_linear_units"])
    att, pos = c["attention_layer_type"], c["pos_enc_layer_type"]
    if c["rel_pos_type"] == "legacy":
        pos = "legacy_rel_pos" if pos == "rel_pos" else pos
        att = "legacy_rel_selfattn" if att == "rel_selfattn" else att
    elif c["rel_pos_type"] == "latest":
        if att == "legacy_rel_selfattn" or pos == "legacy_rel_pos":
            raise ValueError("rel_pos_type='latest' cannot use legacy_rel_selfattn / legacy_rel_pos")
    else:
        raise ValueError(f"rel_pos_type must be 'latest' or 'legacy', got {c['rel_pos_type']!r}")
    kind = _ATT_POS.get((att, pos))
    if kind is None:
        raise ValueError(
            f"unsupported attention_layer_type/pos_enc_layer_type pair ({att!r}, {pos!r}); "
            f"supported: {sorted(_ATT_POS)}"
        )
    if u % 2:
        raise ValueError(f"cgmlp_linear_units must be even (it is split in halves), got {u}")
    if c["gate_activation"] not in _GATES:
        raise ValueError(f"gate_activation must be one of {_GATES} (as in espnet 202511), got {c['gate_activation']!r}")
    if c["ffn_activation_type"] not in _FFN_ACTS:
        raise ValueError(f"ffn_activation_type must be one of {_FFN_ACTS}, got {c['ffn_activation_type']!r}")
    if c["positionwise_layer_type"] != "linear":
        raise ValueError(f"positionwise_layer_type must be 'linear', got {c['positionwise_layer_type']!r}")
    if c["qk_norm"] and kind != "abs":
        raise ValueError("qk_norm is only used with attention_layer_type='selfattn'")

    inp = c["input_layer"]
    if inp in _CONV_INPUTS:
        input_layer: Any = build_dict(Conv2dSubsampling, kind=inp)
    elif inp == "linear":
        input_layer = build_dict(LinearInput, dropout=float(c["dropout_rate"]))
    elif inp is None:
        if input_size != d:
            raise ValueError(
                f"input_layer=None needs input_size == output_size ({input_size} != {d}); ESPnet then drops the "
                "positional encoding and its relative attention crashes"
            )
        input_layer = None
    else:
        raise ValueError(f"unsupported input_layer {inp!r}; supported: {list(_CONV_INPUTS) + ['linear', None]}")

    if kind == "abs":
        self_att: Any = build_dict(SelfAttention, qk_norm=bool(c["qk_norm"]))
    else:
        # ESPnet's encoder hands zero_triu to rel_selfattn only: its legacy_rel_selfattn is built without it
        self_att = build_dict(
            RelPosSelfAttention, zero_triu=bool(c["zero_triu"]) and kind != "legacy", legacy=kind == "legacy",
            legacy_max_len=int(c["max_pos_emb_len"]), pos_emb_dropout=float(c["positional_dropout_rate"]),
        )  # fmt: skip
    use_ffn = bool(c["use_ffn"])
    layer = build_dict(
        EBranchformerLayer,
        ff_dim=int(c["linear_units"]), ff_activation=c["ffn_activation_type"], self_att=self_att,
        cgmlp=build_dict(
            FeedForwardConvGated, gate_activation=c["gate_activation"],
            use_linear_after_conv=bool(c["use_linear_after_conv"]),
        ),
        cgmlp_ff_dim=u // 2, cgmlp_conv_kernel=int(c["cgmlp_conv_kernel"]),
        merge_conv_kernel=int(c["merge_conv_kernel"]), norm_eps=1e-12,
        use_ffn=use_ffn, macaron_ffn=use_ffn and bool(c["macaron_ffn"]),
    )  # fmt: skip
    return dict(
        in_dim=int(input_size), out_dim=d, num_layers=int(c["num_blocks"]), input_layer=input_layer,
        encoder_layer=layer, input_embedding_scale=math.sqrt(d), pos_enc="abs" if kind == "abs" else None,
        input_dropout=float(c["positional_dropout_rate"]), dropout=float(c["dropout_rate"]),
        num_heads=int(c["attention_heads"]), att_dropout=float(c["attention_dropout_rate"]),
        final_norm=True, final_norm_eps=1e-12, layer_drop=float(c["layer_drop_rate"]),
        interctc_layers=tuple(c["interctc_layer_idx"] or ()),
        interctc_use_conditioning=bool(c["interctc_use_conditioning"]), vocab_size=vocab_size, padding=padding,
    )  # fmt: skip


def load_espnet_encoder(
    encoder_conf: Mapping[str, Any],
    input_size: int,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    padding: str = "espnet_legacy",
    vocab_size: int | None = None,
) -> ConformerEncoder:
    """Build a :class:`ConformerEncoder` equal to ESPnet's ``EBranchformerEncoder(input_size, **encoder_conf)``.

    Args:
        encoder_conf: the ``encoder_conf`` of an ESPnet ``config.yaml`` (keys verbatim).
        input_size: feature dim (80 for fbank).
        state_dict: ESPnet weights, keys with or without the ``encoder.`` prefix. From a whole ASR model's
            state_dict only the ``encoder.*`` keys are used. Loading is strict: unknown, missing or mis-shaped
            keys raise ValueError listing them.
        padding: ``"espnet_legacy"`` (Default) reproduces espnet <= 202511 exactly, padding quirks included;
            ``"masked"`` gives batch-invariant outputs (ESPnet master's behaviour).
        vocab_size: CTC vocabulary size, only for ``interctc_use_conditioning`` (read from the weights if given).
    """
    if state_dict is not None:
        state_dict = _strip_prefix(state_dict)
        cond = state_dict.get("conditioning_layer.weight")
        if vocab_size is None and cond is not None:
            vocab_size = int(cond.shape[1])
    enc = ConformerEncoder(**espnet_encoder_config(encoder_conf, input_size, padding=padding, vocab_size=vocab_size))
    if state_dict is not None:
        load_strict(enc, _from_espnet(state_dict, enc), "ESPnet", _to_espnet_name)
    return enc


def export_espnet_state_dict(enc: ConformerEncoder) -> dict[str, torch.Tensor]:
    """ESPnet ``EBranchformerEncoder`` state_dict (no ``encoder.`` prefix) of an encoder loaded from ESPnet."""
    if not isinstance(enc, ConformerEncoder):
        raise TypeError(f"enc must be a ConformerEncoder, got {type(enc).__name__}")
    out: dict[str, torch.Tensor] = {}
    for name, t in enc.state_dict().items():
        m = re.fullmatch(r"layers\.(\d+)\.self_att\.qkv\.(weight|bias)", name)
        if m:
            for part, chunk in zip("qkv", t.chunk(3, dim=0)):
                out[f"encoders.{m[1]}.attn.linear_{part}.{m[2]}"] = chunk.clone()
            continue
        out[_to_espnet_name(name, enc)] = t.clone()
    return out


# (our name pattern, ESPnet name pattern) for per-layer keys; \1 is the layer index.
_LAYER_NAMES = [
    ("ffn1.linear_ff", "feed_forward_macaron.w_1"),
    ("ffn1.linear_out", "feed_forward_macaron.w_2"),
    ("ffn2.linear_ff", "feed_forward.w_1"),
    ("ffn2.linear_out", "feed_forward.w_2"),
    ("ffn1_layer_norm", "norm_ff_macaron"),
    ("ffn2_layer_norm", "norm_ff"),
    ("self_att_layer_norm", "norm_mha"),
    ("cgmlp_layer_norm", "norm_mlp"),
    ("final_layer_norm", "norm_final"),
    ("self_att.out_proj", "attn.linear_out"),
    ("self_att.linear_pos", "attn.linear_pos"),
    ("self_att.pos_bias_u", "attn.pos_bias_u"),
    ("self_att.pos_bias_v", "attn.pos_bias_v"),
    ("self_att.q_norm", "attn.q_norm"),
    ("self_att.k_norm", "attn.k_norm"),
    ("cgmlp.linear_ff", "cgmlp.channel_proj1.0"),
    ("cgmlp.norm", "cgmlp.csgu.norm"),
    ("cgmlp.conv", "cgmlp.csgu.conv"),
    ("cgmlp.linear_after_conv", "cgmlp.csgu.linear"),
    ("cgmlp.linear_out", "cgmlp.channel_proj2"),
    ("merge.depthwise_conv_fusion", "depthwise_conv_fusion"),
    ("merge.merge_proj", "merge_proj"),
]


def _frontend_names(enc: ConformerEncoder) -> list[tuple[str, str]]:
    fe = enc.input_layer
    if isinstance(fe, Conv2dSubsampling):
        out = "embed.out" if fe.kind == "conv2d8" else "embed.out.0"  # espnet 202511 naming
        return [(f"input_layer.convs.{i}", f"embed.conv.{2 * i}") for i in range(len(fe.convs))] + [
            ("input_layer.out", out)
        ]
    if isinstance(fe, LinearInput):
        return [("input_layer.linear", "embed.0"), ("input_layer.norm", "embed.1")]
    return []


def _to_espnet_name(name: str, enc: ConformerEncoder) -> str:
    for ours, theirs in _frontend_names(enc) + [("final_layer_norm", "after_norm")]:
        if name.startswith(ours + "."):
            return theirs + name[len(ours) :]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m:
        for ours, theirs in _LAYER_NAMES:
            if m[2] == ours or m[2].startswith(ours + "."):
                return f"encoders.{m[1]}.{theirs}{m[2][len(ours) :]}"
    if name.startswith("conditioning_layer."):
        return name
    return name  # not an ESPnet parameter; strict loading reports it


def _from_espnet(sd: Mapping[str, torch.Tensor], enc: ConformerEncoder) -> dict[str, torch.Tensor]:
    """Rename ESPnet keys to ours (q/k/v concatenated into qkv), with the markers of ``load_strict``."""
    ours = enc.state_dict()
    inverse = {_to_espnet_name(n, enc): n for n in ours}
    out: dict[str, Any] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = re.fullmatch(r"encoders\.(\d+)\.attn\.linear_([qkv])\.(weight|bias)", k)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = v
        elif k in inverse:
            out[inverse[k]] = v
        else:
            out[f"<unknown>{k}"] = v
    for (i, kind), parts in qkv.items():
        name = f"layers.{i}.self_att.qkv.{kind}"
        if name not in ours:
            for p, v in parts.items():
                out[f"<unknown>encoders.{i}.attn.linear_{p}.{kind}"] = v
            continue
        if set(parts) != set("qkv"):
            out[f"<missing>{name}"] = [f"encoders.{i}.attn.linear_{p}.{kind}" for p in "qkv" if p not in parts]
            continue
        out[name] = torch.cat([torch.as_tensor(parts[p]) for p in "qkv"], dim=0)
    return out


def _strip_prefix(sd: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(sd, Mapping):
        raise TypeError(f"state_dict must be a mapping of parameter names to tensors, got {type(sd).__name__}")
    if any(k.startswith("encoder.") for k in sd):
        return {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    return dict(sd)
