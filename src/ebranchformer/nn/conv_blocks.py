"""The conv2d frontends' CPU path: the conv stack run over blocks of output frames.

Every conv of ``Conv2dSubsampling`` is "valid", so output frames [a, a + r) of the last conv need exactly input
frames [a * S, (a + r - 1) * S + R) (stride product S, receptive field R), and no block sees another's output.
A block's wide first-conv output then stays in cache instead of a (B, C, T/2, F/2) tensor going through memory.

- Inference (:func:`conv_stack_blocks`): 1.6x faster than one pass on the LibriSpeech-100 frontend.
- Training (:func:`conv_stack_train`): the forward keeps only the input and the last ReLU's output; the backward
  recomputes each block's inner convs (the cheap ones: the first conv has one input channel) and runs the
  convolutions' backward block by block, in cache. On the LibriSpeech-100 frontend (8 x 2000 frames) its forward
  plus backward takes 0.64-0.68x the time of the one-pass autograd path, and the (B, C, T/2, F/2) activations are
  never stored.
- No conv work on padded tails: with masks (``padding="masked"``) a row whose last conv sees only padding in a
  block is not computed there, in inference and in training: its output frames are ReLU(bias) of the last conv
  (in training their gradient reaches that bias only).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from .autocast import conv2d, cpu_bf16_emulated
from .conv_phases import two_conv_param_grads
from .linear import linear

__all__ = ["block_spans", "conv_len", "conv_stack_blocks", "conv_stack_train"]

Convs = list[tuple[int, int]]  # (kernel, stride) per conv, square, no padding


def block_spans(convs: Convs, t_out: int, step: int) -> list[list[tuple[int, int]]]:
    """For each block of ``step`` last-conv output frames: the frame span [lo, hi) of every conv's input, then the
    block's output span."""
    blocks = []
    for a in range(0, t_out, step):
        lo, hi = a, min(a + step, t_out)
        spans = [(lo, hi)]
        for k, s in reversed(convs):
            lo, hi = lo * s, (hi - 1) * s + k
            spans.append((lo, hi))
        spans.reverse()  # spans[l]: frames of conv l's input; spans[-1]: output frames
        blocks.append(spans)
    return blocks


def _block(x0, convs, weights, valids, spans, last: bool = True, rows: torch.Tensor | None = None, taps=True):
    """One block's forward: the (masked) input of every conv, and the last conv's ReLU output (B, C, r, F')
    (None with ``last=False``, which skips the last conv); ``rows`` ((B,) bool) selects batch rows; ``taps``: a
    one-channel conv as a product over its taps (:func:`_conv_relu`; inference), else ``conv2d``."""
    lo, hi = spans[0]
    h = x0[:, :, lo:hi] if rows is None else x0[rows, :, lo:hi]  # (B, 1, frames, F)
    hs = []
    for li, ((_, s), (w, b)) in enumerate(zip(convs, weights)):
        if valids is not None:
            lo, hi = spans[li]
            v = valids[li] if rows is None else valids[li][rows]
            h = h * v[:, :, lo:hi].to(h.dtype)
        hs.append(h)
        if li == len(convs) - 1 and not last:
            return hs, None
        h = _conv_relu(h, w, b, s) if taps else F.relu(conv2d(h, w, b, s))  # (B, C, frames', F'), channels-last
    return hs, h


