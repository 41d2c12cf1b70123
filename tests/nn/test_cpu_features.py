import platform
from pathlib import Path

import pytest
import torch

from ebranchformer.nn import cpu_features
from ebranchformer.nn.cpu_features import cpu_amx_bf16, cpu_onednn_bf16, cpu_onednn_fp32_faster, cpu_vendor

_CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_field(name: str) -> str:
    line = next((x for x in _CPUINFO.read_text().splitlines() if x.startswith(name)), "")
    return line.split(":", 1)[1].strip() if line else ""


def test_cpu_amx_bf16_reports_the_cpus_amx_tiles():
    assert isinstance(cpu_amx_bf16(), bool)
    if _CPUINFO.exists():  # Linux: the kernel's flags for the same CPU feature
        flags = _cpuinfo_field("flags").split()
        assert cpu_amx_bf16() == ("amx_tile" in flags and "amx_bf16" in flags)


def test_cpu_vendor_is_the_kernels_vendor_id():
    assert isinstance(cpu_vendor(), str)
    if _CPUINFO.exists():
        assert cpu_vendor() == _cpuinfo_field("vendor_id") != ""


def test_cpu_onednn_bf16_follows_the_cpus_avx512_and_amx_flags():
    assert isinstance(cpu_onednn_bf16(), bool)
    flags = set(_cpuinfo_field("flags").split()) if _CPUINFO.exists() else set()
    if {"avx512bw", "avx512vl", "avx512dq"} <= flags or "amx_bf16" in flags:
        assert cpu_onednn_bf16()
    elif flags and not flags & {"avx512f", "avx_ne_convert", "amx_tile"}:  # AVX2 at most: no bf16 kernels
        assert not cpu_onednn_bf16()
    if not cpu_onednn_bf16() and torch.backends.mkldnn.is_available():  # and then oneDNN indeed refuses a bf16 product
        a = torch.ones(2, 4, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError):
            torch.ops.mkldnn._linear_pointwise(a, a, None, "none", [], "")


def test_cpu_onednn_fp32_faster_is_false_only_on_x86_without_avx512():
    assert isinstance(cpu_onednn_fp32_faster(), bool)
    flags = set(_cpuinfo_field("flags").split()) if _CPUINFO.exists() else set()
    if platform.machine().lower() in ("x86_64", "amd64") and flags:  # the kernel's flags for the same ISA level
        assert cpu_onednn_fp32_faster() == ({"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags)


@pytest.mark.parametrize(("machine", "capability", "faster"), [
    ("x86_64", "AVX512", True), ("x86_64", "AVX2", False), ("AMD64", "DEFAULT", False), ("aarch64", "DEFAULT", True),
])  # fmt: skip
def test_cpu_onednn_fp32_faster_by_isa(monkeypatch, machine, capability, faster):
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    cpu_onednn_fp32_faster.cache_clear()
    try:
        assert cpu_onednn_fp32_faster() is faster
    finally:
        monkeypatch.undo()
        cpu_onednn_fp32_faster.cache_clear()
