from pathlib import Path

from ebranchformer.nn.cpu_features import cpu_amx_bf16, cpu_vendor

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
