"""Subprocess entry point for CPU peak-memory measurement (see :mod:`ebranchformer.bench.measure`).

``python -m ebranchformer.bench._memchild '<json spec>'`` with spec keys ``preset``, ``impl``, ``mode``,
``threads``, ``autocast`` ("bf16" or null), ``padding``, ``seed``, ``frames``, ``batch`` (null = the preset's) and
``run`` (false = baseline: build and warm up only). Prints one JSON line
``{"peak_kb": ..., "maxrss_kb": ..., "reset": ...}``.

Before the measured step the process's peak-RSS mark is reset to its current RSS (Linux: ``5`` written to
``/proc/self/clear_refs``), so transient peaks of importing and building do not hide the step's own peak.
``peak_kb`` is then ``VmHWM`` from ``/proc/self/status``. ``getrusage(RUSAGE_SELF).ru_maxrss`` (``maxrss_kb``)
is reported too, but it also keeps the marks of threads that exited earlier (import-time helpers), which the
reset cannot clear; it is used as the peak only where the reset is not possible (``reset`` false).
"""

from __future__ import annotations

import gc
import json
import resource
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    spec = json.loads((sys.argv[1:] if argv is None else argv)[0])
    import torch

    from .impls import build_impls, clear_grads, run_step
    from .presets import get_preset

    torch.set_num_threads(int(spec["threads"]))
    autocast = torch.bfloat16 if spec.get("autocast") == "bf16" else None
    impls = build_impls(
        get_preset(spec["preset"]), [spec["impl"]], device="cpu", autocast=autocast, padding=spec["padding"],
        seed=int(spec["seed"]), share_weights=False, frames=spec.get("frames"), batch=spec.get("batch"),
    )  # fmt: skip
    impl = impls[spec["impl"]]
    run_step(impl, spec["mode"], inputs=impl.small_inputs())  # warm-up: thread pools, library workspaces
    clear_grads(impl)
    gc.collect()
    reset = _reset_peak_rss()
    if spec["run"]:
        run_step(impl, spec["mode"])
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = _vm_hwm_kb() if reset else None
    print(json.dumps({"peak_kb": peak if peak is not None else maxrss, "maxrss_kb": maxrss, "reset": reset}),
          flush=True)  # fmt: skip
    return 0


def _vm_hwm_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
