"""``nn.Linear`` with a oneDNN path for float32 (and bf16 inference under autocast) on the CPU.

On the CPU, ``F.linear`` runs float32 GEMMs through MKL's ``sgemm`` and adds the bias in a separate pass over the
output (``addmm``). oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the kernel torch.compile's CPU backend
uses) adds the bias, and optionally applies the activation, inside the GEMM. On the project's 2-core AVX-512 VM
(AMD EPYC, 2 threads, the LibriSpeech-100 encoder's five Linear shapes with 3992 rows, interleaved medians of 21) it
took 0.84-0.91x the time of ``F.linear`` forward (bias included) and 0.72-0.87x that of ``mm`` for the input
gradient; for the weight gradient ``mm`` was faster on 3 of the 5 shapes and within 2% on the others. On the AMD
EPYC Zen 5 VM MKL runs at less than half oneDNN's rate (square n = 2048 products, 2 threads: ``mm`` 207, oneDNN 463
GFLOP/s), so on AVX-512 CPUs not made by Intel both gradients run on oneDNN as well (:func:`mm`,
:func:`~.cpu_features.cpu_onednn_mm_faster`; the ls100 training step 0.852x, 5 rounds with ESPnet's step between).
On x86 CPUs without AVX-512 (the project's AMD EPYC Zen 3 VM) MKL was the faster for the same shapes, so float32
takes ``F.linear`` there (:func:`~.cpu_features.cpu_onednn_fp32_faster`): ls100 forward 0.855x the oneDNN path's
time (ratio of medians over 7 rounds alternating in one process, ESPnet's step between).

Under CPU bf16 autocast ``F.linear`` already runs on oneDNN, but as a product plus separate activation passes over a
bf16 output; in inference the oneDNN path applies SiLU/GELU inside the GEMM there too (the FFN's first Linear plus
SiLU: 0.78x the autocast time). Where oneDNN has no bf16 kernels (AVX2-only CPUs, e.g. the project's AMD Zen 3 VM:
:func:`~ebranchformer.nn.cpu_features.cpu_onednn_bf16`) it cannot build a bf16 product at all and torch's own bf16
``mm`` runs below 2 GFLOP/s; there the same arithmetic (bf16-rounded operands, float32 accumulation, the activation
on the accumulator, one rounding to bf16) runs as a float32 oneDNN product of the rounded operands.

The plain path (``F.linear``) is kept next to it: it runs on other devices, for other dtypes, for autocast training,
with ``onednn=False``, and when oneDNN is not built in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula
from torch.utils.weak import WeakIdKeyDictionary

from .autocast import cpu_autocast_dtype
from .cpu_features import cpu_onednn_bf16, cpu_onednn_fp32_faster, cpu_onednn_mm_faster

__all__ = [
    "Linear", "addmm_", "linear", "mm", "mm_left_t", "mm_tn", "onednn_float32", "onednn_linear", "onednn_xwt_eager",
]

try:
    _OP = torch.ops.mkldnn._linear_pointwise  # (X (N, K), W (M, K), B (M,) | None, attr, scalars, algorithm)
except (AttributeError, RuntimeError):  # a torch built without oneDNN
    _OP = None

# Activations oneDNN applies inside the GEMM: name -> (attr, scalars, algorithm); equal to torch's within fp32
# rounding (tests/nn/test_linear.py).
_ATTRS: dict[str, tuple[str, list, str]] = {
    "none": ("none", [], ""),
    "swish": ("swish", [], ""),
    "gelu": ("gelu", [], "none"),  # exact erf GELU
    "relu": ("relu", [], ""),
}
_FUSED: dict[Callable, str] = {F.silu: "swish", F.gelu: "gelu", F.relu: "relu"}


def _onednn_built() -> bool:
    return _OP is not None and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def _onednn_dtype(x: torch.Tensor, weight: torch.Tensor, grads: bool) -> torch.dtype | None:
    """The dtype the oneDNN path computes in, or None for ``F.linear``: float32 for float32 CPU tensors outside
    autocast; bf16 under CPU bf16 autocast without gradients (inference; training keeps autocast's ``F.linear``)."""
    if x.device.type != "cpu" or not _onednn_built():
        return None
    autocast = cpu_autocast_dtype()
    if autocast is None:
        return torch.float32 if x.dtype == weight.dtype == torch.float32 else None
    ok = autocast == torch.bfloat16 and not grads
    return torch.bfloat16 if ok and {x.dtype, weight.dtype} <= {torch.float32, torch.bfloat16} else None


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    onednn: bool = True,
) -> torch.Tensor:
    """``activation(x @ weight.T + bias)`` for x (..., K), weight (M, K), bias (M,) -> (..., M).

    With ``onednn`` (Default: ``True``) and a float32 CPU input outside autocast, on a CPU where oneDNN's float32
    products are the faster (:func:`~.cpu_features.cpu_onednn_fp32_faster`: not x86 without AVX-512), the product
    runs on oneDNN with the bias inside the GEMM; without gradients a SiLU/GELU/ReLU ``activation`` is applied there
    too. The same holds in bf16 for inference under CPU bf16 autocast (inputs cast to bf16 as autocast casts them,
    bf16 output; the fused activation then acts on the float32 accumulator, before the rounding to bf16). Otherwise
    (and for any other activation) it is ``activation(F.linear(x, weight, bias))``.
    """
    grads = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    dtype = _onednn_dtype(x, weight, grads) if onednn else None
    if dtype == torch.float32 and not cpu_onednn_fp32_faster():  # AVX2-only x86: MKL's products are the faster
        dtype = None
    if dtype is None:
        y = F.linear(x, weight, bias)
        return y if activation is None else activation(y)
    # bf16 without oneDNN bf16 kernels: float32 products of the bf16-rounded operands, rounded to bf16 at the end
    compute = torch.float32 if dtype == torch.bfloat16 and not cpu_onednn_bf16() else dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(dtype).to(compute).contiguous()  # (N, K)
    # oneDNN takes seconds on a column slice (merge's halves): copy the (M, K) weight
    weight = _cast(weight, dtype, compute, keep=not grads)
    bias = None if bias is None else _cast(bias, dtype, compute, keep=not grads)
    if not grads and activation in _FUSED:
        return onednn_linear(x2, weight, bias, _FUSED[activation]).view(*lead, -1).to(dtype)  # (..., M)
    y = onednn_linear(x2, weight, bias, "none").view(*lead, -1).to(dtype)  # (..., M)
    return y if activation is None else activation(y)


