"""Command line of the benchmark: ``python -m ebranchformer.bench`` (and ``ebranchformer bench``)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .presets import PRESETS

__all__ = ["build_parser", "main"]


def _csv(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def build_parser(prog: str = "python -m ebranchformer.bench") -> argparse.ArgumentParser:
    """The argument parser (exposed so other CLIs can embed it)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Time our E-Branchformer encoder against ESPnet 202511 and RETURNN (whichever are installed) "
        "on the same config, weights and batch; write result.json, result.md and result.png.",
    )
    p.add_argument("--preset", default="ls100", choices=sorted(PRESETS), help="benchmark case (Default: ls100)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="Default: cuda if available, else cpu")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch threads (Default: 2 on CPU, torch's on CUDA)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 = autocast for ours; the references always run fp32 (Default: fp32)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=5, help="timed runs per implementation and mode (Default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (Default: 2)")
    p.add_argument("--out", default=None, help="output directory (Default: bench-results/PRESET-DEVICE-DTYPE)")
    p.add_argument("--impls", type=_csv, default=None,
                   help="comma list of ours,ours_fp32,espnet,ours_layers,returnn_layers,ours_conv6,returnn_conv6 "
                        "(Default: what is installed)")  # fmt: skip
    p.add_argument("--modes", type=_csv, default=None, help="fwd,fwdbwd (Default: both; sweeps: fwd)")
    p.add_argument("--padding", choices=["espnet_legacy", "masked"], default="espnet_legacy",
                   help="our padding mode (Default: espnet_legacy, ESPnet 202511's exact math)")  # fmt: skip
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--memory-impls", type=_csv, default=None,
                   help="measure peak memory only for these implementations (Default: all)")  # fmt: skip
    p.add_argument("--mem-jobs", type=int, default=1, help="CPU memory subprocesses run at once (Default: 1)")
    p.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    p.add_argument("--frames", type=int, default=None, help="override the preset's padded input frames")
    p.add_argument("--seconds", type=lambda s: [float(v) for v in _csv(s)], default=None,
                   help="override a sweep's lengths, e.g. 5,10,20")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4, help="max abs output difference allowed (Default: 1e-4)")
    p.add_argument("--peak-n", type=int, default=None, help="matmul size for the peak (Default: 2048 CPU, 8192 CUDA)")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.list:
        for name, pr in PRESETS.items():
            print(f"{name:10s} {pr.description}")
        return 0
    import torch

    from .report import write_outputs
    from .runner import BenchOptions, run_benchmark

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads if args.threads is not None else (2 if device == "cpu" else None)
    opts = BenchOptions(
        preset=args.preset, device=device, threads=threads, dtype=args.dtype, repeats=args.repeats,
        warmup=args.warmup, impls=args.impls, modes=args.modes, padding=args.padding, memory=not args.no_memory,
        memory_impls=args.memory_impls, mem_jobs=args.mem_jobs, seed=args.seed, batch=args.batch,
        frames=args.frames, seconds=args.seconds, tol=args.tol, peak_n=args.peak_n,
    )  # fmt: skip
    out = args.out or os.path.join("bench-results", f"{args.preset}-{device}-{args.dtype}")
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    try:
        res = run_benchmark(opts, log=log)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write_outputs(res, out)
    if not args.quiet:
        with open(paths["md"]) as f:
            print(f.read())
    log(f"wrote {', '.join(paths.values())}")
    return 0
