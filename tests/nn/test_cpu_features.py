import platform
from pathlib import Path

import pytest
import torch

from ebranchformer.nn import cpu_features
from ebranchformer.nn.cpu_features import (
    cpu_amx_bf16,
    cpu_avx512_double_pumped,
    cpu_family,
    cpu_onednn_bf16,
    cpu_onednn_fp32_faster,
    cpu_onednn_mm_faster,
    cpu_vendor,
)

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
    assert _answer_on(monkeypatch, cpu_onednn_fp32_faster, machine, capability) is faster


def _answer_on(monkeypatch, rule, machine: str, capability: str, vendor: str | None = None,
               family: int | None = None) -> bool:
    """``rule()`` (a cached cpu_features query) as on a CPU of this machine type, ISA level (and vendor, family)."""
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    if vendor is not None:
        monkeypatch.setattr(cpu_features, "cpu_vendor", lambda: vendor)
    if family is not None:
        monkeypatch.setattr(cpu_features, "cpu_family", lambda: family)
    rule.cache_clear()
    try:
        return rule()
    finally:
        monkeypatch.undo()
        rule.cache_clear()


def test_cpu_onednn_mm_faster_only_on_avx512_cpus_not_made_by_intel():
    assert isinstance(cpu_onednn_mm_faster(), bool)
    flags = set(_cpuinfo_field("flags").split()) if _CPUINFO.exists() else set()
    if platform.machine().lower() in ("x86_64", "amd64") and flags:
        avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
        assert cpu_onednn_mm_faster() == (avx512 and _cpuinfo_field("vendor_id") != "GenuineIntel")


@pytest.mark.parametrize(("machine", "vendor", "capability", "faster"), [
    ("x86_64", "AuthenticAMD", "AVX512", True), ("x86_64", "GenuineIntel", "AVX512", False),
    ("x86_64", "AuthenticAMD", "AVX2", False), ("aarch64", "", "DEFAULT", False),
])  # fmt: skip
def test_cpu_onednn_mm_faster_by_vendor_and_isa(monkeypatch, machine, vendor, capability, faster):
    assert _answer_on(monkeypatch, cpu_onednn_mm_faster, machine, capability, vendor) is faster


def test_cpu_family_is_the_kernels_cpu_family():
    family = _cpuinfo_field("cpu family") if _CPUINFO.exists() else ""
    assert cpu_family() == (int(family) if family.isdigit() else None)
    if platform.machine().lower() in ("x86_64", "amd64") and _CPUINFO.exists():  # and this CPU's answer
        zen4 = cpu_vendor() == "AuthenticAMD" and cpu_family() == 25 and "avx512f" in _cpuinfo_field("flags").split()
        assert cpu_avx512_double_pumped() == zen4


@pytest.mark.parametrize(("vendor", "family", "capability", "split"), [
    ("AuthenticAMD", 25, "AVX512", True), ("AuthenticAMD", 26, "AVX512", False), ("AuthenticAMD", 25, "AVX2", False),
    ("GenuineIntel", 6, "AVX512", False),
])  # fmt: skip
def test_cpu_avx512_double_pumped_only_on_amd_zen4(monkeypatch, vendor, family, capability, split):
    # Zen 4 (family 25 with AVX-512); not Zen 5 (26), Zen 3 (25, AVX2 only) or Intel
    assert _answer_on(monkeypatch, cpu_avx512_double_pumped, "x86_64", capability, vendor, family) is split
