"""Training attention one (batch row, head) pair at a time on oneDNN's matmul: the CPU training path of
:class:`~ebranchformer.nn.attention.RelPosSelfAttention` and :class:`~ebranchformer.nn.attention.SelfAttention`
where oneDNN's float32 products beat MKL's (:func:`~.cpu_features.cpu_onednn_mm_faster`).

The values are those of :func:`~.blocked_attention.attend_blocks_train` (the same sums in another order): the
forward keeps only its inputs, the dropout keep-mask and its output, and the backward recomputes each pair's
(T, T) scores and softmax (FlashAttention's scheme), unless ``store`` keeps the probabilities. Per pair every
product is one 2-D oneDNN matmul (:func:`~.linear.mm`), the positional term in sub-blocks of ``pos_rows`` queries
that read only the table rows their distances reach, and only the keys up to the batch row's last valid one
(:func:`~.blocked_attention.key_rows`; the keys after it get zero gradients). With the bench batch's lengths
(T' = 399-499) one attention layer's forward + backward took 0.97x the time with all keys on 2 threads, 0.93x on
1 (Zen 5 VM, 12-20 alternating rounds); on the whole ls100 training step the difference was within the noise
(0.96-1.03x over three sets of 5-7 rounds). The blocked path's batched products run on MKL's
``bmm``, at about half oneDNN's rate on the project's AMD EPYC Zen 5 VM (BENCHMARKS.md, session 19). The attention
modules take this path from T' >= 448 on (``attention._PAIRS_MIN_T``): below that the per-pair overhead made it
slower than the blocks. On AMD Zen 4, where MKL's products are nearer oneDNN's, only from T' >= 768 on
(``attention._TRAIN_PAIRS_MIN_T_ZEN4``, :func:`~.cpu_features.cpu_avx512_double_pumped`). Measured on 2 threads
only; with many threads each pair's (T, T) products are split finer.

Notation as in :mod:`.blocked_attention`: ``qu`` (B, H, T, dk) the queries that meet the keys, ``qv`` those that
meet the table (already scaled by 1/sqrt(dk)), ``p`` (H, 2T-1, dk) the table with row m for distance T-1-m,
``key_bias`` (B, 1, 1, T) 0 on valid keys and -inf on padding, ``keep`` (B, H, T, T) bool or None.
"""

from __future__ import annotations

import math

import torch

from .blocked_attention import _by_key, add_pair_pos, dense_pair_operands, key_rows
from .dropout import keep_scale
from .linear import mm as _mm

__all__ = ["attend_pairs_train"]


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`~.linear.mm` without the custom op's overhead (this Python loop is never traced)."""
    return _mm(a, b, out=out, traced=False)


def _xwt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return mm(x, w.t())  # x w^T


def _probs(quc, kc, qvc, pc, kb, nk: int, b: int, h: int, pos_rows: int) -> torch.Tensor:
    """Softmax probabilities (T, n_k) of pair (b, h) over its keys [0, n_k) (the rest all masked:
    :func:`~.blocked_attention.key_rows`); ``kc`` pre-scaled by 1/sqrt(dk), ``kb`` (n_k,) or None."""
    t = quc.shape[2]
    s = mm(quc[b, h], kc[b, h, :nk].t())  # (T, n_k)
    if pc is not None:
        add_pair_pos(s, qvc, pc, b, h, 0, t, pos_rows, _xwt)
    if kb is not None:
        s += kb
    return torch.softmax(s, dim=-1)


def _factor(keep: torch.Tensor, b: int, h: int, nk: int, dtype: torch.dtype) -> torch.Tensor:
    """Pair (b, h)'s keep-mask of keys [0, n_k) as 0 / 1 in ``dtype`` (T, n_k), converted from its uint8 view (the
    bool conversion took 1.8x as long)."""
    return keep[b, h, :, :nk].view(torch.uint8).to(dtype)


def _pair_probs(probs: torch.Tensor, b: int, h: int, nk: int) -> torch.Tensor:
    """A dense (T, n_k) view of pair (b, h)'s storage in ``probs`` (B, H, T, T), for its stored probabilities."""
    t = probs.shape[2]
    return probs[b, h].view(-1)[: t * nk].view(t, nk)


