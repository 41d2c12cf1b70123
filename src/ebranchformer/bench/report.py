"""Write a benchmark result as JSON, a Markdown table and a PNG chart."""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

__all__ = ["markdown", "write_outputs", "write_plot"]

MiB = 1024 * 1024


def _kernels(peak: dict[str, Any]) -> str:
    """' (mm 118.5, onednn 205.5)': each kernel's median GFLOP/s, when the peak has more than one."""
    kernels = peak.get("kernels") or {}
    return f" ({', '.join(f'{k} {v:.1f}' for k, v in kernels.items())})" if len(kernels) > 1 else ""


def _f(v: Any, fmt: str = "{:.3g}", none: str = "-") -> str:
    return none if v is None else fmt.format(v)


def _ms(v: float | None) -> str:
    return _f(None if v is None else v * 1e3, "{:.1f}")


def _mib(v: int | None) -> str:
    if v is None:
        return "-"
    return f"{v / MiB:.1f}" if v < 100 * MiB else f"{v / MiB:.0f}"


def _speedup(r: dict[str, Any], field: str) -> str:
    v, p = r.get(field), r.get(field + "_paired")
    if v is None:
        return "-"
    return f"{v:.2f}x" + (f" ({p:.2f}x)" if p is not None else "")


def _header(res: dict[str, Any]) -> list[str]:
    env, opts, p = res["env"], res["options"], res["preset"]
    dev = env.get("gpu") or env["cpu"]
    lines = [
        f"# E-Branchformer encoder benchmark: `{p['name']}`",
        "",
        f"{p['description']}.",
        "",
        f"- device: {opts['device']} ({dev}), torch threads {env['torch_threads']}, dtype {opts['dtype']} "
        f"(references always fp32), our padding mode `{opts['padding']}`"
        + ("; our forward (eval, no grad) runs the batch as groups of rows, one thread each (`split_rows`)"
           if env.get("row_groups") and env["torch_threads"] > 1 else ""),
        f"- versions: torch {env['torch']}, espnet {env['espnet']}, returnn {env['returnn']}, "
        f"ebranchformer {env['ebranchformer']} (git {env['git_commit']}), python {env['python']}",
        f"- {opts['repeats']} timed runs after {opts['warmup']} warm-up runs per implementation, interleaved; "
        f"median (min) reported",
        f"- load average at start / end: {_f(env.get('loadavg_start'), '{}')} / {_f(env.get('loadavg_end'), '{}')}",
        f"- measured matmul peak: fp32 {res['peak']['fp32']['gflops']:.1f} GFLOP/s{_kernels(res['peak']['fp32'])}, "
        f"bf16 {res['peak']['bf16']['gflops']:.1f} GFLOP/s{_kernels(res['peak']['bf16'])} "
        f"(n={res['peak']['fp32']['n']}; the faster kernel's median)",
        f"- FLOPs: {res['flop_method']}",
        f"- memory: {res['memory_method']}",
        f"- date: {env['date']}",
    ]
    utils = [r["cpu_util"] for r in res.get("rows", []) if r.get("cpu_util") is not None]
    if utils and opts["device"] == "cpu":
        lines.append(
            f"- CPU utilisation of the timed steps (process CPU time / (wall x threads)), median over rows: "
            f"{statistics.median(utils):.0%} (min {min(utils):.0%}); well below 100% means other load starved the runs"
        )
    for note in res.get("notes", []):
        lines.append(f"- note: {note}")
    return lines


def _agreement(res: dict[str, Any]) -> list[str]:
    rows = res.get("agreement") or []
    if not rows:
        return []
    out = ["", "Output agreement (fp32, eval, valid frames), checked before timing:", "",
           "| ours | reference | length | max abs diff | tolerance | ok |", "|---|---|---|---|---|---|"]  # fmt: skip
    for a in rows:
        ln = f"{a['length_s']:g} s" if "length_s" in a else "batch"
        out.append(f"| {a['a']} | {a['b']} | {ln} | {_f(a.get('max_abs'), '{:.2e}')} | {a['tol']:.0e} | {a['ok']} |")
    dev = res.get("bf16_deviation")
    if dev:
        out += ["", f"bf16 autocast vs fp32, our outputs: max abs {dev['max_abs']:.3g}, mean abs "
                    f"{dev['mean_abs']:.3g} (output RMS {dev['ref_rms']:.3g})."]  # fmt: skip
    return out


