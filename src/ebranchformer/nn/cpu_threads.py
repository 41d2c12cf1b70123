"""CPU inference on groups of batch rows, one group per thread.

With N intra-op threads, a forward over the whole batch runs each op on N threads. Many of the encoder's ops
get less than N times one thread's speed that way: on the project's 2-core CPU, half the LibriSpeech-100 batch
(4 x 20 s) on one thread took 1.02 s in the Linear layers, 0.54 s in the convolutions and 0.22 s in SDPA, where
the whole batch on two threads took 1.12, 0.61 and 0.29 s (each op timed on its own, one forward). Split into N
groups of rows, each run by its own thread with its share of the intra-op threads, the forward took 0.87x the
time in fp32 and 0.86x under bf16 autocast (in one process, alternating with the one-pass forward, 8 rounds;
BENCHMARKS.md). Training is not split: there one thread on half the batch took as long as two threads on the
whole batch (8.19 vs 8.07 s a step), and a split training step measured 1.10x.

The intra-op thread count of a worker thread is set for that thread alone: OpenMP's ``omp_set_num_threads``
acts on the calling thread's own setting, and MKL's ``MKL_Set_Num_Threads_Local`` likewise, so the caller's and
any other thread's settings stay as they are (``torch.set_num_threads`` would change MKL's process-wide value).
Both are looked up in torch's own CPU library; where they are missing (another parallel backend than OpenMP, a
platform without that library), :func:`available` is False and nothing is split.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .autocast import cpu_autocast_dtype

__all__ = ["available", "plan_groups", "run_groups"]

# At most this many groups: each group's Python-level dispatch holds the GIL, so many small groups would queue on
# it. Measured with 2 groups only (2 cores); 4 is a bound chosen without a measurement on a larger machine.
MAX_GROUPS = 4
_state = threading.local()  # .worker: True on this module's worker threads (no nested splitting)
_lock = threading.Lock()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool): a forked child builds its own
_runtime: tuple[Any, Any] | None | bool = False  # False: not looked up yet; None: unavailable


def _load_runtime() -> tuple[Any, Any] | None:
    """(omp_set_num_threads, MKL_Set_Num_Threads_Local or None) from torch's CPU library, or None."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = os.path.join(libdir, name)
        if not os.path.exists(path):
            continue
        try:
            lib = ctypes.CDLL(path)
            omp = lib.omp_set_num_threads
        except (OSError, AttributeError):
            return None
        omp.argtypes, omp.restype = [ctypes.c_int], None
        mkl = getattr(lib, "MKL_Set_Num_Threads_Local", None)  # the C interface (int by value)
        if mkl is not None:
            mkl.argtypes, mkl.restype = [ctypes.c_int], ctypes.c_int
        return omp, mkl
    return None


def available() -> bool:
    """Whether per-thread intra-op thread counts can be set here (OpenMP backend, torch's CPU library found)."""
    global _runtime
    if _runtime is False:
        _runtime = _load_runtime()
    return _runtime is not None


def _caller_watched() -> bool:
    """Whether the calling thread's ops are being watched through thread-local state that worker threads would
    not share: a Python dispatch or function mode (``FlopCounterMode``, the fake tensors of ``torch.compile``'s
    tracing, ...), the profiler, or ``torch.jit.trace``. Their ops must run on the caller's thread."""
    return (
        torch._C._len_torch_dispatch_stack() > 0
        or torch._C._len_torch_function_stack() > 0
        or torch.autograd._profiler_enabled()
        or torch._C._get_tracing_state() is not None
    )


def plan_groups(batch: int) -> list[int]:
    """Intra-op threads for each group of rows of a ``batch``-row CPU inference, one group per entry; ``[]`` when
    nothing is split: one row, one thread, on a worker thread already, :func:`available` False, or the caller's
    ops being counted, profiled or traced (a dispatch or function mode, the profiler, ``torch.jit.trace``).

    The caller's ``torch.get_num_threads()`` threads are shared out over min(batch, threads, :data:`MAX_GROUPS`)
    groups."""
    threads = torch.get_num_threads()
    if batch < 2 or threads < 2 or getattr(_state, "worker", False) or not available() or _caller_watched():
        return []
    groups = min(batch, threads, MAX_GROUPS)
    return [threads // groups + (i < threads % groups) for i in range(groups)]


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] < workers:
            if _pool is not None and _pool[0] == os.getpid():
                _pool[2].shutdown(wait=False)
            _pool = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="ebranchformer-cpu"))
        return _pool[2]


def _in_worker(
    fn: Callable[..., Any], threads: int, inference: bool, autocast: torch.dtype | None, args: Sequence[Any]
) -> Any:
    """Run ``fn(*args)`` on a worker thread with ``threads`` intra-op threads, the caller's no-grad or inference
    mode and its CPU autocast dtype (all thread-local: the worker does not inherit them)."""
    omp, mkl = _runtime  # type: ignore[misc]
    torch.get_num_threads()  # torch sets a new thread's count on first use: let it, then set ours
    omp(threads)
    if mkl is not None:
        mkl(threads)
    _state.worker = True
    mode = torch.inference_mode() if inference else torch.no_grad()
    with mode, torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        return fn(*args)


def run_groups(fn: Callable[..., Any], groups: Sequence[Sequence[Any]], threads: Sequence[int]) -> list[Any]:
    """``[fn(*g) for g in groups]``, each call on its own worker thread with ``threads[i]`` intra-op threads
    (see :func:`plan_groups`), without gradients and under the caller's CPU autocast; the caller waits for all.

    Only for inference: raises ``RuntimeError`` when gradients are enabled. An exception in a group is raised
    here. Called on a worker thread, it runs the groups there, one after another."""
    if torch.is_grad_enabled():
        raise RuntimeError("run_groups is for inference: call it under torch.no_grad() or torch.inference_mode()")
    if len(groups) != len(threads):
        raise ValueError(f"threads must have one entry per group ({len(groups)}), got {len(threads)}")
    if not available():
        raise RuntimeError("per-thread intra-op thread counts are not available here (see cpu_threads.available)")
    if getattr(_state, "worker", False):  # on a worker already: waiting for the pool's other workers could deadlock
        return [fn(*g) for g in groups]
    autocast = cpu_autocast_dtype()
    pool = _executor(len(groups))
    inference = torch.is_inference_mode_enabled()
    futures = [pool.submit(_in_worker, fn, n, inference, autocast, g) for g, n in zip(groups, threads)]
    return [f.result() for f in futures]
