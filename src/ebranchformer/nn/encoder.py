"""``ConformerEncoder``: frontend, input projection and scale, a stack of layers (E-Branchformer or Conformer),
optional final LayerNorm, layer drop and interCTC self-conditioning."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ConfigBase, build_module, check_spec, register, resolve_class
from .conformer_layer import ConformerLayer
from .cpu_threads import plan_groups, run_groups
from .dropout import Dropout
from .frontend import PADDING_MODES
from .init import INIT_SCHEMES, init_parameters
from .linear import Linear
from .masking import check_encoder_input, lengths_to_valid
from .norm import LayerNorm
from .posenc import abs_pos_table

__all__ = ["ConformerEncoder", "EncoderConfig"]


@dataclasses.dataclass(frozen=True)
class EncoderConfig(ConfigBase):
    """Options of :class:`ConformerEncoder`. Defaults follow RETURNN's ``ConformerEncoder``."""

    in_dim: int  # input feature dim F
    out_dim: int = 512  # model dim D (ESPnet output_size)
    num_layers: int = 12  # (ESPnet num_blocks)
    input_layer: Any = None  # frontend spec (class / build_dict / module) or None
    encoder_layer: Any = None  # layer spec (Default ConformerLayer, as RETURNN); e.g. build_dict(EBranchformerLayer)
    input_embedding_scale: float = 1.0  # x * scale after the frontend (ESPnet: sqrt(D))
    pos_enc: str | None = None  # None (relative positions live in the attention) or "abs" (ESPnet abs_pos)
    input_dropout: float = 0.1  # dropout after frontend/projection/scale (ESPnet positional_dropout_rate)
    dropout: float = 0.1  # passed to the layers unless their spec sets it
    num_heads: int = 4  # passed to the layers unless their spec sets it
    att_dropout: float = 0.1  # passed to the layers unless their spec sets it
    ff_dim: int | None = None  # passed to the layers only when given
    dropout_broadcast: bool = False  # RETURNN feature-broadcast dropout, passed to the layers
    final_norm: bool = False  # ESPnet's after_norm
    final_norm_eps: float = 1e-12  # its epsilon (ESPnet's LayerNorm)
    layer_drop: float = 0.0  # training-only probability to skip each layer (ESPnet: no rescaling)
    interctc_layers: tuple[int, ...] = ()  # 1-based layer indices whose outputs feed interCTC (0 < i < num_layers)
    interctc_use_conditioning: bool = False  # self-conditioning: x += Linear(softmax(ctc(x))) after those layers
    vocab_size: int | None = None  # CTC vocabulary size, needed for the conditioning layer
    padding: str = "masked"  # "masked" (batch-invariant) or "espnet_legacy" (ESPnet <= 202511)
    init: str = "pytorch"  # "pytorch", "returnn" or "espnet" (see ebranchformer.nn.init)

    _tuple_fields = ("interctc_layers",)

    def __post_init__(self) -> None:
        for name in ("in_dim", "out_dim", "num_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        check_spec(self.input_layer, "input_layer")
        check_spec(self.encoder_layer, "encoder_layer")
        if self.padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {PADDING_MODES}, got {self.padding!r}")
        if self.pos_enc not in (None, "abs"):
            raise ValueError(f"pos_enc must be None or 'abs', got {self.pos_enc!r}")
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {INIT_SCHEMES}, got {self.init!r}")
        for name in ("input_dropout", "dropout", "att_dropout", "layer_drop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not isinstance(self.num_heads, int) or self.num_heads <= 0 or self.out_dim % self.num_heads:
            raise ValueError(f"out_dim ({self.out_dim}) must be divisible by num_heads ({self.num_heads})")
        object.__setattr__(self, "interctc_layers", tuple(int(i) for i in self.interctc_layers))
        bad = [i for i in self.interctc_layers if not 0 < i < self.num_layers]
        if bad:
            raise ValueError(f"interctc_layers must be 1-based indices in (0, num_layers={self.num_layers}), got {bad}")
        if self.interctc_use_conditioning:
            if not self.interctc_layers:
                raise ValueError("interctc_use_conditioning=True needs interctc_layers")
            if not isinstance(self.vocab_size, int) or self.vocab_size <= 0:
                raise ValueError(f"interctc_use_conditioning=True needs vocab_size > 0, got {self.vocab_size!r}")


def switch_flags(root: nn.Module, flags: tuple[str, ...], enabled: bool) -> None:
    """Set every one of ``flags`` (path switches such as ``fast``, ``chunked``, ``onednn``) that ``root`` or a
    submodule has to ``enabled``."""
    for m in root.modules():
        for flag in flags:
            if hasattr(m, flag):
                setattr(m, flag, bool(enabled))


@register
class ConformerEncoder(nn.Module):
    """Encoder frame: ``input_layer -> [input projection] -> * scale [+ abs pos] -> dropout -> layers [-> LN]``.

    Args: those of :class:`EncoderConfig` as keywords. ``input_layer`` and ``encoder_layer`` accept a class, a
    ``build_dict(Class, **opts)`` or a module; the encoder fills in ``in_dim``/``out_dim`` for the frontend and
    ``out_dim, dropout, num_heads, att_dropout`` (and ``ff_dim`` when given) for the layers, unless the spec sets
    them. Each layer is built separately (independent init); a module given as ``encoder_layer`` is deep-copied.
    An input projection ``Linear(frontend_dim, D, bias=False)`` exists iff the frontend's output dim is not D.

    Forward: ``y, y_lengths = enc(x, lengths, *, ctc=None, collected_outputs=None)``

    - ``x``: (B, T, in_dim) float, ``T >= max(lengths)`` (extra padding is allowed).
    - ``lengths``: (B,) int, 1 <= lengths <= T.
    - ``ctc``: a module mapping (B, T', D) to CTC logits (B, T', V); needed for interCTC self-conditioning.
    - ``collected_outputs``: if a dict, receives each layer's output under ``str(i)`` (0-based, as RETURNN).
    - ``y``: (B, T', D); frames at ``t >= y_lengths[b]`` are padding and hold no meaningful values.

    Example (the seed's usage):
        >>> from ebranchformer import ConformerEncoder, EBranchformerLayer, Conv2dSubsampling, build_dict
        >>> enc = ConformerEncoder(
        ...     in_dim=80, out_dim=256, num_layers=2,
        ...     input_layer=build_dict(Conv2dSubsampling, kind="conv2d"),
        ...     encoder_layer=build_dict(EBranchformerLayer, ff_dim=1024, num_heads=4, cgmlp_ff_dim=512,
        ...                              cgmlp_conv_kernel=31, merge_conv_kernel=31),
        ... )
        >>> y, n = enc(torch.randn(2, 100, 80), torch.tensor([100, 80]))
        >>> y.shape, n.tolist()
        (torch.Size([2, 24, 256]), [24, 19])
    """

    def __init__(self, in_dim: int, out_dim: int = 512, **opts: Any) -> None:
        super().__init__()
        cfg = EncoderConfig(in_dim=in_dim, out_dim=out_dim, **opts)
        self.config = cfg
        d = cfg.out_dim
        self.input_layer = self._build_frontend(cfg)
        front_dim = self.input_layer.out_dim if self.input_layer is not None else cfg.in_dim
        self.input_projection = Linear(front_dim, d, bias=False) if front_dim != d else None
        self.input_dropout = Dropout(cfg.input_dropout, cfg.dropout_broadcast)
        self.layers = nn.ModuleList(self._build_layer(cfg) for _ in range(cfg.num_layers))
        self.final_layer_norm = LayerNorm(d, eps=cfg.final_norm_eps) if cfg.final_norm else None
        self.conditioning_layer = Linear(cfg.vocab_size, d) if cfg.interctc_use_conditioning else None
        self._recompute_attention = True
        self._gradient_checkpointing = False
        # CPU inference (eval mode, no gradients) on groups of batch rows, one thread each with its share of the
        # intra-op threads (nn.cpu_threads): same values per row, 0.87x the time on 2 threads at ls100 size
        self.split_rows = True
        init_parameters(self, cfg.init)

    @property
    def gradient_checkpointing(self) -> bool:
        """Per-layer activation checkpointing in training: keep only each layer's input and recompute the layer
        in backward (Default: ``False``)."""
        return self._gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self._gradient_checkpointing = bool(enabled)
        self._sync_recompute()

    @property
    def recompute_attention(self) -> bool:
        """Training memory: the attention layers keep q, k and v for backward and recompute their (B, H, T', T')
        scores, softmax and dropout there instead of storing three such tensors per layer (Default: ``True``;
        the values and gradients are the same). Off while ``gradient_checkpointing`` recomputes whole layers.
        The CPU path in blocks of queries (``chunked``, :mod:`~ebranchformer.nn.blocked_attention`) keeps only the
        bool dropout mask when on; off, it also keeps the softmax probabilities, one float (B, H, T', T') tensor
        per layer, and skips their recomputation (LibriSpeech-100 encoder, 8 x 20 s, 2 CPU threads: training step
        0.979x the time in an in-process comparison, 0.965x with a prototype; about 32 MB more per layer)."""
        return self._recompute_attention

    @recompute_attention.setter
    def recompute_attention(self, enabled: bool) -> None:
        self._recompute_attention = bool(enabled)
        self._sync_recompute()

    def _sync_recompute(self) -> None:
        switch_flags(self, ("recompute",), self._recompute_attention and not self._gradient_checkpointing)
        # the blocked CPU path recomputes inside its own backward: inside a checkpointed layer too
        switch_flags(self, ("keep_probs",), not self._recompute_attention)

    @classmethod
    def from_config(cls, config: EncoderConfig | dict) -> ConformerEncoder:
        if isinstance(config, dict):
            config = EncoderConfig.from_dict(config)
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})

    @staticmethod
    def _build_frontend(cfg: EncoderConfig) -> nn.Module | None:
        spec = cfg.input_layer
        if spec is None:
            return None
        if isinstance(spec, nn.Module):
            return copy.deepcopy(spec)
        cls = resolve_class(spec["class"] if isinstance(spec, dict) else spec)
        defaults: dict[str, Any] = {"in_dim": cfg.in_dim}
        if getattr(cls, "takes_model_dim", False):
            defaults["out_dim"] = cfg.out_dim
        return build_module(spec, None, **defaults)

    @staticmethod
    def _build_layer(cfg: EncoderConfig) -> nn.Module:
        spec = cfg.encoder_layer
        if isinstance(spec, nn.Module):
            return copy.deepcopy(spec)
        defaults: dict[str, Any] = dict(
            out_dim=cfg.out_dim, dropout=cfg.dropout, num_heads=cfg.num_heads, att_dropout=cfg.att_dropout
        )
        if cfg.ff_dim is not None:
            defaults["ff_dim"] = cfg.ff_dim
        if cfg.dropout_broadcast:
            defaults["dropout_broadcast"] = True
        return build_module(spec, ConformerLayer, **defaults)

    def set_fast_path(self, enabled: bool) -> ConformerEncoder:
        """Switch every fused/fast computation (attention via SDPA, strided rel-shift, split merge, oneDNN Linear
        layers and attention products, CPU inference on row groups in threads) on or off; off is the plain reference
        path."""
        switch_flags(self, ("fast", "onednn", "split_rows"), enabled)
        return self

    def set_cpu_blocks(self, enabled: bool) -> ConformerEncoder:
        """Switch the CPU-only paths on or off: the conv2d frontend and the attention in blocks, and the RETURNN
        frontend's in-place tail masks (``chunked``), the oneDNN Linear layers and attention products (``onednn``,
        :mod:`~ebranchformer.nn.linear`, :func:`~ebranchformer.nn.blocked_attention.attend_pairs`) and inference on
        groups of batch rows in threads (``split_rows``, :mod:`~ebranchformer.nn.cpu_threads`). The block loops
        depend on T', so turn them off for one graph for every length (``torch.export``,
        ``torch.compile(dynamic=True)``); the oneDNN Linear is a custom op of this package, which ONNX does not
        know."""
        switch_flags(self, ("chunked", "onednn", "split_rows"), enabled)
        return self

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Each row's output length in ``"masked"`` mode."""
        return lengths if self.input_layer is None else self.input_layer.output_lengths(lengths)

    def forward(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor,
        *,
        ctc: Callable[[torch.Tensor], torch.Tensor] | None = None,
        collected_outputs: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        check_encoder_input(x, lengths, cfg.in_dim, like=next(self.parameters(), None))
        if cfg.interctc_use_conditioning and ctc is None:
            raise ValueError("ctc must be given: this encoder uses interCTC self-conditioning")
        lengths = lengths.to(device=x.device, dtype=torch.int64)
        if cfg.padding == "espnet_legacy":  # ESPnet works on exactly max(lengths) frames
            x = x[:, : int(lengths.max())]
        threads = plan_groups(x.shape[0]) if self._splits(x) else []
        if threads:
            return self._forward_groups(x, lengths, ctc, collected_outputs, threads)
        return self._forward_rows(x, lengths, ctc, collected_outputs)

    def _splits(self, x: torch.Tensor) -> bool:
        """Whether this call may run on groups of rows in threads: CPU inference (eval mode, no gradients)."""
        return self.split_rows and x.is_cpu and not self.training and not torch.is_grad_enabled()

    def _forward_groups(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor,
        ctc: Callable[[torch.Tensor], torch.Tensor] | None,
        collected_outputs: dict[str, torch.Tensor] | None,
        threads: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_forward_rows` on ``len(threads)`` groups of consecutive rows, each in its own thread; every
        group keeps the whole T, so each row sees what it sees in one pass (ESPnet's padding arithmetic too)."""
        b, g = x.shape[0], len(threads)
        sizes = [b // g + (i < b % g) for i in range(g)]
        collect = [None if collected_outputs is None else {} for _ in sizes]
        groups = [(xg, ng, ctc, cg) for xg, ng, cg in zip(x.split(sizes), lengths.split(sizes), collect)]
        parts = run_groups(self._forward_rows, groups, threads)
        if collected_outputs is not None:
            for key in collect[0]:
                collected_outputs[key] = torch.cat([c[key] for c in collect])  # (B, T', D)
        return torch.cat([y for y, _ in parts]), torch.cat([n for _, n in parts])  # (B, T', D), (B,)

    def _forward_rows(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor,
        ctc: Callable[[torch.Tensor], torch.Tensor] | None,
        collected_outputs: dict[str, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder on checked inputs: frontend, projection, layers, final norm."""
        cfg = self.config
        legacy = cfg.padding == "espnet_legacy"
        if self.input_layer is not None:
            x, lengths = self.input_layer(x, lengths, padding=cfg.padding)  # (B, T', F')
        if self.input_projection is not None:
            x = self.input_projection(x)  # (B, T', D)
        if cfg.input_embedding_scale != 1.0:
            x = x * cfg.input_embedding_scale
        if cfg.pos_enc == "abs":
            x = x + abs_pos_table(x.shape[1], cfg.out_dim, device=x.device, dtype=x.dtype)
        x = self.input_dropout(x)
        if x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type):
            x = x.float()  # under autocast the residual stream stays float32 (only matmul inputs are cast)
        valid = lengths_to_valid(lengths, x.shape[1])  # (B, T')
        for i, layer in enumerate(self.layers):
            if self.training and cfg.layer_drop > 0 and torch.rand(()) < cfg.layer_drop:
                continue
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, valid, mask_convs=not legacy, use_reentrant=False)
            else:
                x = layer(x, valid, mask_convs=not legacy)
            if collected_outputs is not None:
                collected_outputs[str(i)] = x
            if self.conditioning_layer is not None and (i + 1) in cfg.interctc_layers:
                x = x + self.conditioning_layer(torch.softmax(ctc(x), dim=-1))
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return x, lengths