# Inference casts of parameters (bf16 under autocast), kept while the parameter's values stay the same: without
# them every bf16 forward casts every weight again (the LibriSpeech-100 encoder: 25 M values per row group).
_CASTS = WeakIdKeyDictionary()  # parameter -> ((version counter, storage, dtype, compute dtype), contiguous cast)


def _cast(t: torch.Tensor, dtype: torch.dtype, compute: torch.dtype, keep: bool) -> torch.Tensor:
    """``t`` rounded to ``dtype``, as a contiguous ``compute`` tensor. With ``keep`` (no gradients) the cast of an
    ``nn.Parameter`` of another dtype is kept and reused until the parameter changes (an optimizer step or
    ``load_state_dict`` bumps its version); other tensors are cast each call."""
    if not keep or not isinstance(t, nn.Parameter) or t.dtype == dtype == compute or t.is_inference():
        return t.to(dtype).to(compute).contiguous()  # (an inference-mode parameter has no version counter)
    key = (t._version, t.data_ptr(), dtype, compute)
    hit = _CASTS.get(t)
    if hit is not None and hit[0] == key:
        return hit[1]
    cast = t.detach().to(dtype).to(compute).contiguous()
    _CASTS[t] = (key, cast)
    return cast


def onednn_float32(*tensors: torch.Tensor) -> bool:
    """Whether :func:`onednn_linear` can serve these tensors in float32 (whether :func:`linear` also picks it depends
    on :func:`~.cpu_features.cpu_onednn_fp32_faster` as well): all float32 on the CPU, oneDNN built in and enabled,
    and no CPU autocast active."""
    return all(_onednn_dtype(x, x, grads=False) == torch.float32 for x in tensors)


# A custom op, so that torch.compile and torch.export see one opaque node with a shape rule (inductor cannot lower
# the private oneDNN op with dynamic shapes) and autograd has a backward for it.
@torch.library.custom_op(
    "ebranchformer::onednn_linear", mutates_args=(), schema="(Tensor x2, Tensor weight, Tensor? bias, str act) -> Tensor"
)
def onednn_linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    """``act(x2 @ weight.T + bias)`` on oneDNN: x2 (N, K), weight (M, K) (or a transposed (K, M) contiguous
    tensor), bias (M,) or None, ``act`` one of "none", "swish", "gelu", "relu" (gradients only for "none")."""
    attr, scalars, algorithm = _ATTRS[act]
    return _OP(x2, weight, bias, attr, scalars, algorithm)  # (N, M)