def markdown(res: dict[str, Any]) -> str:
    """The report as Markdown."""
    lines = _header(res) + _agreement(res)
    mode_name = {"fwd": "forward (eval, no grad)", "fwdbwd": "forward+backward (train)"}
    if "length_s" in (res["rows"][0] if res["rows"] else {}):
        q = res["quadratic_crossover"]
        lines += ["", f"Long-utterance sweep, batch {res['batch']['batch']}. T^2 attention FLOPs equal all other "
                      f"FLOPs at {q['seconds']:.0f} s of audio ({q['frames']} input frames).", ""]  # fmt: skip
        impls = res["impls"]
        for mode in res["modes"]:
            lines += [f"### {mode_name[mode]}", "",
                      "| length | T' | T^2 FLOP share | " + " | ".join(f"{n} ms (min)" for n in impls)
                      + " | " + " | ".join(f"{n} ms per audio s" for n in impls)
                      + " | " + " | ".join(f"{n} peak MiB" for n in impls)
                      + (" | ESPnet / ours" if "espnet" in impls and "ours" in impls else "") + " |"]  # fmt: skip
            ncol = 3 + 3 * len(impls) + (1 if "espnet" in impls and "ours" in impls else 0)
            lines.append("|" + "---|" * ncol)
            for sec in res["batch"]["seconds"]:
                by = {r["impl"]: r for r in res["rows"] if r["length_s"] == sec and r["mode"] == mode}
                any_r = next(iter(by.values()))
                cells = [f"{sec:g} s", str(any_r["frames_out"]), f"{any_r['quadratic_flop_share']:.0%}"]
                cells += [f"{_ms(by[n]['median_s'])} ({_ms(by[n]['min_s'])})" for n in impls]
                cells += [_f(by[n]["median_s"] / sec * 1e3, "{:.1f}") for n in impls]
                cells += [_mib(by[n]["peak_mem_bytes"]) for n in impls]
                if "espnet" in impls and "ours" in impls:
                    cells.append(_speedup(by["ours"], "speedup_vs_espnet"))
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    else:
        b = res["batch"]
        lines += ["", f"Batch {b['batch']} x {b['frames']} frames (lengths {b['lengths']}).", ""]
        for mode in res["modes"]:
            lines += [f"### {mode_name[mode]}", "",
                      "| impl | dtype | T' | median ms | min ms | frames/s | GFLOP | GFLOP/s | MFU | peak MiB "
                      "| speedup vs ESPnet fp32 | vs peer |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for r in (r for r in res["rows"] if r["mode"] == mode):
                peer = f"{_speedup(r, 'speedup_vs_peer')} vs {r['peer']}" if r["speedup_vs_peer"] else "-"
                lines.append(
                    f"| {r['impl']} | {r['dtype']} | {r['frames_out']} | {_ms(r['median_s'])} | {_ms(r['min_s'])} "
                    f"| {r['frames_per_s']:.0f} | {r['gflop']:.1f} | {r['gflops_per_s']:.1f} "
                    f"| {_f(r['mfu'], '{:.1%}')} | {_mib(r['peak_mem_bytes'])} "
                    f"| {_speedup(r, 'speedup_vs_espnet')} | {peer} |"
                )  # fmt: skip
            lines.append("")
        shares = res.get("flop_shares")
        if shares:
            lines += ["FLOP shares of `ours` (forward): "
                      + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()), ""]  # fmt: skip
    lines += ["Speedup = ESPnet's (or the peer's) median time / this median time, from the same run; > 1 is faster. "
              "In brackets: the median of the per-round ratios (runs of a round are adjacent in time).",
              "MFU = achieved GFLOP/s / the measured matmul peak of the same dtype on the same device and threads.",
              ""]  # fmt: skip
    return "\n".join(lines)


