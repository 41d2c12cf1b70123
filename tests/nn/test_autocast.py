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
