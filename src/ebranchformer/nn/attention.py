"""Multi-head self-attention: Transformer-XL relative positions (``RelPosSelfAttention``) and plain
absolute-position attention (``SelfAttention``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import register
from .autocast import cpu_autocast_dtype
from .blocked_attention import attend_blocks, attend_blocks_train, attend_pairs, block_rows
from .cpu_features import cpu_amx_bf16, cpu_avx512_double_pumped, cpu_onednn_mm_faster, cpu_vendor
from .dropout import Dropout, keep_mask
from .linear import Linear, onednn_float32
from .masking import check_frames, lengths_to_valid
from .norm import LayerNorm
from .pair_attention import attend_pairs_train
from .posenc import legacy_rel_pos_table, rel_pos_table

__all__ = ["RelPosSelfAttention", "SelfAttention", "rel_shift", "rel_shift_legacy"]

_HALF = (torch.float16, torch.bfloat16)  # softmax runs in float32 for these
_BLOCK_BYTES = 4 << 20  # size of one query block's (B, H, r, T) scores on the blocked CPU path (inference)
_TRAIN_BLOCK_BYTES = 4 << 20  # ... and in training
# Inference from this many frames T' on: attend_pairs (oneDNN products, one (row, head) pair at a time, scores in
# blocks of _PAIR_BLOCK_BYTES) instead of SDPA in blocks; below it SDPA was faster (blocked_attention.attend_pairs).
# Training takes pair_attention.attend_pairs_train from the same T' on (where cpu_onednn_mm_faster), on AMD Zen 4
# (cpu_avx512_double_pumped) from _TRAIN_PAIRS_MIN_T_ZEN4 on: ls100 training step on the Zen 4 VM (2 threads, 3-7
# alternating rounds in one process), the blocks against the pairs: 0.91-0.96x at 8 x 499 (four sets, one with
# ESPnet's step between), 0.98-1.01x at 3 x 749, 1.01-1.02x at 2 x 999, 1.11x at 1 x 1999.
_PAIRS_MIN_T = 448
_TRAIN_PAIRS_MIN_T_ZEN4 = 768
_PAIR_BLOCK_BYTES = 2 << 20


def _biased(q: torch.Tensor, bias: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``(q + bias[:, None, :]) * scale`` for q (B, H, T, dk) and a per-head bias (H, dk). Without gradients it is
    written into a new contiguous tensor: the sum of a strided head view (the QKV projection's (B, T, 3, H, dk)
    output) otherwise comes out in the (B, T, H, dk) order, which the oneDNN pairs then copy dense; one LibriSpeech-
    100 attention layer (8 x 499, bf16 autocast and float32 inference) took 0.83-0.86x the time (60 alternating
    rounds in one process, Zen 5 VM)."""
    b = bias[:, None, :]  # (H, 1, dk)
    if torch.is_grad_enabled() and (q.requires_grad or bias.requires_grad):
        return q + b if scale is None else (q + b) * scale
    out = torch.add(q, b, out=q.new_empty(q.shape, dtype=torch.result_type(q, b)))  # (B, H, T, dk), contiguous
    return out if scale is None else out.mul_(scale)