def _conv_relu(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, s: int) -> torch.Tensor:
    """ReLU(conv2d(h, w, b, stride s)), (B, C, T', F') channels-last. With one input channel (the first conv) it is
    one (B*T'*F', k*k) x (k*k, C) product over the taps (:func:`~.linear.linear`: on oneDNN with the bias and the
    ReLU inside): a block of the LibriSpeech-100 frontend (8 x 51 x 80 frames, 256 channels, 2 threads) 0.50 ms
    in float32 and 0.40 ms in bf16 against 3.3 and 1.8 ms for oneDNN's convolution plus ReLU on the project's
    Xeon VM; the float32 values are the same up to rounding. Inference only: in training the rounding, which differs
    from ``conv2d``'s (ESPnet's), can send a pre-activation within rounding of 0 the other way through the ReLU,
    which moved a small batch's first-conv weight gradient by 1.8e-3 of its largest entry from ESPnet's."""
    c, _, k, _ = w.shape
    if h.shape[1] != 1:
        return F.relu(conv2d(h, w, b, s))
    cols = _taps(h, k, s)  # (B, T', F', k, k)
    bt, t, f = cols.shape[:3]
    y = linear(cols.reshape(-1, k * k), w.view(c, k * k), b, F.relu)  # (B*T'*F', C)
    return y.view(bt, t, f, c).permute(0, 3, 1, 2)  # (B, C, T', F'), channels-last memory