def write_plot(res: dict[str, Any], path: str) -> None:
    """A PNG: bars of median time (with min-max) and peak memory per implementation, or, for a sweep, time per
    audio second and peak memory against the utterance length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = res["rows"]
    title = f"{res['preset']['name']} on {res['options']['device']} ({res['options']['dtype']})"
    if rows and "length_s" in rows[0]:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        secs = res["batch"]["seconds"]
        cross = res["quadratic_crossover"]["seconds"]
        for n in res["impls"]:
            rs = [next(r for r in rows if r["impl"] == n and r["length_s"] == s and r["mode"] == "fwd")
                  for s in secs]  # fmt: skip
            axes[0].plot(secs, [r["median_s"] / s * 1e3 for r, s in zip(rs, secs)], "o-", label=n)
            if all(r["peak_mem_bytes"] is not None for r in rs):
                axes[1].plot(secs, [r["peak_mem_bytes"] / MiB for r in rs], "o-", label=n)
        axes[0].set_ylabel("forward ms per second of audio")
        axes[1].set_ylabel("peak memory of the forward (MiB)")
        share = [next(r for r in rows if r["length_s"] == s)["quadratic_flop_share"] for s in secs]
        tw = axes[0].twinx()
        tw.plot(secs, [100 * s for s in share], "k:", label="T^2 share of FLOPs (right axis)")
        tw.set_ylabel("T^2 attention share of FLOPs (%)")
        tw.set_ylim(0, 100)
        tw.legend(loc="lower right")
        inside = secs[0] <= cross <= secs[-1]
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xlabel("utterance length (s)")
            ax.set_xticks(secs, [f"{s:g}" for s in secs])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            if inside:
                ax.axvline(cross, color="grey", ls="--", lw=1)
            ax.legend(loc="upper left")
        axes[1].set_yscale("log")
        where = "dashed line" if inside else "beyond the plotted range"
        fig.suptitle(title + f"; T^2 attention FLOPs = all other FLOPs at {cross:.0f} s ({where})")
    else:
        modes = res["modes"]
        fig, axes = plt.subplots(1, len(modes) + 1, figsize=(5 * (len(modes) + 1), 4.2))
        impls = res["impls"]
        for ax, mode in zip(axes, modes):
            rs = [next(r for r in rows if r["impl"] == n and r["mode"] == mode) for n in impls]
            med = [r["median_s"] * 1e3 for r in rs]
            err = [
                [m - r["min_s"] * 1e3 for m, r in zip(med, rs)],
                [r["max_s"] * 1e3 - m for m, r in zip(med, rs)],
            ]
            bars = ax.bar(range(len(impls)), med, yerr=err, capsize=3, color=[_color(n) for n in impls])
            for bar, r in zip(bars, rs):
                if r["speedup_vs_espnet"] is not None:
                    ax.annotate(f"{r['speedup_vs_espnet']:.2f}x", (bar.get_x() + bar.get_width() / 2,
                                bar.get_height()), ha="center", va="bottom", fontsize=8)  # fmt: skip
            ax.set_xticks(range(len(impls)), impls, rotation=30, ha="right")
            ax.set_ylabel("median ms (min-max)")
            ax.set_title({"fwd": "forward (eval)", "fwdbwd": "forward+backward (train)"}[mode])
        ax = axes[-1]
        width = 0.8 / len(modes)
        for j, mode in enumerate(modes):
            rs = [next(r for r in rows if r["impl"] == n and r["mode"] == mode) for n in impls]
            vals = [(r["peak_mem_bytes"] or 0) / MiB for r in rs]
            ax.bar([i + j * width for i in range(len(impls))], vals, width, label=mode)
        ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(impls))], impls, rotation=30,
                      ha="right")  # fmt: skip
        ax.set_ylabel("peak memory (MiB)")
        ax.set_title("peak memory per step")
        ax.legend()
        fig.suptitle(title + "; labels: speedup vs ESPnet fp32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _color(name: str) -> str:
    if name.startswith("ours"):
        return "tab:blue"
    return "tab:orange" if name == "espnet" else "tab:green"


def write_outputs(res: dict[str, Any], out_dir: str) -> dict[str, str]:
    """Write ``result.json``, ``result.md`` and ``result.png`` into ``out_dir``; return their paths (the PNG is
    skipped, with a note in the result, when matplotlib is missing)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "result.json"), "md": os.path.join(out_dir, "result.md")}
    png = os.path.join(out_dir, "result.png")
    try:
        write_plot(res, png)
        paths["png"] = png
    except ImportError:
        res.setdefault("notes", []).append("matplotlib is not installed: no PNG chart")
    with open(paths["json"], "w") as f:
        json.dump(res, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(res))
    return paths