@onednn_linear.register_fake
def _(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    return x2.new_empty((x2.shape[0], weight.shape[0]))


def onednn_xwt_eager(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x2 @ weight.T`` on oneDNN like :func:`onednn_linear` (no bias, no activation), calling oneDNN's op
    directly: no autograd and no custom-op dispatch (about 13 us less per call), for the per-pair Python loops that
    torch.compile and torch.export never trace. x2 (N, K), weight (M, K), both dense -> (N, M)."""
    return _OP(x2, weight, None, "none", [], "")  # (N, M)


def _setup_context(ctx, inputs, output) -> None:
    x2, weight, bias, act = inputs
    ctx.save_for_backward(x2, weight)
    ctx.has_bias, ctx.act = bias is not None, act


def _backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Both gradients through :func:`mm`: oneDNN where MKL runs its AVX2 kernels (AMD with AVX-512), else
    ``torch.mm``. On the Intel Xeon VM (2 threads) ``mm`` ran the input-gradient products of the LibriSpeech-100
    shapes at 302-321 GFLOP/s against oneDNN's 261-289, and the training step took 0.988x the time with oneDNN's
    (median of 5 alternating rounds in one process, every round faster), 0.993x in a second set of 5 (3 faster)."""
    if ctx.act != "none":
        raise RuntimeError("onednn_linear has gradients only without a fused activation (act='none')")
    x2, weight = ctx.saved_tensors
    g = g.contiguous()  # (N, M)
    gx = mm(g, weight) if ctx.needs_input_grad[0] else None  # (N, K)
    gw = mm_tn(g, x2) if ctx.needs_input_grad[1] else None  # (M, K)
    gb = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None  # (M,)
    return gx, gw, gb, None


onednn_linear.register_autograd(_backward, setup_context=_setup_context)


def _dense_or_transposed(t: torch.Tensor) -> torch.Tensor:
    """``t`` (2-D) itself if it or its transpose is dense, else a dense copy (oneDNN takes seconds on other
    strides, e.g. a column slice)."""
    return t if t.is_contiguous() or t.t().is_contiguous() else t.contiguous()


def _mm_on_onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (cpu_onednn_mm_faster() and a.dtype == b.dtype == torch.float32 and a.is_cpu and b.is_cpu
            and _onednn_built() and cpu_autocast_dtype() is None)  # fmt: skip


def mm(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None, traced: bool = True) -> torch.Tensor:
    """``a @ b`` for a (N, K), b (K, M) -> (N, M), into ``out`` if given. Float32 CPU matrices run on oneDNN's
    matmul where it beats MKL's ``mm`` (:func:`~.cpu_features.cpu_onednn_mm_faster`: x86 CPUs with AVX-512 not
    made by Intel), as ``onednn_linear(a, b^T)``; anything else is ``torch.mm``. The same sums in another order
    (float32 rounding). No autograd of its own: it serves backward passes and other products outside autograd.

    oneDNN copies an ``a`` that is a transposed view (not ``b``): pass the larger operand as a dense ``a`` (for
    ``x^T y`` with a large y, ``mm(y^T, x).t()``). ``traced=False`` calls oneDNN's op directly instead of through
    the custom op (about 13 us less per call; for Python loops that torch.compile never traces)."""
    if not _mm_on_onednn(a, b):
        return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
    a, w = _dense_or_transposed(a), _dense_or_transposed(b).t()  # (N, K), (M, K)
    y = onednn_linear(a, w, None, "none") if traced else onednn_xwt_eager(a, w)  # (N, M)
    return y if out is None else out.copy_(y)


def mm_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^T @ b`` for a (N, M), b (N, K) -> (M, K): a weight gradient, summed over N rows. On oneDNN (:func:`mm`) the
    transposed left operand is copied, so the narrower of the two goes there and for M > K the result is the
    transposed view of ``b^T a`` (the FFN's first Linear, M = 1024, K = 256: a copy of 3992 x 256 values instead of
    3992 x 1024). Elsewhere ``torch.mm(a.t(), b)``."""
    if not _mm_on_onednn(a, b):
        return torch.mm(a.t(), b)
    return mm(a.t(), b) if a.shape[1] <= b.shape[1] else mm(b.t(), a).t()  # (M, K)


def mm_left_t(a: torch.Tensor) -> torch.Tensor:
    """``a.t()`` laid out for use as :func:`mm`'s left operand several times: a dense copy where :func:`mm` runs on
    oneDNN (which would copy the transposed view on every call), the view itself elsewhere."""
    return a.t().contiguous() if _mm_on_onednn(a, a) else a.t()


def addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` in place (acc (N, M), a (N, K), b (K, M)); returns ``acc``. Where :func:`mm` runs on
    oneDNN, its product plus one ``add_`` (on the Zen 5 VM a (1920, 256) x (256, 256) product into a row slice:
    0.52 ms against 1.12 for ``addmm_``); otherwise ``Tensor.addmm_``."""
    if not _mm_on_onednn(a, b):
        return acc.addmm_(a, b)
    return acc.add_(mm(a, b))


@register_flop_formula(torch.ops.ebranchformer.onednn_linear)
def _flops(x2_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode's count, as for ``mm``: 2 per multiply-accumulate."""
    return 2 * x2_shape[0] * x2_shape[1] * weight_shape[0]


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state-dict keys and init) whose float32 CPU forward runs on oneDNN
    (:func:`linear`). ``onednn = False`` (or ``ConformerEncoder.set_cpu_blocks(False)``) selects ``F.linear``.

    Input (..., in_features) -> output (..., out_features).

    Example:
        >>> lin = Linear(256, 1024)
        >>> x = torch.randn(2, 10, 256)
        >>> torch.allclose(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-5)
        True
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs) -> None:
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.onednn = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, onednn=self.onednn)

    def act(self, x: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``activation(self(x))``, fused into the GEMM where :func:`linear` can."""
        return linear(x, self.weight, self.bias, activation, onednn=self.onednn)