def _taps(h: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """The k x k taps of every output position of a stride-s conv over a one-channel image h (B, 1, T, F): a view
    (B, T', F', k, k)."""
    return h[:, 0].unfold(1, k, s).unfold(2, k, s)


def _channels_last_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x[:, None].to(dtype).contiguous(memory_format=torch.channels_last)  # (B, 1, T, F)


def conv_stack_blocks(x, convs: Convs, weights, valids, step: int, project) -> torch.Tensor:
    """Inference: x (B, T, F) through the convs (``weights`` [(w, b)], ``valids`` per conv (B, 1, T_l, 1) or None),
    ``project`` applied to each block's flattened (B, r, F'*C) output (frequency-major, the channels-last memory
    as it is: no copy); returns (B, T', D)."""
    x0 = _channels_last_input(x, weights[0][0].dtype)
    blocks = block_spans(convs, _out_frames(x.shape[1], convs), step)
    lives, dead = _live_rows(valids, blocks), None
    if any(live is not None for live in lives):  # the projected dead frame (D,)
        dead = project(_dead_frame(weights, x0.shape[3], convs).reshape(1, -1)).view(-1)  # (F', C) -> (1, F'*C)
    finish = partial(_project, project=project)  # (B, C, r, F') -> (B, r, D)
    outs = [_block_out(x0, convs, weights, valids, sp, live, dead, finish, True) for sp, live in zip(blocks, lives)]
    return torch.cat(outs, dim=1)  # (B, T', D)


def _live_rows(valids, blocks) -> list[torch.Tensor | None]:
    """Per block, (B,) bool: the rows whose last conv sees a valid frame there, or None for all rows (and without
    masks). The other rows' last-conv input is all padding there (zeroed), so their output frames are ReLU(bias)."""
    if valids is None:
        return [None] * len(blocks)
    last_in = valids[-1][:, 0, :, 0].sum(1)  # (B,) valid frames of the last conv's input
    lives = [last_in > spans[-2][0] for spans in blocks]
    return [None if bool(live.all()) else live for live in lives]


def _dead_frame(weights, f_in: int, convs: Convs) -> torch.Tensor:
    """ReLU(bias) of the last conv at each of the F' frequencies, (F', C): an output frame whose last-conv input is
    all (zeroed) padding."""
    return F.relu(weights[-1][1]).expand(_out_frames(f_in, convs), -1)


def _block_out(x0, convs, weights, valids, spans, live, dead, finish, taps: bool) -> torch.Tensor:
    """``finish`` applied to the block's last ReLU output (B, C, r, F') -> (B, r, ...); with ``live`` ((B,) bool) only
    the live rows are computed and the others are ``dead`` (broadcast over (B, r)); ``taps`` as for :func:`_block`."""
    if live is None:
        return finish(_block(x0, convs, weights, valids, spans, taps=taps)[1])
    out = dead.expand(x0.shape[0], spans[-1][1] - spans[-1][0], *dead.shape).clone()  # (B, r, ...)
    if bool(live.any()):
        out[live] = finish(_block(x0, convs, weights, valids, spans, rows=live, taps=taps)[1]).to(out.dtype)
    return out


def _project(h: torch.Tensor, project) -> torch.Tensor:
    """(B, C, r, F') channels-last conv output -> (B, r, D): flattened frequency-major per frame (a view of the
    channels-last memory), then ``project``."""
    b, c, r, f = h.shape
    return project(h.permute(0, 2, 3, 1).reshape(b, r, f * c))  # (B, r, F'*C) -> (B, r, D)


def conv_len(n, k: int, s: int):
    """Output length of a "valid" conv with kernel k and stride s over n frames (an int or an int tensor)."""
    return (n - k) // s + 1


def _out_frames(t: int, convs: Convs) -> int:
    for k, s in convs:
        t = conv_len(t, k, s)
    return t


_conv_backward = torch.ops.aten.convolution_backward


def _relu_grad(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """g where y > 0, else 0: the gradient through a ReLU (output or input) y, in one pass (``threshold_backward``,
    autograd's own ReLU backward; ``g * (y > 0)`` took 4.3 ms against 1.0 ms for (8, 499, 1024) float32)."""
    return torch.ops.aten.threshold_backward(g, y, 0)


class _ConvStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x0, convs, valids, step, *params):  # params: w0, b0, w1, b1, ...
        weights = list(zip(params[0::2], params[1::2]))
        blocks = block_spans(convs, _out_frames(x0.shape[2], convs), step)
        lives, dead = _live_rows(valids, blocks), _dead_frame(weights, x0.shape[3], convs)  # dead (F', C)
        finish = partial(torch.permute, dims=(0, 2, 3, 1))  # (B, C, r, F') -> (B, r, F', C)
        ys = [_block_out(x0, convs, weights, valids, sp, live, dead, finish, False) for sp, live in zip(blocks, lives)]
        y = torch.cat(ys, dim=1)
        ctx.save_for_backward(x0, y, *params)  # y: (B, T', F', C)
        ctx.convs, ctx.valids, ctx.blocks, ctx.lives = convs, valids, blocks, lives
        return y

    @staticmethod
    def backward(ctx, gy):
        x0, y, *params = ctx.saved_tensors
        convs = ctx.convs
        weights = list(zip(params[0::2], params[1::2]))
        acc = torch.promote_types(params[0].dtype, torch.float32)  # bf16 parameters' sums in float32, float64 in float64
        grads = [torch.zeros(p.shape, dtype=acc, device=p.device) for p in params]  # summed over blocks
        phases = _phases_apply(convs, weights, y)  # the products over h's stride phases (.conv_phases)
        for spans, live in zip(ctx.blocks, ctx.lives):
            lo, hi = spans[-1]
            gyb, yb = gy[:, lo:hi], y[:, lo:hi]  # (B, r, F', C)
            if live is not None:  # the other rows' frames are ReLU(last bias): their gradient reaches that bias only
                grads[-1] += _relu_grad(gyb[~live], yb[~live]).sum((0, 1, 2), dtype=acc)
                if not bool(live.any()):
                    continue
                gyb, yb = gyb[live], yb[live]
            if phases:
                _add_(grads, _phase_grads(x0, convs, weights, ctx.valids, spans, live, _relu_grad(gyb, yb)))
                continue
            hs = _block(x0, convs, weights, ctx.valids, spans, last=False, rows=live, taps=False)[0]  # the inner convs
            g = _relu_grad(gyb, yb).permute(0, 3, 1, 2)  # (b, C, r, F'), through the last ReLU
            g = g.contiguous(memory_format=torch.channels_last)
            for li in reversed(range(len(convs))):
                s, w = convs[li][1], weights[li][0]
                if li == 0 and w.shape[1] == 1:  # one input channel: no input gradient, and one product
                    gw, gb = _one_channel_param_grads(g, hs[0], w.shape[-1], s)
                else:
                    gin, gw, gb = _conv_grads(g, hs[li], w, s, li > 0)
                grads[2 * li] += gw
                grads[2 * li + 1] += gb
                if li > 0:  # through the mask and the ReLU that made this conv's input (both zero where hs is)
                    g = _relu_grad(gin, hs[li])
        return (None, None, None, None, *(g.to(p.dtype) for g, p in zip(grads, params)))


def _phases_apply(convs: Convs, weights, y: torch.Tensor) -> bool:
    """Whether a block's backward runs as :func:`~.conv_phases.two_conv_param_grads`: two convs, the first with one
    input channel, in float32 (bf16 autocast training keeps oneDNN's backward)."""
    return len(convs) == 2 and weights[0][0].shape[1] == 1 and y.dtype == torch.float32


def _phase_grads(x0, convs: Convs, weights, valids, spans, rows, g) -> list[torch.Tensor]:
    """[gw0, gb0, gw1, gb1] of one block by :func:`~.conv_phases.two_conv_param_grads`; g (b, r, F', C) the block's
    output gradient through the last ReLU, ``rows`` the live rows (None: all)."""
    (lo0, hi0), (lo1, hi1) = spans[0], spans[1]
    x = x0[:, :, lo0:hi0] if rows is None else x0[rows, :, lo0:hi0]  # (b, 1, frames, F)
    valid1 = None
    if valids is not None:
        v0, v1 = (v if rows is None else v[rows] for v in valids[:2])
        x = x * v0[:, :, lo0:hi0].to(x.dtype)
        valid1 = v1[:, 0, lo1:hi1, 0]  # (b, T1)
    (w0, b0), (w1, _) = weights
    return list(two_conv_param_grads(x, g, w0, b0, w1, convs[0][1], convs[1][1], valid1))


def _add_(totals: list[torch.Tensor], parts: list[torch.Tensor]) -> None:
    for total, part in zip(totals, parts):
        total += part


def _conv_grads(g, h, w, s: int, wants_input: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Input (if ``wants_input``), weight and bias gradients of the "valid" stride-s conv of h with w, given its output
    gradient g. In bf16 on a CPU without oneDNN's bf16 kernels (:func:`~.autocast.cpu_bf16_emulated`) they are the
    float32 gradients of the same bf16 values, the input gradient rounded to bf16 as the native kernel's is."""
    emulated = cpu_bf16_emulated(g)
    if emulated:
        g, h, w = g.float(), h.float(), w.float()
    gin, gw, gb = _conv_backward(g, h, w, [w.shape[0]], [s, s], [0, 0], [1, 1], False, [0, 0], 1,
                                 [wants_input, True, True])  # fmt: skip
    return (gin.to(torch.bfloat16) if emulated and gin is not None else gin), gw, gb


def _one_channel_param_grads(g: torch.Tensor, x: torch.Tensor, k: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (C, 1, k, k) and bias (C,) gradients of a stride-s conv over a one-channel image x (B, 1, T, F), given
    its output gradient g (B, C, T', F') channels-last: one (k*k, N) x (N, C) product over the taps, N = B*T'*F' (a
    LibriSpeech-100 training block, 2 threads: 0.6 ms with the bias sum, against 3.0-5.5 ms for oneDNN's
    convolution backward)."""
    c = g.shape[1]
    gf = g.permute(0, 2, 3, 1).reshape(-1, c)  # (N, C), a view of the channels-last memory
    gw = _taps(x, k, s).reshape(-1, k * k).to(gf.dtype).t().mm(gf)  # (k*k, C)
    return gw.t().reshape(c, 1, k, k), gf.sum(0)


def conv_stack_train(x, convs: Convs, weights, valids, step: int) -> torch.Tensor:
    """Training: the same conv stack with a block-wise backward. Returns (B, T', F', C) (channels last); its
    gradients reach the conv weights and biases, not ``x``."""
    params = [t for wb in weights for t in wb]
    return _ConvStack.apply(_channels_last_input(x, params[0].dtype), convs, valids, step, *params)
