"""What the CPU is, where it decides which of two equal computations is faster (AMX tiles for bf16 kernels, the
vendor for MKL-backed kernels) or which of them can run at all (oneDNN's bf16 kernels). Each answer is looked up
once per process."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

__all__ = [
    "cpu_amx_bf16", "cpu_avx512_double_pumped", "cpu_family", "cpu_onednn_bf16", "cpu_onednn_fp32_faster",
    "cpu_onednn_mm_faster", "cpu_vendor",
]


@functools.cache
def cpu_amx_bf16() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon 4th generation and later), on which oneDNN runs bf16 matrix
    products at many times the float32 rate (13x on the project's 2-core Xeon VM: 2.3-2.5 TFLOP/s against 190-330
    GFLOP/s for a 2048^3 product on 2 threads). Without AMX (AVX-512 bf16 dot products only, e.g. AMD EPYC) bf16
    products gain about 2x, and some bf16 kernels are slower than their float32 ones."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a torch without the query
        return False


@functools.cache
def cpu_onednn_bf16() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (it needs AVX-512 BW/VL/DQ, AVX-NE-CONVERT or AMX). Without them
    (AVX2-only CPUs such as the project's AMD Zen 3 VM) a bf16 oneDNN inner product cannot be created at all, and
    bf16 products run on torch's reference kernel, below 2 GFLOP/s on 2 threads against about 100 in float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the query or without oneDNN
        return False


@functools.cache
def cpu_onednn_fp32_faster() -> bool:
    """Whether oneDNN's float32 matrix products (bias and activation inside the GEMM) are the faster choice for the
    Linear layers here: everywhere except on x86 CPUs without AVX-512. With AVX-512 they were (the AMD EPYC Zen 4 VM:
    0.84-0.91x ``F.linear``'s time; the Intel Xeon VM: the training step 1.031x slower on MKL's ``addmm``). On an
    AVX2-only CPU (the project's AMD EPYC Zen 3 VM, 2 threads, 3992-row products of the LibriSpeech-100 shapes) MKL's
    ``addmm`` took 0.85-0.96x oneDNN's time, and ``addmm`` plus SiLU 0.72-0.77x oneDNN's fused SiLU."""
    isa = _x86_capability()
    return isa is None or isa not in ("AVX2", "DEFAULT", "NO AVX")


@functools.cache
def cpu_onednn_mm_faster() -> bool:
    """Whether oneDNN's float32 matrix products also beat MKL's ``mm`` for plain products (gradients, the conv
    frontend's phase products): on x86 CPUs with AVX-512 that are not Intel's. MKL runs its AVX2 kernels there; on
    the project's AMD EPYC Zen 5 VM (2 threads, 3992-row products of the LibriSpeech-100 Linear shapes) ``mm`` ran at
    198-224 GFLOP/s, oneDNN at 440-496 for the input gradients and 256-393 for the weight gradients. On Intel CPUs
    MKL runs at full speed and ``mm`` stays (the Xeon VM: the input gradients at 302-321 GFLOP/s on ``mm``, 261-289
    on oneDNN); on AVX2-only CPUs (the Zen 3 VM) MKL was the faster."""
    return _x86_capability() == "AVX512" and cpu_vendor() != "GenuineIntel"


@functools.cache
def cpu_avx512_double_pumped() -> bool:
    """Whether this CPU runs AVX-512 as two 256-bit halves: AMD family 25 with AVX-512 (Zen 4; Zen 3, the same
    family, has no AVX-512). MKL's AVX2 kernels then lose less to oneDNN's AVX-512 ones than on Zen 5 (family 26,
    full-width): square n = 2048 float32 products on 2 threads, ``mm`` 142-184 against oneDNN's 214 GFLOP/s on the
    project's Zen 4 VM, 207 against 463 on its Zen 5 VM. So on Zen 4 the per-pair training attention (oneDNN, one
    (row, head) pair at a time) pays for its per-pair overhead only at longer T' (``attention``)."""
    return _x86_capability() == "AVX512" and cpu_vendor() == "AuthenticAMD" and cpu_family() == 25


@functools.cache
def cpu_family() -> int | None:
    """The x86 CPU family number as the kernel reports it (Linux's ``/proc/cpuinfo``: 6 for most Intel Core and
    Xeon CPUs, 25 for AMD Zen 3 and Zen 4, 26 for Zen 5); None where it cannot be read."""
    family = _cpuinfo_field("cpu family")
    return int(family) if family is not None and family.isdigit() else None


def _x86_capability() -> str | None:
    """torch's CPU capability ("AVX512", "AVX2", "DEFAULT", ...) on an x86 machine; None elsewhere or when this
    torch cannot say."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):  # a torch without the query
        return None


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor string as the kernel reports it ("GenuineIntel", "AuthenticAMD", ...; Linux's
    ``/proc/cpuinfo``), else ``platform.processor()`` (may be "")."""
    vendor = _cpuinfo_field("vendor_id")
    return platform.processor() if vendor is None else vendor


def _cpuinfo_field(name: str) -> str | None:
    """The first ``name : value`` field of Linux's ``/proc/cpuinfo`` (the value stripped); None without it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