class _AttendPairs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qu, k, v, qv, p, key_bias, keep, keep_scale_: float, pos_rows: int, store: bool):
        b_, h_, t, dk = qu.shape
        quc, kc, vc, qvc, pc = dense_pair_operands(qu, k, v, qv, p)  # kc pre-scaled by 1/sqrt(dk)
        keys = key_rows(key_bias)
        out = qu.new_empty(b_, t, h_, dk)  # (B, T, H, dk): heads merged by the view at the end
        probs = qu.new_empty(b_, h_, t, t) if store else None  # (B, H, T, T)
        for b in range(b_):
            kb, nk = keys[b]  # keys from nk on are all masked: left out
            for h in range(h_):
                att = _probs(quc, kc, qvc, pc, kb, nk, b, h, pos_rows)  # (T, n_k)
                if probs is not None:
                    _pair_probs(probs, b, h, nk).copy_(att)
                if keep is not None:
                    att = att.mul_(_factor(keep, b, h, nk, att.dtype).mul_(keep_scale_))  # dropped
                out[b, :, h] = mm(att, vc[b, h, :nk])  # (T, dk)
        ctx.save_for_backward(quc, kc, vc, qvc, pc, key_bias, keep, out, probs)
        ctx.keep_scale, ctx.pos_rows = keep_scale_, pos_rows
        return out.view(b_, t, h_ * dk)  # (B, T, D)

    @staticmethod
    def backward(ctx, go):
        quc, kc, vc, qvc, pc, key_bias, keep, out, probs = ctx.saved_tensors
        b_, h_, t, dk = quc.shape
        scale, pos_rows = 1.0 / math.sqrt(dk), ctx.pos_rows
        go = go.reshape(b_, t, h_, dk)  # (B, T, H, dk)
        dqu, dk_, dv = torch.empty_like(quc), torch.empty_like(kc), torch.empty_like(vc)  # (B, H, T, dk)
        dqv = None if qvc is None else torch.empty_like(qvc)
        dp = None if pc is None else torch.zeros_like(pc)  # (H, 2T-1, dk)
        keys = key_rows(key_bias)
        for b in range(b_):
            kb, nk = keys[b]
            if nk < t:  # the left-out keys get no gradient
                dk_[b, :, nk:], dv[b, :, nk:] = 0.0, 0.0
            for h in range(h_):
                if probs is None:
                    att = _probs(quc, kc, qvc, pc, kb, nk, b, h, pos_rows)  # (T, n_k)
                else:
                    att = _pair_probs(probs, b, h, nk)
                gob = go[b, :, h].contiguous()  # (T, dk)
                kf = None if keep is None else _factor(keep, b, h, nk, att.dtype).mul_(ctx.keep_scale)  # (T, n_k)
                # x^T y products as (y^T x)^T: oneDNN copies a transposed left operand, here the small one
                dv[b, h, :nk] = mm(gob.t(), att if kf is None else att * kf).t()  # (n_k, dk)
                ds = mm(gob, vc[b, h, :nk].t())  # d(dropped) (T, n_k)
                if kf is not None:
                    ds = ds.mul_(kf)  # d(att)
                # softmax backward with the row sums of d(att) * att taken as d(out) . out (FlashAttention's trick)
                rowdot = (gob * out[b, :, h]).sum(-1, keepdim=True)  # (T, 1)
                ds = ds.sub_(rowdot).mul_(att)  # d(scores) (T, T)
                mm(ds, kc[b, h, :nk], out=dqu[b, h])  # (T, dk); kc carries the 1/sqrt(dk)
                torch.mul(mm(quc[b, h].t(), ds).t(), scale, out=dk_[b, h, :nk])  # (n_k, dk)
                if pc is None:
                    continue
                for a in range(0, t, pos_rows):
                    e = min(a + pos_rows, t)
                    local = ds.new_zeros(e - a, nk + e - a - 1)  # (n, n_k+n-1), as in _probs
                    _by_key(local[None], 1, 1, e - a, nk)[0, 0].copy_(ds[a:e])
                    mm(local, pc[h, t - e : t - 1 - a + nk], out=dqv[b, h, a:e])  # (n, dk)
                    dp[h, t - e : t - 1 - a + nk] += mm(qvc[b, h, a:e].t(), local).t()  # (n_k+n-1, dk)
        return dqu, dk_, dv, dqv, dp, None, None, None, None, None


def attend_pairs_train(
    qu, k, v, qv, p, key_bias, keep: torch.Tensor | None, drop_p: float, store: bool = False, pos_rows: int = 256
):
    """The values of :func:`~.blocked_attention.attend_blocks_train` (dropout on the probabilities with ``keep``
    (B, H, T, T) bool, kept entries scaled by :func:`~.dropout.keep_scale` of ``drop_p``; None: none), one
    (batch row, head) pair at a time on oneDNN. Returns (B, T, H*dk); gradients reach qu, k, v, qv and p.
    ``store`` keeps the (B, H, T, T) softmax probabilities for backward instead of recomputing them."""
    return _AttendPairs.apply(qu, k, v, qv, p, key_bias, keep, keep_scale(drop_p), pos_rows, store)
