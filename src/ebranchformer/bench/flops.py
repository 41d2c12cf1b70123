"""Analytical FLOP count of an E-Branchformer encoder forward, and the device's measured matmul peak.

FLOPs are *model* FLOPs: 2 per multiply-accumulate of every matmul and convolution (biases, LayerNorm, softmax,
activations, masking and the rel-shift are not counted; they are O(B T D) and memory-bound). They are counted on
the padded batch, as every implementation computes on it. With B the batch, T the frames entering the layers
(after subsampling, padded), D the model dim, H heads, F the FFN size, C the cgMLP gate size (ESPnet
``cgmlp_linear_units / 2``), K and M the cgMLP and merge conv kernels, per layer::

    FFN            n_ffn * 4 B T D F               (n_ffn = 2 with macaron, D->F->D each)
    attn_proj      8 B T D^2                        (qkv 3 D^2, out D^2)
    pos_proj       2 (2T-1) D^2                     (linear_pos on the 2T-1 table, once per batch)
    attn_scores    4 B T^2 D                        (Q K^T and A V, summed over heads)
    attn_pos       2 B T (2T-1) D                   (the (q + v) P^T "bd" term before the rel-shift)
    cgmlp          6 B T D C + 2 B T C K            (D->2C, depthwise conv K, C->D)
    merge          4 B T D M + 4 B T D^2            (depthwise conv over 2D channels, 2D->D)

Frontends: ESPnet ``conv2d*`` = 2 B C_out C_in k^2 T_i F_i per conv (valid, stride 2 or 3) plus the
flattening Linear 2 B T' (D F') D; RETURNN ``ConformerConvSubsample`` likewise per conv ("same" padding,
pools not counted) plus its bias-free input projection. A training step (forward+backward) counts 3x the forward
(the backward computes gradients w.r.t. both inputs and weights of every matmul).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "TRAIN_FLOP_FACTOR",
    "encoder_flops",
    "espnet_conf_flops",
    "flop_shares",
    "matmul_peak",
    "quadratic_crossover_frames",
]

TRAIN_FLOP_FACTOR = 3  # forward + backward = 3 x forward

# ESPnet Conv2dSubsampling kinds: (kernel, stride) per conv, all "valid", square kernels.
_ESPNET_CONVS = {
    "conv2d": [(3, 2), (3, 2)],
    "conv2d2": [(3, 2), (3, 1)],
    "conv2d6": [(3, 2), (5, 3)],
    "conv2d8": [(3, 2), (3, 2), (3, 2)],
}


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _espnet_frontend(kind: str, b: int, t: int, f: int, d: int) -> tuple[int, int]:
    """(FLOPs, output frames) of ESPnet's Conv2dSubsampling ``kind`` on (B, T, F)."""
    flops, c_in = 0, 1
    for k, s in _ESPNET_CONVS[kind]:
        t, f = (t - k) // s + 1, (f - k) // s + 1
        flops += 2 * b * d * c_in * k * k * t * f
        c_in = d
    flops += 2 * b * t * (d * f) * d
    return flops, t