def _key_bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) valid keys -> (B, 1, 1, T) additive mask: 0 on valid keys, -inf on padding."""
    b, t = valid.shape
    bias = torch.zeros((b, 1, 1, t), dtype=dtype, device=valid.device)
    return bias.masked_fill_(~valid[:, None, None, :], float("-inf"))  # (B, 1, 1, T)


def _key_tails(valid: torch.Tensor) -> list[int] | None:
    """Each row's first padded key if every row's valid keys are a prefix (T: no padding), else None."""
    n = valid.sum(1)  # (B,)
    if not torch.equal(valid, lengths_to_valid(n, valid.shape[1])):
        return None
    return n.tolist()


def rel_shift(bd: torch.Tensor, fast: bool = True) -> torch.Tensor:
    """(B, H, T, 2T-1) -> (B, H, T, T) with ``out[..., i, j] = bd[..., i, T-1-i+j]`` (distance i - j).

    The fast form is a strided view (no copy); the plain form gathers with an explicit index.
    """
    t = bd.shape[-2]
    if fast:
        b, h, _, w = bd.shape  # w = 2T-1
        bd = bd.contiguous()  # row i of the view starts at element i * (w - 1) + (T - 1) of its (T, w) block
        return bd.as_strided((b, h, t, t), (h * t * w, t * w, w - 1, 1), t - 1)  # (B, H, T, T)
    i = torch.arange(t, device=bd.device)
    idx = (t - 1) - i[:, None] + i[None, :]  # (T, T)
    return bd.gather(-1, idx.expand(*bd.shape[:-1], t))  # (..., T, T)


def rel_shift_legacy(bd: torch.Tensor) -> torch.Tensor:
    """ESPnet's legacy Transformer-XL shift of a (..., T, T) score matrix: prepend a zero column, read the
    (T, T+1) block row-major from offset T (i.e. drop the first row of its (T+1, T) view)."""
    *lead, t, _ = bd.shape
    padded = F.pad(bd, (1, 0))  # (..., T, T+1)
    return padded.reshape(*lead, t * (t + 1))[..., t:].reshape(*lead, t, t)  # (..., T, T)


class _MultiHeadBase(nn.Module):
    """Shared projections: a fused ``qkv`` Linear (D -> 3D, rows [Q; K; V]) and ``out_proj``."""

    def __init__(self, dim: int, num_heads: int, att_dropout: float, with_bias: bool) -> None:
        super().__init__()
        if num_heads <= 0 or dim % num_heads:
            raise ValueError(f"out_dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.qkv = Linear(dim, 3 * dim, bias=with_bias)
        self.out_proj = Linear(dim, dim, bias=with_bias)
        self.att_dropout = float(att_dropout)
        self.dropout = Dropout(att_dropout)
        self.fast = True
        # On the CPU, inference and training in blocks of queries (_blocked). Its Python loop depends on T: turn it
        # off for torch.export / torch.compile(dynamic=True), which then trace the one-pass fast path.
        self.chunked = True
        # Training memory: keep only q, k, v (and the position table) for backward and recompute the (B, H, T, T)
        # scores, softmax and dropout there (same RNG state, so the same values). ConformerEncoder turns it off
        # while whole layers are checkpointed.
        self.recompute = True
        # The blocked CPU training path recomputes in its own backward; with keep_probs it keeps the (B, H, T, T)
        # softmax probabilities instead (ConformerEncoder.recompute_attention = False sets it).
        self.keep_probs = False
        # CPU float32 inference from T' >= _PAIRS_MIN_T on: the blocked path's products on oneDNN (attend_pairs);
        # under bf16 autocast on an AMX CPU: SDPA's blocks in bf16 (_blocked)
        self.onednn = True

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim)  # (B, T, 3, H, dk)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, dk) each
        return q, k, v

    def _cpu_blocks(self, q: torch.Tensor) -> bool:
        """The blocked CPU path: inference (no gradients) and training (eval mode with gradients, e.g. in
        ``torch.export``, takes the one-pass path)."""
        return self.fast and self.chunked and q.is_cpu and (self.training or not torch.is_grad_enabled())

    def _blocked(
        self, qu: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qv: torch.Tensor | None, p: torch.Tensor | None,
        valid: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """The CPU path in blocks of queries (:mod:`.blocked_attention`): qu, k, v, qv (pre-scaled) (B, H, T, dk),
        p (H, 2T-1, dk) or None; returns (B, T, D). With gradients, the dropout keep-mask is drawn here as the
        plain path's ``Dropout`` draws it."""
        b, h, t, _ = qu.shape
        key_bias = _key_bias(valid, (qu if qv is None else qv).dtype)  # (B, 1, 1, T)
        drop = self.att_dropout if self.training else 0.0
        if not torch.is_grad_enabled() and drop == 0.0:
            tails = _key_tails(valid)
            if self._amx_blocks():
                # AMX: SDPA's blocks in bf16 (its CPU kernel keeps scores and softmax in float32), the positional
                # bias a bf16 product too: about 0.4x the float32 blocks' time. The encoder output deviates from
                # float32 as much as with the float32 blocks (LibriSpeech-100 bench batch: mean abs 0.00393 either
                # way, and 0.00393 with the bias kept in float32). Blocks of bf16 scores of the same bytes.
                with torch.autocast(qu.device.type, enabled=False):
                    args = [None if x is None else x.to(torch.bfloat16) for x in (qu, k, v, qv, p, key_bias)]
                    return attend_blocks(*args, block_rows(b, h, t, _BLOCK_BYTES, itemsize=2), key_tails=tails)
            block = block_rows(b, h, t, _BLOCK_BYTES)
            if cpu_autocast_dtype() is not None:
                with torch.autocast(qu.device.type, enabled=False):
                    # without AMX the blocks run in float32 on the half-precision projections: SDPA's CPU kernel
                    # was slower in bf16 than in float32 at these block sizes on AVX-512 alone (bf16 encoder
                    # forward 0.95x with this), and scores and softmax keep float32 precision. The pairs take k
                    # and v in bf16 and convert them in their dense copies (one pass each instead of two)
                    qu, qv, p, key_bias = (None if x is None else x.float() for x in (qu, qv, p, key_bias))
                    if self._infer_pairs(qu):
                        return attend_pairs(qu, k, v, qv, p, key_bias, _PAIR_BLOCK_BYTES)
                    return attend_blocks(qu, k.float(), v.float(), qv, p, key_bias, block, tails)
            if self._infer_pairs(qu, k, v):
                return attend_pairs(qu, k, v, qv, p, key_bias, _PAIR_BLOCK_BYTES)
            return attend_blocks(qu, k, v, qv, p, key_bias, block, tails)
        keep = keep_mask((b, h, t, t), drop, qu.device) if drop > 0 else None  # (B, H, T, T) bool
        min_t = _TRAIN_PAIRS_MIN_T_ZEN4 if cpu_avx512_double_pumped() else _PAIRS_MIN_T
        pairs = self.onednn and t >= min_t and cpu_onednn_mm_faster()
        if pairs and onednn_float32(qu, k, v, *(x for x in (qv, p) if x is not None)):
            # where MKL runs at half oneDNN's rate (AMD with AVX-512): every product a 2-D oneDNN matmul per pair.
            # Their per-pair overhead made them slower at short T' (one layer's attention fwd+bwd, dk = 64, 4 heads,
            # Zen 5 VM, 2 threads: 1.05x the blocks' time at 8 x 400, 1.28x at 8 x 300; 0.93x at 8 x 450, 0.82x
            # at 8 x 499, 0.67x at 2 x 1000)
            return attend_pairs_train(qu, k, v, qv, p, key_bias, keep, drop, store=self.keep_probs)
        block = block_rows(b, h, t, _TRAIN_BLOCK_BYTES)
        return attend_blocks_train(qu, k, v, qv, p, key_bias, keep, drop, block, store=self.keep_probs)

    def _amx_blocks(self) -> bool:
        """Whether :meth:`_blocked` runs SDPA's blocks in bf16: inference (no gradients, no attention dropout)
        under CPU bf16 autocast on a CPU with AMX, with ``onednn`` on."""
        inference = not torch.is_grad_enabled() and not (self.training and self.att_dropout > 0)
        return inference and self.onednn and cpu_autocast_dtype() == torch.bfloat16 and cpu_amx_bf16()

    def _infer_pairs(self, *tensors: torch.Tensor) -> bool:
        """Whether float32 blocked inference on these tensors takes oneDNN's products one (row, head) pair at a
        time (:func:`~.blocked_attention.attend_pairs`): from T' >= ``_PAIRS_MIN_T`` on, on a CPU that is not
        Intel's; else SDPA in blocks. Where MKL runs at full speed (Intel), SDPA's CPU kernel, whose products are
        MKL's, was the faster: ls100 fp32 forward 0.93x the pairs' time, one 80 s utterance 0.92x (this session's
        Xeon VM, 2 threads); on the AMD EPYC VM the pairs were (0.977x and 0.917x the SDPA blocks' time)."""
        pairs = self.onednn and tensors[0].shape[2] >= _PAIRS_MIN_T and onednn_float32(*tensors)
        return pairs and cpu_vendor() != "GenuineIntel"

    def _core(self, fn, *args: torch.Tensor) -> torch.Tensor:
        """``fn(*args)``, checkpointed in training when ``recompute`` is set."""
        if self.recompute and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, valid: torch.Tensor
    ) -> torch.Tensor:
        """softmax((q k^T + bias) / sqrt(dk), keys masked by ``valid``) v, heads merged: (B, T, D)."""
        b, h, t, dk = q.shape
        keep = valid[:, None, None, :]  # (B, 1, 1, T)
        # SDPA's own attention dropout on the CPU runs its math path with a float bernoulli mask: our explicit
        # path below does the same math with the cheaper bool-mask dropout (CPU training with the blocks off)
        if self.fast and not (self.training and self.att_dropout > 0 and q.is_cpu):
            # the positional bias arrives already scaled by 1/sqrt(dk); one pass adds the key mask to it
            scale = 1.0 / math.sqrt(dk)
            if bias is None:
                mask = keep
            else:
                mask = bias + _key_bias(valid, bias.dtype)  # (B, H, T, T)
            p = self.att_dropout if self.training else 0.0
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)
        else:
            s = torch.matmul(q, k.transpose(-2, -1))  # (B, H, T, T)
            if bias is not None and self.fast:  # bias pre-scaled (CPU training on the fast path)
                s = s * (1.0 / math.sqrt(dk)) + bias
            elif bias is not None:
                s = (s + bias) / math.sqrt(dk)
            else:
                s = s / math.sqrt(dk)
            s = s.masked_fill(~keep, float("-inf"))
            att = torch.softmax(s, dim=-1, dtype=torch.float32 if s.dtype in _HALF else None).to(q.dtype)
            o = torch.matmul(self.dropout(att), v)  # (B, H, T, dk)
        return o.transpose(1, 2).reshape(b, t, h * dk)  # (B, T, D)


