import threading

import torch

from ebranchformer.nn.autocast import cpu_autocast_dtype


def test_cpu_autocast_dtype_follows_this_threads_autocast():
    assert cpu_autocast_dtype() is None
    seen = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_autocast_dtype() is torch.bfloat16
        with torch.autocast("cpu", enabled=False):
            assert cpu_autocast_dtype() is None
        thread = threading.Thread(target=lambda: seen.append(cpu_autocast_dtype()))
        thread.start()
        thread.join()
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        assert cpu_autocast_dtype() is None  # another device's autocast
    assert seen == [None]  # autocast is thread-local


def test_cpu_amx_bf16_reports_the_cpus_amx_tiles():
    from pathlib import Path

    from ebranchformer.nn.autocast import cpu_amx_bf16

    assert isinstance(cpu_amx_bf16(), bool)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # Linux: the kernel's flag for the same CPU feature
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
        assert cpu_amx_bf16() == ("amx_tile" in flags.split() and "amx_bf16" in flags.split())
