"""Timing (interleaved runs, medians) and peak-memory measurement of :class:`~ebranchformer.bench.impls.Impl` s.

Timing: every implementation runs ``warmup`` times, then ``repeats`` rounds, each round running every
implementation once in a fixed order (ours, espnet, returnn, ours, ...), so load changes on a shared machine
hit all of them alike. One sample = wall time of one step (:func:`~ebranchformer.bench.impls.run_step`) between
two device synchronisations, Python's garbage collector paused; gradients are cleared outside the timed region.

Peak memory:

- CUDA: in-process, ``torch.cuda.max_memory_allocated()`` during one step minus ``memory_allocated()`` before it
  (so it is what the step itself needs: activations, workspaces and, for training, the gradients).
- CPU: one fresh subprocess per (implementation, mode) builds that implementation alone, warms it up on a 1-row
  slice of the batch (so thread pools and library workspaces exist), resets its peak-RSS mark to the current RSS
  (``/proc/self/clear_refs``; otherwise import-time peaks would hide small steps), runs one step and reports
  its peak RSS (``VmHWM``; ``ru_maxrss`` where the reset is impossible); a second, identical subprocess skips
  the step. The peak is the
  difference. Both run with ``MALLOC_MMAP_THRESHOLD_=131072`` so large freed tensors go back to the OS and RSS
  follows the live tensors rather than glibc's heap high-water mark.
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from .impls import Impl, clear_grads, run_step

__all__ = ["cpu_peak_rss", "cuda_peak_memory", "summarize", "time_interleaved"]


def _sync(impl: Impl) -> None:
    x = impl.inputs[0]
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed_step(impl: Impl, mode: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step."""
    clear_grads(impl)
    gc.collect()
    gc.disable()
    try:
        _sync(impl)
        c0 = _cpu_seconds()
        t0 = time.perf_counter()
        run_step(impl, mode)
        _sync(impl)
        return time.perf_counter() - t0, _cpu_seconds() - c0
    finally:
        gc.enable()
        clear_grads(impl)


def time_interleaved(impls: dict[str, Impl], mode: str, *, repeats: int, warmup: int,
                     progress: Any = None) -> dict[str, list[tuple[float, float]]]:  # fmt: skip
    """(wall, CPU) seconds per step for each implementation: ``warmup`` untimed rounds, then ``repeats`` timed
    rounds, the implementations interleaved within each round. ``progress(msg)`` is called per round if given."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    order = list(impls)
    for i in range(warmup):
        for name in order:
            _timed_step(impls[name], mode)
        if progress:
            progress(f"{mode} warm-up {i + 1}/{warmup}")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in order}
    for r in range(repeats):
        for name in order:
            times[name].append(_timed_step(impls[name], mode))
        if progress:
            progress(f"{mode} round {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1][0]:.3f}s" for n in order))
    return times


def cuda_peak_memory(impl: Impl, mode: str) -> int:
    """Bytes one step needs beyond what was allocated before it (CUDA only)."""
    dev = impl.inputs[0].device
    clear_grads(impl)
    gc.collect()
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    run_step(impl, mode)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    clear_grads(impl)
    return int(peak)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run_child(spec: dict[str, Any], timeout: float) -> tuple[int, bool]:
    """Run the memory child with ``spec``; return its peak RSS in bytes and whether its peak mark was reset."""
    proc = subprocess.run(
        [sys.executable, "-m", "ebranchformer.bench._memchild", json.dumps(spec)],
        capture_output=True, text=True, env=_child_env(), timeout=timeout, check=False,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory subprocess failed (rc={proc.returncode}) for {spec['impl']}/{spec['mode']}:\n"
                           f"{proc.stderr[-2000:]}")  # fmt: skip
    res = json.loads(lines[-1])
    return int(res["peak_kb"]) * 1024, bool(res["reset"])


def cpu_peak_rss(specs: list[dict[str, Any]], *, jobs: int = 1, timeout: float = 3600.0) -> list[dict[str, int]]:
    """For each child spec (see :mod:`ebranchformer.bench._memchild`), the measured and baseline peak RSS and
    their difference: ``{"peak_bytes", "rss_run_bytes", "rss_baseline_bytes", "peak_reset"}``. The children only measure memory,
    so up to ``jobs`` of them run at once (RSS is per process)."""
    todo = []
    for spec in specs:
        todo.append({**spec, "run": True})
        todo.append({**spec, "run": False})
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        rss = list(pool.map(lambda s: _run_child(s, timeout), todo))
    out = []
    for i in range(len(specs)):
        (run, reset_run), (base, reset_base) = rss[2 * i], rss[2 * i + 1]
        out.append({"peak_bytes": max(0, run - base), "rss_run_bytes": run, "rss_baseline_bytes": base,
                    "peak_reset": reset_run and reset_base})  # fmt: skip
    return out


def summarize(samples: list[tuple[float, float]], threads: int) -> dict[str, Any]:
    """Median, min and max wall seconds, the samples, and the CPU utilisation: process CPU seconds / (wall seconds
    x ``threads``) per sample, median (near or above 1 when the step had its threads' cores; clearly below 1 when
    other load starved it)."""
    wall = [w for w, _ in samples]
    util = [c / (w * threads) for w, c in samples if w > 0]
    return {"median_s": statistics.median(wall), "min_s": min(wall), "max_s": max(wall), "times_s": wall,
            "cpu_s": [c for _, c in samples], "cpu_util": statistics.median(util) if util else None}  # fmt: skip
