"""Run a benchmark end to end: build, check output agreement, time, measure memory, and assemble the result dict
(written out by :mod:`ebranchformer.bench.report`)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..nn import cpu_threads
from .flops import TRAIN_FLOP_FACTOR, flop_shares, matmul_peak, quadratic_crossover_frames
from .impls import Impl, available_references, build_impls, set_batch
from .measure import cpu_peak_rss, cuda_peak_memory, summarize, time_interleaved
from .presets import FRAMES_PER_SECOND, Preset, get_preset

__all__ = ["BenchOptions", "default_impls", "run_benchmark"]

SCHEMA = "ebranchformer-bench/1"
MODES = ("fwd", "fwdbwd")
# (ours-side, reference) pairs whose outputs must agree before timing
CHECK_PAIRS = (("ours", "espnet"), ("ours_layers", "returnn_layers"), ("ours_conv6", "returnn_conv6"))


@dataclasses.dataclass
class BenchOptions:
    """What to run (the CLI's options; see ``python -m ebranchformer.bench --help``)."""

    preset: str = "ls100"
    device: str = "cpu"
    threads: int | None = 2  # CPU threads (None: torch's default)
    dtype: str = "fp32"  # "fp32" or "bf16" (autocast for ours; references stay fp32)
    repeats: int = 5
    warmup: int = 2
    impls: list[str] | None = None  # None: default_impls()
    modes: list[str] | None = None  # None: fwd + fwdbwd (sweeps: fwd)
    padding: str = "espnet_legacy"  # our padding mode for "ours" (espnet_legacy = ESPnet 202511's exact math)
    memory: bool = True
    memory_impls: list[str] | None = None  # None: measure the memory of every implementation
    mem_jobs: int = 1
    seed: int = 0
    batch: int | None = None  # overrides the preset's batch size
    frames: int | None = None  # overrides the preset's padded length
    seconds: list[float] | None = None  # overrides a sweep's lengths
    tol: float = 1e-4  # max abs difference allowed between ours and a reference (fp32, valid frames)
    peak_n: int | None = None  # matmul size for the peak measurement (default 2048 CPU, 8192 CUDA)


def default_impls(preset: Preset, dtype: str) -> list[str]:
    """Ours, ESPnet (if installed), ours in fp32 when timing bf16, and the RETURNN pairs (if installed; not for
    sweeps, which compare ours with ESPnet)."""
    refs = available_references()
    names = ["ours"]
    if dtype == "bf16":
        names.append("ours_fp32")
    if refs["espnet"]:
        names.append("espnet")
    if refs["returnn"] and not preset.is_sweep:
        names += ["ours_layers", "returnn_layers", "ours_conv6", "returnn_conv6"]
    return names


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10, check=False)  # fmt: skip
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> dict[str, Any]:
    """Versions, hardware and load, for the report."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0], "torch": torch.__version__, "espnet": _version("espnet"),
        "returnn": _version("returnn"), "ebranchformer": _version("ebranchformer"), "git_commit": _git_commit(),
        "platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "row_groups": device == "cpu" and cpu_threads.available(),  # ours' CPU inference, nn.cpu_threads
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    if hasattr(os, "getloadavg"):
        env["loadavg_start"] = list(os.getloadavg())
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        env["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    return env


def _max_abs_diff(
    a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], rows: list[int]
) -> dict[str, Any]:
    """Max abs difference of two (y, lengths) results over the valid frames of ``rows``."""
    (ya, na), (yb, nb) = a, b
    la, lb = [int(na[i]) for i in rows], [int(nb[i]) for i in rows]
    if la != lb or ya.shape[0] != yb.shape[0] or ya.shape[2:] != yb.shape[2:]:
        return {"ok": False, "reason": f"lengths/shapes differ on rows {rows}: {la} vs {lb}, "
                                       f"{tuple(ya.shape)} vs {tuple(yb.shape)}"}  # fmt: skip
    diff = max(float((ya[i, :n].float() - yb[i, :n].float()).abs().max()) for i, n in zip(rows, lb))
    scale = max(float(yb[i, :n].abs().max()) for i, n in zip(rows, lb))
    return {"max_abs": diff, "ref_max_abs": scale, "rows": rows}


@contextlib.contextmanager
def _strict_fp32() -> Iterator[None]:
    """TF32 off for CUDA matmuls and convolutions (the agreement check compares exact fp32 arithmetic)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _eval_outputs(impl: Impl, autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode output (float32) on the benchmark batch, with strict fp32 (or bf16 autocast)."""
    impl.set_train(False)
    dev = impl.inputs[0].device.type
    with _strict_fp32(), torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
        y, n = impl.forward()
    return y.float(), n


def check_agreement(impls: dict[str, Impl], tol: float, padding: str = "espnet_legacy") -> list[dict[str, Any]]:
    """fp32 eval outputs of each (ours, reference) pair on the benchmark batch, over valid frames; raises
    AssertionError if one differs by more than ``tol`` (max abs) or in lengths.

    With ``padding="masked"`` (our batch-invariant mode) ours and ESPnet 202511 differ by design on padded rows,
    so that pair is compared on the full-length rows only."""
    out = []
    for a, b in CHECK_PAIRS:
        if a not in impls or b not in impls:
            continue
        lengths = impls[a].inputs[1]
        rows = list(range(lengths.shape[0]))
        if b == "espnet" and padding == "masked":
            rows = [i for i in rows if int(lengths[i]) == impls[a].inputs[0].shape[1]]
        ya, yb = _eval_outputs(impls[a]), _eval_outputs(impls[b])
        res = {"a": a, "b": b, "tol": tol, **_max_abs_diff(ya, yb, rows)}
        res.setdefault("ok", res.get("max_abs", float("inf")) <= tol)
        out.append(res)
        if not res["ok"]:
            raise AssertionError(f"outputs of {a} and {b} disagree on the benchmark batch: {res}")
    return out


def bf16_deviation(impl: Impl) -> dict[str, float]:
    """Max and mean abs difference of ``impl``'s bf16-autocast eval output from its fp32 output (valid frames)."""
    y32, n = _eval_outputs(impl, autocast=False)
    y16, _ = _eval_outputs(impl, autocast=True)
    valid = torch.arange(y32.shape[1], device=y32.device)[None, :] < n[:, None].to(y32.device)  # (B, T')
    d = (y16 - y32).abs()[valid]  # (N, D)
    return {
        "max_abs": float(d.max()),
        "mean_abs": float(d.mean()),
        "ref_rms": float(y32[valid].square().mean().sqrt()),
    }


def _row(impl: Impl, mode: str, stats: dict[str, float], peaks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    x, _ = impl.inputs
    flop = impl.flops["total"] * (TRAIN_FLOP_FACTOR if mode == "fwdbwd" else 1)
    med = stats["median_s"]
    gflops = flop / med / 1e9
    peak = peaks.get(impl.dtype_name, {}).get("gflops")
    return {
        "impl": impl.name, "mode": mode, "dtype": impl.dtype_name, "family": impl.family,
        "batch": int(x.shape[0]), "frames_in": int(impl.inputs[0].shape[1]) if impl.family != "layers" else None,
        "frames_out": int(impl.flops["frames_out"]), "input_frames_valid": impl.input_frames,
        **stats,
        "frames_per_s": impl.input_frames / med,
        "audio_s_per_s": impl.input_frames / FRAMES_PER_SECOND / med,
        "gflop": flop / 1e9, "gflops_per_s": gflops, "mfu": gflops / peak if peak else None,
        "peak_mem_bytes": None, "speedup_vs_espnet": None, "speedup_vs_espnet_paired": None, "peer": impl.peer,
        "speedup_vs_peer": None, "speedup_vs_peer_paired": None,
    }  # fmt: skip


def _paired(ref: list[float], own: list[float]) -> float:
    """Median over rounds of ref / own (runs of one round are adjacent in time, so they share the load)."""
    return statistics.median(r / o for r, o in zip(ref, own))


def _add_ratios(rows: list[dict[str, Any]], key: tuple[str, ...]) -> None:
    """speedup_vs_espnet = ESPnet's median / this median (same mode and sweep point), and ``*_paired`` = the median
    of the per-round ratios; likewise against the peer."""
    index = {(r["impl"], *(r[k] for k in key)): r for r in rows}
    for r in rows:
        k = tuple(r[k] for k in key)
        for field, ref_name in (("speedup_vs_espnet", "espnet"), ("speedup_vs_peer", r["peer"])):
            ref = index.get((ref_name, *k)) if ref_name else None
            if ref is not None:
                r[field] = ref["median_s"] / r["median_s"]
                r[field + "_paired"] = _paired(ref["times_s"], r["times_s"])


def _memory(impls: dict[str, Impl], modes: list[str], opts: BenchOptions, preset: Preset,
            frames: int | None, batch: int | None) -> dict[tuple[str, str], dict[str, int]]:  # fmt: skip
    if not opts.memory:
        return {}
    impls = {n: i for n, i in impls.items() if opts.memory_impls is None or n in opts.memory_impls}
    if opts.device == "cuda":
        return {(n, m): {"peak_bytes": cuda_peak_memory(impl, m)} for m in modes for n, impl in impls.items()}
    specs = [
        dict(preset=preset.name, impl=n, mode=m, threads=opts.threads or torch.get_num_threads(),
             autocast="bf16" if impl.autocast == torch.bfloat16 else None, padding=opts.padding, seed=opts.seed,
             frames=frames, batch=batch)
        for m in modes for n, impl in impls.items()
    ]  # fmt: skip
    res = cpu_peak_rss(specs, jobs=opts.mem_jobs)
    return {(s["impl"], s["mode"]): r for s, r in zip(specs, res)}


def run_benchmark(opts: BenchOptions, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run the benchmark described by ``opts`` and return the result dict (schema ``ebranchformer-bench/1``)."""
    preset = get_preset(opts.preset)
    if opts.device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {opts.device!r}")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: CUDA is not available")
    if opts.dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be 'fp32' or 'bf16', got {opts.dtype!r}")
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    autocast = torch.bfloat16 if opts.dtype == "bf16" else None
    names = list(opts.impls) if opts.impls else default_impls(preset, opts.dtype)
    modes = list(opts.modes) if opts.modes else (["fwd"] if preset.is_sweep else list(MODES))
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; choose from {list(MODES)}")
    refs = available_references()
    for n in names:
        if n == "espnet" and not refs["espnet"] or n.startswith("returnn") and not refs["returnn"]:
            raise RuntimeError(f"implementation {n!r} needs a package that is not installed")

    result: dict[str, Any] = {
        "schema": SCHEMA, "preset": preset.to_dict(), "options": dataclasses.asdict(opts),
        "impls": names, "modes": modes, "env": environment(opts.device), "notes": [],
        "flop_method": "analytical model FLOPs (ebranchformer.bench.flops); fwd+bwd = 3 x fwd",
        "memory_method": ("CUDA max_memory_allocated during the step minus memory_allocated before it"
                          if opts.device == "cuda" else
                          "peak RSS of a fresh subprocess that runs the step minus that of an identical one that "
                          "does not (both warmed up on a 1-row slice, then the peak mark reset; "
                          "MALLOC_MMAP_THRESHOLD_=131072)"),
    }  # fmt: skip
    if opts.repeats < 5:
        result["notes"].append(f"only {opts.repeats} timed repeats (the method asks for >= 5): smoke run")
    log(f"measuring matmul peak on {opts.device} ({torch.get_num_threads()} threads)")
    result["peak"] = {
        "fp32": matmul_peak(opts.device, torch.float32, n=opts.peak_n),
        "bf16": matmul_peak(opts.device, torch.bfloat16, n=opts.peak_n),
    }
    dev_type = opts.device
    if preset.is_sweep:
        _run_sweep(result, preset, names, modes, opts, autocast, log)
    else:
        b, t = preset.batch_for(dev_type)
        b, t = opts.batch or b, opts.frames or t
        log(f"building {names} for {preset.name}: batch {b} x {t} frames")
        impls = build_impls(preset, names, device=opts.device, autocast=autocast, padding=opts.padding,
                            seed=opts.seed, frames=t, batch=b)  # fmt: skip
        result["batch"] = {"batch": b, "frames": t, "lengths": impls[names[0]].inputs[1].tolist()
                           if impls[names[0]].family != "layers" else None}  # fmt: skip
        result["agreement"] = check_agreement(impls, opts.tol, opts.padding)
        log(f"agreement: {result['agreement']}")
        if autocast is not None and "ours" in impls:
            result["bf16_deviation"] = bf16_deviation(impls["ours"])
        first = next(iter(impls.values()))
        result["flops"] = {n: impl.flops for n, impl in impls.items()}
        result["flop_shares"] = flop_shares(first.flops)
        rows = []
        for mode in modes:
            times = time_interleaved(impls, mode, repeats=opts.repeats, warmup=opts.warmup, progress=log)
            rows += [_row(impls[n], mode, summarize(ts, torch.get_num_threads()), result["peak"])
                     for n, ts in times.items()]  # fmt: skip
        log("measuring peak memory")
        mem = _memory(impls, modes, opts, preset, opts.frames, opts.batch)
        for r in rows:
            m = mem.get((r["impl"], r["mode"]))
            if m is not None:
                r["peak_mem_bytes"] = m["peak_bytes"]
                r["mem_detail"] = m
        _add_ratios(rows, ("mode",))
        result["rows"] = rows
    if hasattr(os, "getloadavg"):
        result["env"]["loadavg_end"] = list(os.getloadavg())
    return result


def _run_sweep(result: dict[str, Any], preset: Preset, names: list[str], modes: list[str], opts: BenchOptions,
               autocast: torch.dtype | None, log: Callable[[str], None]) -> None:  # fmt: skip
    seconds = list(opts.seconds or preset.sweep_seconds or ())
    conf = preset.encoder_conf
    b = opts.batch or 1
    frames0 = round(seconds[0] * FRAMES_PER_SECOND)
    log(f"building {names} for sweep {preset.name}: batch {b}, {seconds} s")
    impls = build_impls(preset, names, device=opts.device, autocast=autocast, padding=opts.padding,
                        seed=opts.seed, frames=frames0, batch=b)  # fmt: skip
    rows, agreement = [], []
    for sec in seconds:
        frames = round(sec * FRAMES_PER_SECOND)
        set_batch(impls, preset, frames=frames, batch=b, seed=opts.seed)
        for a in check_agreement(impls, opts.tol, opts.padding):
            agreement.append({**a, "length_s": sec})
        for mode in modes:
            times = time_interleaved(impls, mode, repeats=opts.repeats, warmup=opts.warmup,
                                     progress=lambda m, s=sec: log(f"{s:g} s: {m}"))  # fmt: skip
            for n, ts in times.items():
                r = _row(impls[n], mode, summarize(ts, torch.get_num_threads()), result["peak"])
                r["length_s"] = sec
                r["quadratic_flop_share"] = sum(flop_shares(impls[n].flops)[k] for k in ("attn_scores", "attn_pos"))
                rows.append(r)
        log(f"{sec:g} s: measuring peak memory")
        mem = _memory(impls, modes, opts, preset, frames, b)
        for r in rows:
            if r["length_s"] == sec and (r["impl"], r["mode"]) in mem:
                m = mem[(r["impl"], r["mode"])]
                r["peak_mem_bytes"] = m["peak_bytes"]
                r["mem_detail"] = m
    _add_ratios(rows, ("mode", "length_s"))
    result["rows"] = rows
    result["agreement"] = agreement
    t_cross = quadratic_crossover_frames(conf, preset.input_size)
    result["quadratic_crossover"] = {
        "frames": t_cross,
        "seconds": t_cross / FRAMES_PER_SECOND,
        "meaning": "utterance length where the T^2 attention FLOPs (scores + positional term) equal all other "
                   "forward FLOPs (frontend included)",
    }  # fmt: skip
    result["batch"] = {"batch": b, "seconds": seconds}