@register
class RelPosSelfAttention(_MultiHeadBase):
    """Transformer-XL relative-position self-attention (ESPnet ``RelPositionMultiHeadedAttention``, RETURNN
    ``RelPosSelfAttention``) with a sinusoidal 2T-1 table.

    ::

        scores[i, j] = ((q_i + u) . k_j + (q_i + v) . P(i - j)) / sqrt(dk),   P = linear_pos(sinusoid table)

    Args:
        dim: model dim D (in = out = key = value total).
        num_heads: H, must divide D (Default: ``4``).
        att_dropout: dropout on the attention weights, training only (Default: ``0.1``).
        with_bias: biases in ``qkv`` and ``out_proj`` (Default: ``True``).
        pos_emb_dropout: dropout on the projected position table, training only (Default: ``0.0``).
        zero_triu: ESPnet's option, zero the positional term for keys after the query (Default: ``False``).
        legacy: ESPnet's ``legacy_rel_selfattn`` + ``legacy_rel_pos`` (T x T table of absolute positions counted
            from the end of a ``legacy_max_len`` table, Transformer-XL shift) (Default: ``False``).
        legacy_max_len: ESPnet's ``max_pos_emb_len`` for the legacy variant (Default: ``5000``).

    Forward: ``(x (B, T, D), valid (B, T) bool) -> (B, T, D)``. Only keys are masked; padded query rows are
    computed like the others.

    The fast path (``fast=True``, Default) passes the positional term as an additive bias to
    ``scaled_dot_product_attention`` and shifts with a strided view; the plain path spells the math out.

    Example:
        >>> att = RelPosSelfAttention(256, num_heads=4)
        >>> x, valid = torch.randn(2, 10, 256), torch.ones(2, 10, dtype=torch.bool)
        >>> att(x, valid).shape
        torch.Size([2, 10, 256])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        *,
        att_dropout: float = 0.1,
        with_bias: bool = True,
        pos_emb_dropout: float = 0.0,
        zero_triu: bool = False,
        legacy: bool = False,
        legacy_max_len: int = 5000,
    ) -> None:
        super().__init__(dim, num_heads, att_dropout, with_bias)
        if dim % 2:
            raise ValueError(f"RelPosSelfAttention needs an even dim for its sinusoid table, got {dim}")
        self.linear_pos = Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(num_heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.empty(num_heads, self.head_dim))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)
        self.pos_emb_dropout = Dropout(pos_emb_dropout)
        self.zero_triu, self.legacy, self.legacy_max_len = bool(zero_triu), bool(legacy), int(legacy_max_len)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        check_frames(x, valid, self.dim, like=self.qkv.weight)
        t = x.shape[1]
        q, k, v = self._qkv(x)  # (B, H, T, dk)
        if self.legacy:
            table = legacy_rel_pos_table(t, self.dim, self.legacy_max_len, device=x.device, dtype=x.dtype)
        else:
            table = rel_pos_table(t, self.dim, device=x.device, dtype=x.dtype)  # (2T-1, D)
        p = self.linear_pos(self.pos_emb_dropout(table))  # (P, D), P = 2T-1 (latest) or T (legacy)
        p = p.view(-1, self.num_heads, self.head_dim).transpose(0, 1)  # (H, P, dk)
        if self._cpu_blocks(q) and not (self.legacy or self.zero_triu):
            bu, bv = self.pos_bias_u, self.pos_bias_v
            if self._amx_blocks():  # the blocks take bf16: the biased queries are made in it (q is bf16 there)
                bu, bv = bu.to(q.dtype), bv.to(q.dtype)
            scale = 1.0 / math.sqrt(self.head_dim)
            return self.out_proj(self._blocked(_biased(q, bu), k, v, _biased(q, bv, scale), p, valid))
        return self.out_proj(self._core(self._scores_and_attend, q, k, v, p, valid))

    def _scores_and_attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        b, h, t, dk = q.shape
        qv = q + self.pos_bias_v[:, None, :]  # (B, H, T, dk)
        if self.fast:
            qv = qv * (1.0 / math.sqrt(dk))  # _attend's fast path takes the bias pre-scaled
        bd = torch.matmul(qv, p.transpose(-2, -1))  # (B, H, T, P)
        bd = rel_shift_legacy(bd) if self.legacy else rel_shift(bd, fast=self.fast)  # (B, H, T, T)
        if self.zero_triu:
            bd = bd * torch.ones(t, t, device=q.device, dtype=bd.dtype).tril()
        return self._attend(q + self.pos_bias_u[:, None, :], k, v, bd, valid)


@register
class SelfAttention(_MultiHeadBase):
    """Plain multi-head self-attention for absolute positions (ESPnet ``selfattn``, as in OWSM v3.1).

    Args:
        dim: model dim D.
        num_heads: H (Default: ``4``).
        att_dropout: dropout on the attention weights (Default: ``0.1``).
        with_bias: biases in the projections (Default: ``True``).
        qk_norm: LayerNorm over dk on q and k, ESPnet's ``qk_norm`` (Default: ``False``).
        qk_norm_eps: its epsilon (Default: ``1e-12``, ESPnet's).

    Forward: ``(x (B, T, D), valid (B, T) bool) -> (B, T, D)``.

    Example:
        >>> att = SelfAttention(256, num_heads=4)
        >>> att(torch.randn(2, 10, 256), torch.ones(2, 10, dtype=torch.bool)).shape
        torch.Size([2, 10, 256])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        *,
        att_dropout: float = 0.1,
        with_bias: bool = True,
        qk_norm: bool = False,
        qk_norm_eps: float = 1e-12,
    ) -> None:
        super().__init__(dim, num_heads, att_dropout, with_bias)
        self.q_norm = LayerNorm(self.head_dim, eps=qk_norm_eps) if qk_norm else None
        self.k_norm = LayerNorm(self.head_dim, eps=qk_norm_eps) if qk_norm else None

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        check_frames(x, valid, self.dim, like=self.qkv.weight)
        q, k, v = self._qkv(x)  # (B, H, T, dk)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self._cpu_blocks(q) and self.training:  # inference: SDPA's CPU flash kernel is blocked already
            return self.out_proj(self._blocked(q, k, v, None, None, valid))
        return self.out_proj(self._core(self._attend, q, k, v, None, valid))