def _returnn_frontend(opts: Mapping[str, Any], b: int, t: int, f: int, d: int) -> tuple[int, int]:
    """(FLOPs, output frames) of RETURNN's ConformerConvSubsample (+ input projection) on (B, T, F)."""
    out_dims = list(opts["out_dims"])
    filters = [_pair(k) for k in opts["filter_sizes"]]
    strides = [_pair(s) for s in (opts.get("strides") or [1] * len(out_dims))]
    pools = [_pair(p) for p in (opts.get("pool_sizes") or [])]
    same = opts.get("padding", "same") == "same"
    flops, c_in = 0, 1
    for i, (c_out, (kt, kf), (st, sf)) in enumerate(zip(out_dims, filters, strides)):
        if same:
            t, f = -(-t // st), -(-f // sf)
        else:
            t, f = (t - kt) // st + 1, (f - kf) // sf + 1
        flops += 2 * b * c_out * c_in * kt * kf * t * f
        c_in = c_out
        if i < len(pools):
            pt, pf = pools[i]
            t, f = (-(-t // pt), -(-f // pf)) if same else (t // pt, f // pf)
    feat = f * c_in
    if feat != d:
        flops += 2 * b * t * feat * d
    return flops, t


def encoder_flops(
    *,
    batch: int,
    frames: int,
    in_dim: int,
    d: int,
    heads: int,
    layers: int,
    ff_dim: int,
    cgmlp_ff_dim: int,
    cgmlp_kernel: int,
    merge_kernel: int,
    frontend: str | Mapping[str, Any] | None = "conv2d",
    macaron: bool = True,
    use_ffn: bool = True,
) -> dict[str, int]:
    """Forward FLOPs of an E-Branchformer encoder, by component (see the module docstring for the formulas).

    Args:
        batch, frames: B and the padded input length T (frames entering the frontend).
        in_dim: feature dim of the input (used by the frontend; = d without one).
        d, heads, layers, ff_dim, cgmlp_ff_dim, cgmlp_kernel, merge_kernel: D, H, L, F, C, K, M.
        frontend: an ESPnet kind (``"conv2d"``, ``"conv2d2"``, ``"conv2d6"``, ``"conv2d8"``), the options of
            RETURNN's ``ConformerConvSubsample`` (a mapping with ``out_dims``, ``filter_sizes``, ...), or None.
        macaron, use_ffn: which FFNs exist.

    Returns: ``{"frontend", "ffn", "attn_proj", "pos_proj", "attn_scores", "attn_pos", "cgmlp", "merge",
    "total", "frames_out"}``; all FLOPs except ``frames_out`` (T after subsampling).
    """
    b, t = int(batch), int(frames)
    if frontend is None:
        fe, tl = 0, t
    elif isinstance(frontend, str):
        fe, tl = _espnet_frontend(frontend, b, t, in_dim, d)
    else:
        fe, tl = _returnn_frontend(frontend, b, t, in_dim, d)
    n_ffn = (2 if macaron else 1) if use_ffn else 0
    c, k, m = cgmlp_ff_dim, cgmlp_kernel, merge_kernel
    per_layer = {
        "ffn": n_ffn * 4 * b * tl * d * ff_dim,
        "attn_proj": 8 * b * tl * d * d,
        "pos_proj": 2 * (2 * tl - 1) * d * d,
        "attn_scores": 4 * b * tl * tl * d,
        "attn_pos": 2 * b * tl * (2 * tl - 1) * d,
        "cgmlp": 6 * b * tl * d * c + 2 * b * tl * c * k,
        "merge": 4 * b * tl * d * m + 4 * b * tl * d * d,
    }
    out = {"frontend": fe, **{name: layers * v for name, v in per_layer.items()}}
    out["total"] = sum(out.values())
    out["frames_out"] = tl
    return out


def espnet_conf_flops(encoder_conf: Mapping[str, Any], input_size: int, batch: int, frames: int,
                      frontend: str | Mapping[str, Any] | None | bool = True) -> dict[str, int]:  # fmt: skip
    """:func:`encoder_flops` for an ESPnet ``encoder_conf`` (the keys the benchmark presets set).

    ``frontend=True`` uses the conf's ``input_layer``; None (layers only, ``frames`` = frames entering the layers)
    or RETURNN ``ConformerConvSubsample`` options replace it.
    """
    c = encoder_conf
    fe = c.get("input_layer", "conv2d") if frontend is True else frontend
    return encoder_flops(
        batch=batch, frames=frames, in_dim=input_size if fe is not None else int(c["output_size"]),
        d=int(c["output_size"]), heads=int(c["attention_heads"]), layers=int(c["num_blocks"]),
        ff_dim=int(c["linear_units"]), cgmlp_ff_dim=int(c["cgmlp_linear_units"]) // 2,
        cgmlp_kernel=int(c["cgmlp_conv_kernel"]), merge_kernel=int(c["merge_conv_kernel"]), frontend=fe,
        macaron=bool(c.get("macaron_ffn", False)), use_ffn=bool(c.get("use_ffn", False)),
    )  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: str | torch.device, dtype: torch.dtype, *, n: int | None = None, repeats: int = 5,
                min_seconds: float = 0.2) -> dict[str, Any]:  # fmt: skip
    """Measured matmul throughput: median GFLOP/s of ``(n x n) @ (n x n)`` in ``dtype`` on ``device`` (with the
    current ``torch.get_num_threads()`` on CPU). Each timed sample loops until ``min_seconds`` passed.

    The CPU kernels: ``torch.mm`` (MKL in float32) and the oneDNN product our Linear layers use
    (:mod:`ebranchformer.nn.linear`): in float32 directly, in bf16 as they run under bf16 autocast inference (float32
    inputs, bf16 output; on CPUs without oneDNN bf16 kernels the float32 product of the bf16-rounded operands). The
    peak is the faster kernel's median. There ``torch.mm`` in bf16 is torch's reference kernel (about 1 GFLOP/s on
    the project's AVX2 VM, a minute per 2048^3 product), so it is timed on an n/4 product.

    Default n: 2048 on CPU, 8192 on CUDA. Returns ``{"gflops", "n", "dtype", "samples", "kernels"}``, where
    ``kernels`` maps each kernel to its median and ``samples`` are the faster kernel's.
    """
    from ..nn.cpu_features import cpu_onednn_bf16
    from ..nn.linear import _onednn_dtype, linear, onednn_linear

    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator(device="cpu").manual_seed(0)
    a32, b32 = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a, bm = a32.to(device=device, dtype=dtype), b32.to(device=device, dtype=dtype)
    nm = n // 4 if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_onednn_bf16() else n
    am, bmm = a[:nm, :nm].contiguous(), bm[:nm, :nm].contiguous()
    kernels = {"mm": (lambda: torch.mm(am, bmm), nm)}
    if _onednn_dtype(a, bm, grads=False) is not None:
        bt = bm.t().contiguous()  # (N, K): a @ bt.T = a @ bm
        kernels["onednn"] = (lambda: onednn_linear(a, bt, None, "none"), n)
    if device.type == "cpu" and dtype == torch.bfloat16:
        bt32 = b32.t().contiguous()  # (N, K)

        def autocast_linear() -> torch.Tensor:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                return linear(a32, bt32)

        with torch.autocast("cpu", dtype=torch.bfloat16):
            if _onednn_dtype(a32, bt32, grads=False) == torch.bfloat16:
                kernels["linear"] = (autocast_linear, n)
    runs = {name: _throughput(fn, 2 * k**3, device, repeats, min_seconds) for name, (fn, k) in kernels.items()}
    best = max(runs, key=lambda k: statistics.median(runs[k]))
    return {"gflops": statistics.median(runs[best]), "n": n, "dtype": str(dtype).replace("torch.", ""),
            "samples": runs[best], "kernels": {k: statistics.median(v) for k, v in runs.items()}}  # fmt: skip


def _throughput(fn, flop: int, device: torch.device, repeats: int, min_seconds: float) -> list[float]:
    """GFLOP/s samples of ``fn`` (``flop`` per call), each over as many calls as take ``min_seconds``."""
    fn()  # warm-up (library init, kernel selection)
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    one = max(time.perf_counter() - t0, 1e-9)
    iters = max(1, math.ceil(min_seconds / one))
    samples = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        samples.append(flop * iters / (time.perf_counter() - t0) / 1e9)
    return samples


def flop_shares(flops: Mapping[str, int]) -> dict[str, float]:
    """Each component's fraction of the total (frames_out excluded)."""
    total = flops["total"]
    return {k: v / total for k, v in flops.items() if k not in ("total", "frames_out")}


def quadratic_crossover_frames(encoder_conf: Mapping[str, Any], input_size: int) -> int:
    """Input frames T (batch 1) where the T^2 attention FLOPs (``attn_scores`` + ``attn_pos``) reach half of the
    forward's FLOPs (frontend included), i.e. equal everything else; found by bisection."""

    def share(t: int) -> float:
        f = espnet_conf_flops(encoder_conf, input_size, 1, t)
        return (f["attn_scores"] + f["attn_pos"]) / f["total"]

    lo, hi = 16, 16
    while share(hi) < 0.5:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if share(mid) < 0.5 else (lo, mid)
    return hi
