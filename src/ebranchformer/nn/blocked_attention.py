"""Attention over blocks of queries, the CPU path of :class:`~ebranchformer.nn.attention.RelPosSelfAttention`
and :class:`~ebranchformer.nn.attention.SelfAttention`.

A block of r queries needs only the T + r - 1 rows of the (2T-1)-row position table its distances reach, and its
(B, H, r, T) scores stay in cache instead of (B, H, T, T) and (B, H, T, 2T-1) tensors going through memory.

- Inference (:func:`attend_blocks`): SDPA per block with the positional bias as its mask (1.6x faster attention
  at T' = 500, 1.7x at T' = 2000).
- Inference in float32 on oneDNN (:func:`attend_pairs`): one (batch row, head) pair at a time, its three products
  on oneDNN's matmul, which runs these K = 64 shapes at about 100 GFLOP/s on one thread of the project's CPU where
  MKL's ``bmm`` reached 65 and SDPA's kernel about 57 (see the function for the measured gains).
- Training (:func:`attend_blocks_train`): an autograd function whose forward keeps only its inputs and the dropout
  keep-mask (bool), and whose backward recomputes each block's scores and softmax (FlashAttention's scheme, with
  the positional term's gradient gathered back onto the table); or, with ``store``, keeps the softmax
  probabilities, one (B, H, T, T) tensor, and skips the recomputation.

Notation: ``qu`` (B, H, T, dk) are the queries that meet the keys (q + u for Transformer-XL attention), ``qv``
the queries that meet the position table, already scaled by 1/sqrt(dk), ``p`` (H, 2T-1, dk) the projected table
with row m for distance T-1-m, ``key_bias`` (B, 1, 1, T) 0 on valid keys and -inf on padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dropout import keep_scale
from .linear import onednn_xwt_eager

__all__ = ["attend_blocks", "attend_blocks_train", "attend_pairs", "block_rows"]

_HALF = (torch.float16, torch.bfloat16)  # softmax runs in float32 for these


def block_rows(b: int, h: int, t: int, block_bytes: int, itemsize: int = 4) -> int:
    """Queries per block so that a block's (B, H, r, T) scores of ``itemsize`` bytes (Default: float32) take about
    ``block_bytes``."""
    return max(16, block_bytes // (itemsize * b * h * t))


def _table_rows(qv: torch.Tensor, a: int, e: int) -> tuple[torch.Tensor, int, int]:
    """Query rows [a, e) of ``qv`` heads first, (H, B*n, dk), and the table rows [lo, hi) = [T-e, 2T-1-a) their
    distances reach (w = T + n - 1 of them)."""
    b, h, t, dk = qv.shape
    return qv[:, :, a:e].transpose(0, 1).reshape(h, b * (e - a), dk), t - e, 2 * t - 1 - a  # (H, B*n, dk)


def _pos_bias(qv: torch.Tensor, p: torch.Tensor, a: int, e: int) -> torch.Tensor:
    """The positional scores (B, H, n, T) of query rows [a, e): a view of their (H, B*n, w) product with the w
    table rows they reach (:func:`_table_rows`), not a product with the whole (2T-1)-row table."""
    b, h, t, _ = qv.shape
    qh, lo, hi = _table_rows(qv, a, e)
    local = torch.bmm(qh, p[:, lo:hi].transpose(1, 2))  # (H, B*n, w); p is not expanded over the batch
    return _by_key(local, b, h, e - a, t)


def _by_key(local: torch.Tensor, b: int, h: int, n: int, t: int) -> torch.Tensor:
    """(H, B*n, w) table-column layout -> (B, H, n, T) key layout: row i (query a + i) takes table row
    T-1-(a+i)+j for key j, i.e. local column n-1-i+j (a strided view, no copy)."""
    w = local.shape[-1]
    return local.as_strided((b, h, n, t), (n * w, b * n * w, w - 1, 1), local.storage_offset() + n - 1)


def attend_blocks(qu, k, v, qv, p, key_bias, block: int, key_tails: list[int] | None = None) -> torch.Tensor:
    """Inference: softmax(qu k^T / sqrt(dk) + positional bias + key_bias) v in blocks of ``block`` queries
    (``qv``/``p`` None: no positional term). Returns (B, T, H*dk).

    ``key_tails`` (with a positional term): each row's first padded key (T: none), where ``key_bias`` is -inf on
    exactly those tails. The positional bias view (:func:`_pos_bias`) then gets -inf written into the padded keys'
    entries in place, instead of a sum with ``key_bias`` that writes a whole new (B, H, n, T) mask (one layer's bf16
    attention, 4 rows of 499 frames, one thread: 8-10 ms against 9.4-17 ms, same values)."""
    b, h, t, dk = qu.shape
    outs = []
    for a in range(0, t, block):
        e = min(a + block, t)
        if p is None:
            mask = key_bias
        elif key_tails is None:
            mask = _pos_bias(qv, p, a, e) + key_bias  # (B, H, n, T)
        else:
            mask = _pos_bias(qv, p, a, e)  # (B, H, n, T), a view of this block's own product
            for row, first in enumerate(key_tails):
                if first < t:
                    mask[row, :, :, first:] = float("-inf")  # (H, n, T - first), strided
        outs.append(F.scaled_dot_product_attention(qu[:, :, a:e], k, v, attn_mask=mask, scale=1.0 / math.sqrt(dk)))
    o = torch.cat(outs, dim=2)  # (B, H, T, dk)
    return o.transpose(1, 2).reshape(b, t, h * dk)  # (B, T, D)


def attend_pairs(qu, k, v, qv, p, key_bias, block_bytes: int, pos_rows: int = 128) -> torch.Tensor:
    """Inference in float32 on the CPU, the same values as :func:`attend_blocks`: one (batch row, head) pair at a
    time, in blocks of queries whose (r, T) scores take about ``block_bytes`` (r a multiple of ``pos_rows``, at
    least one); each block's positional term in sub-blocks of ``pos_rows`` queries (a sub-block of n needs T + n - 1
    table rows). The products q k^T, the positional q p^T and softmax(scores) v run on oneDNN
    (:func:`~.linear.onednn_xwt_eager`: the op called directly, without the custom op's dispatch, since this
    loop is never traced; bf16 encoder forward 0.983x, 7 rounds alternating in one process on the Zen 5 VM); the
    key mask is added only on rows with masked keys before their last valid one. Returns (B, T, H*dk).

    Each pair's products leave out the keys after its batch row's last valid one (:func:`key_rows`; one ls100
    attention layer with the bench batch's lengths, T' = 399-499: 0.96x the time in float32, 0.98x under bf16
    autocast, 40 alternating rounds; the bf16 encoder forward 0.97-0.99x). oneDNN is slow on non-contiguous
    operands (seconds for a strided slice), so k (pre-scaled), v, the queries and the table are first copied
    dense, once per call (:func:`dense_pair_operands`); v enters as the transposed view of its (n_k, dk) rows,
    which oneDNN took faster than a dense v^T (93 against 116 us for a (499, 499) x (499, 64) product).

    Measured against :func:`attend_blocks` in the encoder's forward (2 threads, alternating in one process;
    BENCHMARKS.md): 0.977x for the ls100 batch at T' = 499 (two row groups of one thread each), 0.917x for one 80 s
    utterance (T' = 1999); slower below T' of about 450 (1.02-1.05x at T' = 124-399 for one row), where the caller
    keeps SDPA."""
    b_, h_, t, dk = qu.shape
    quc, kc, vc, qvc, pc = dense_pair_operands(qu, k, v, qv, p)  # vc's (n_k, dk) rows go to oneDNN transposed
    keys = key_rows(key_bias)
    rows = max(1, block_bytes // (4 * t * pos_rows)) * pos_rows  # whole sub-blocks of positional rows
    out = qu.new_empty(b_, t, h_, dk)
    for b in range(b_):
        kb, nk = keys[b]  # keys from nk on are all masked: left out
        for h in range(h_):
            for a0 in range(0, t, rows):
                e0 = min(a0 + rows, t)
                s = onednn_xwt_eager(quc[b, h, a0:e0], kc[b, h, :nk])  # (n0, n_k)
                if pc is not None:
                    add_pair_pos(s, qvc, pc, b, h, a0, e0, pos_rows, onednn_xwt_eager)
                if kb is not None:
                    s += kb
                out[b, a0:e0, h] = onednn_xwt_eager(torch.softmax(s, dim=-1), vc[b, h, :nk].t())  # (n0, dk)
    return out.view(b_, t, h_ * dk)


def dense_pair_operands(qu, k, v, qv, p):
    """The dense operands of the per-pair products: qu, k pre-scaled by 1/sqrt(dk), v (all (B, H, T, dk)), qv and
    p ((H, 2T-1, dk)) or None. oneDNN is slow on strided slices, so each is copied dense once per call, in one pass
    that also converts a half-precision input to float32 (bf16 inference hands over its k and v projections as
    they are)."""
    scale = 1.0 / math.sqrt(qu.shape[-1])
    kc = k.new_empty(k.shape, dtype=torch.float32 if k.dtype in _HALF else k.dtype)  # (B, H, T, dk)
    kc = torch.mul(k, scale, out=kc) if k.dtype == kc.dtype else kc.copy_(k).mul_(scale)  # pre-scaled
    qvc, pc = (None if x is None else dense_float(x) for x in (qv, p))
    return dense_float(qu), kc, dense_float(v), qvc, pc


def dense_float(x: torch.Tensor) -> torch.Tensor:
    """``x`` contiguous, in float32 if it is a half dtype: ``x`` itself if it is so already, else one (converting)
    copy. (``Tensor.to`` returns an ``x`` of the asked dtype as it is, strided or not, even with
    ``memory_format=torch.contiguous_format``.)"""
    if x.dtype not in _HALF:
        return x.contiguous()
    return x.to(torch.float32, memory_format=torch.contiguous_format)


def key_rows(key_bias: torch.Tensor) -> list[tuple[torch.Tensor | None, int]]:
    """Per batch row of ``key_bias`` (B, 1, 1, T): ``(bias, n)`` with n the keys up to the last valid one (every key
    from n on is masked, so a pair's products need only keys [0, n): the same values, their -inf bias only ever
    adding exact zeros) and ``bias`` the (n,) key bias of those, or None where none of them is masked (nothing to
    add). A row without any valid key keeps all T (its softmax then gives NaN, as on the plain path)."""
    b, t = key_bias.shape[0], key_bias.shape[-1]
    masked = torch.isneginf(key_bias.view(b, t))  # (B, T)
    index = torch.arange(t, device=masked.device)  # (T,)
    ends = torch.where(masked, 0, index + 1).amax(-1)  # (B,): one past the last valid key, 0 without any
    ends = torch.where(ends == 0, t, ends)  # (B,)
    holes = (masked & (index < ends[:, None])).any(-1).tolist()  # masked keys among each row's kept ones
    ends = ends.tolist()
    return [(key_bias[i, 0, 0, : ends[i]] if holes[i] else None, ends[i]) for i in range(b)]


def add_pair_pos(s, qvc, pc, b: int, h: int, a0: int, e0: int, pos_rows: int, xwt) -> None:
    """``s`` (e0 - a0, n_k) += pair (b, h)'s positional scores of query rows [a0, e0) against keys [0, n_k), in
    sub-blocks of ``pos_rows`` queries, each a product ``xwt(x, w) = x w^T`` with only the n_k + n - 1 table rows
    its distances reach."""
    t, nk = qvc.shape[2], s.shape[1]
    for a in range(a0, e0, pos_rows):
        e = min(a + pos_rows, e0)
        local = xwt(qvc[b, h, a:e], pc[h, t - e : t - 1 - a + nk])  # (n, n_k+n-1)
        s[a - a0 : e - a0] += _by_key(local[None], 1, 1, e - a, nk)[0, 0]  # (n, n_k)


def _probs(qu, k, qv, p, key_bias, a: int, e: int):
    """Softmax probabilities (B, H, n, T) of query rows [a, e), in the scores' dtype (bf16 under autocast; the
    softmax itself runs in float32 for half dtypes)."""
    s = torch.matmul(qu[:, :, a:e], k.transpose(-2, -1))  # (B, H, n, T)
    s = s.mul_(1.0 / math.sqrt(qu.shape[-1]))
    if p is not None:
        s = s.add_(_pos_bias(qv, p, a, e))
    s = s.add_(key_bias)
    return torch.softmax(s, dim=-1, dtype=torch.float32 if s.dtype in _HALF else None).to(s.dtype)


def _keep_factor(keep, a: int, e: int, scale: float, dtype: torch.dtype) -> torch.Tensor | None:
    """Query rows [a, e) of the dropout keep-mask as 0 / 1/P(keep) in ``dtype`` (B, H, n, T): one conversion,
    then plain same-dtype products (a bool x float product takes the slow mixed-dtype path)."""
    return None if keep is None else keep[:, :, a:e].to(dtype).mul_(scale)


class _AttendBlocks(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, qu, k, v, qv, p, key_bias, keep, keep_scale: float, block: int, store: bool):
        b, h, t, dk = qu.shape
        # k and v arrive as strided views of the fused qkv projection: one copy here, not one per block
        k, v = k.contiguous(), v.contiguous()  # (B, H, T, dk)
        outs = []
        probs = None
        for a in range(0, t, block):
            e = min(a + block, t)
            att = _probs(qu, k, qv, p, key_bias, a, e)  # (B, H, n, T)
            if store:
                if probs is None:
                    probs = att.new_empty(b, h, t, t)  # (B, H, T, T)
                probs[:, :, a:e] = att
            kf = _keep_factor(keep, a, e, keep_scale, att.dtype)
            outs.append(torch.matmul(att if kf is None else att.mul_(kf), v).transpose(1, 2))  # (B, n, H, dk)
        o = torch.cat(outs, dim=1)  # (B, T, H, dk)
        ctx.save_for_backward(qu, k, v, qv, p, key_bias, keep, o, probs)
        ctx.keep_scale, ctx.block = keep_scale, block
        return o.view(b, t, h * dk)  # (B, T, D)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, go):
        qu, k, v, qv, p, key_bias, keep, o, probs = ctx.saved_tensors
        b, h, t, dk = qu.shape
        scale = 1.0 / math.sqrt(dk)
        go = go.reshape(b, t, h, dk)  # (B, T, H, dk)
        dqu, dk_, dv = torch.empty_like(qu), torch.zeros_like(k), torch.zeros_like(v)  # k, v: contiguous
        dqv = None if qv is None else torch.empty_like(qv)
        dp = None if p is None else torch.zeros_like(p)
        dk3, dv3 = dk_.view(b * h, t, dk), dv.view(b * h, t, dk)  # (B*H, T, dk) views to accumulate into
        for a in range(0, t, ctx.block):
            e = min(a + ctx.block, t)
            n = e - a
            att = _probs(qu, k, qv, p, key_bias, a, e) if probs is None else probs[:, :, a:e]  # (B, H, n, T)
            kf = _keep_factor(keep, a, e, ctx.keep_scale, att.dtype)
            gob = go[:, a:e].transpose(1, 2).to(att.dtype)  # (B, H, n, dk)
            dropped = att if kf is None else att * kf
            dv3.baddbmm_(dropped.view(b * h, n, t).transpose(1, 2), gob.reshape(b * h, n, dk))
            ds = torch.matmul(gob, v.to(att.dtype).transpose(-2, -1))  # d(dropped) (B, H, n, T)
            if kf is not None:
                ds = ds.mul_(kf)  # d(att)
            # softmax backward: d(scores) = att * (d(att) - sum_j d(att)_j att_j). In float32 that sum is the row's
            # d(out) . out (FlashAttention's trick: no (B, H, n, T) product to reduce); in bf16, out's rounding
            # would enter the difference, so the sum is taken directly, in float32.
            if ds.dtype in _HALF:
                rowdot = (ds * att).sum(-1, keepdim=True, dtype=torch.float32).to(ds.dtype)  # (B, H, n, 1)
            else:
                rowdot = (gob * o[:, a:e].transpose(1, 2)).sum(-1, keepdim=True)  # (B, H, n, 1)
            ds = ds.sub_(rowdot).mul_(att)  # d(scores) (B, H, n, T)
            dqu[:, :, a:e] = torch.matmul(ds, k.to(ds.dtype)).mul_(scale)
            dk3.baddbmm_(ds.view(b * h, n, t).transpose(1, 2), qu[:, :, a:e].reshape(b * h, n, dk).to(ds.dtype),
                         alpha=scale)  # fmt: skip
            if p is not None:
                qh, lo, hi = _table_rows(qv, a, e)  # (H, B*n, dk)
                qh = qh.to(ds.dtype)
                local = ds.new_zeros(h, b * n, hi - lo)  # (H, B*n, w), as in _pos_bias
                _by_key(local, b, h, n, t).copy_(ds)
                dqv[:, :, a:e] = torch.bmm(local, p[:, lo:hi].to(ds.dtype)).view(h, b, n, dk).transpose(0, 1)
                dp[:, lo:hi].baddbmm_(local.transpose(1, 2), qh)  # (H, w, dk)
        return dqu, dk_, dv, dqv, dp, None, None, None, None, None


def attend_blocks_train(
    qu, k, v, qv, p, key_bias, keep: torch.Tensor | None, drop_p: float, block: int, store: bool = False
):
    """Training (and any CPU pass that needs gradients): the same attention with dropout on the probabilities
    (``keep`` (B, H, T, T) bool from :func:`~.dropout.keep_mask`, kept entries scaled by
    :func:`~.dropout.keep_scale` of ``drop_p``; None: no dropout). Returns (B, T, H*dk); gradients reach qu, k, v,
    qv and p. ``store`` keeps the (B, H, T, T) softmax probabilities for backward instead of recomputing them (same
    values; more memory, less time)."""
    return _AttendBlocks.apply(qu, k, v, qv, p, key_bias, keep, keep_scale(drop_p), block, store)
