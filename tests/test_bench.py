"""The side-by-side benchmark (``ebranchformer.bench``) on its tiny presets: result fields and their sanity, output
agreement with ESPnet / RETURNN (and that a disagreement stops the run), the FLOP formula against
``torch.utils.flop_counter.FlopCounterMode``, the bf16 report, the sweep, and the written files."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ebranchformer.bench import BenchOptions, encoder_flops, main, matmul_peak, run_benchmark
from ebranchformer.bench.flops import espnet_conf_flops, quadratic_crossover_frames
from ebranchformer.bench.impls import CONV6, available_references, build_impls
from ebranchformer.bench.measure import cpu_peak_rss
from ebranchformer.bench.presets import PRESETS, batch_lengths, get_preset
from ebranchformer.bench.report import markdown, write_outputs
from ebranchformer.bench.runner import check_agreement, default_impls
from ebranchformer.nn import cpu_threads

REFS = available_references()
needs_espnet = pytest.mark.skipif(not REFS["espnet"], reason="espnet is not installed")

ROW_FIELDS = {
    "impl", "mode", "dtype", "batch", "frames_out", "input_frames_valid", "median_s", "min_s", "max_s", "times_s",
    "frames_per_s", "audio_s_per_s", "gflop", "gflops_per_s", "mfu", "peak_mem_bytes", "speedup_vs_espnet",
    "speedup_vs_peer",
}  # fmt: skip


def _flop_count(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    """One full tiny run: every installed implementation, both modes; CPU memory subprocesses for ours and ESPnet
    (each costs two fresh Python processes; RETURNN's is covered by test_cpu_memory_child_returnn)."""
    opts = BenchOptions(
        preset="tiny", threads=1, repeats=2, warmup=1, mem_jobs=2, memory_impls=["ours", "espnet"], peak_n=512
    )
    res = run_benchmark(opts)
    out = tmp_path_factory.mktemp("bench_tiny")
    paths = write_outputs(res, str(out))
    return res, paths


def test_result_has_every_field_with_sane_values(tiny_result):
    res, _ = tiny_result
    names = default_impls(get_preset("tiny"), "fp32")
    assert res["impls"] == names and res["modes"] == ["fwd", "fwdbwd"]
    assert res["schema"] == "ebranchformer-bench/1"
    for dt in ("fp32", "bf16"):
        assert res["peak"][dt]["gflops"] > 0
    assert res["env"]["torch"] == torch.__version__ and res["env"]["torch_threads"] == 1
    assert len(res["rows"]) == len(names) * 2
    for r in res["rows"]:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert len(r["times_s"]) == 2 and all(t > 0 for t in r["times_s"])
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["frames_per_s"] == pytest.approx(r["input_frames_valid"] / r["median_s"])
        assert r["input_frames_valid"] == sum(res["batch"]["lengths"])
        assert r["gflops_per_s"] == pytest.approx(r["gflop"] / r["median_s"])
        assert 0 < r["mfu"] < 2.0  # MFU against the measured peak (noise may push a tiny case near 1)
        if r["impl"] in ("ours", "espnet"):
            assert r["peak_mem_bytes"] > 0 and r["mem_detail"]["peak_reset"] in (True, False)
        else:
            assert r["peak_mem_bytes"] is None
        if "espnet" in names:
            assert r["speedup_vs_espnet"] > 0
    by = {(r["impl"], r["mode"]): r for r in res["rows"]}
    # training costs 3x the forward FLOPs and needs more memory than the forward
    assert by[("ours", "fwdbwd")]["gflop"] == pytest.approx(3 * by[("ours", "fwd")]["gflop"])
    assert by[("ours", "fwdbwd")]["peak_mem_bytes"] > by[("ours", "fwd")]["peak_mem_bytes"] > 0
    if "espnet" in names:
        assert by[("espnet", "fwd")]["speedup_vs_espnet"] == 1.0
        assert by[("espnet", "fwd")]["gflop"] == by[("ours", "fwd")]["gflop"]


@needs_espnet
def test_outputs_agree_before_timing(tiny_result):
    res, _ = tiny_result
    pairs = {(a["a"], a["b"]): a for a in res["agreement"]}
    assert ("ours", "espnet") in pairs
    if REFS["returnn"]:
        assert {("ours_layers", "returnn_layers"), ("ours_conv6", "returnn_conv6")} <= set(pairs)
    for a in pairs.values():
        assert a["ok"] and a["max_abs"] <= 1e-4 and a["ref_max_abs"] > 0.1


@needs_espnet
def test_disagreement_stops_the_benchmark():
    impls = build_impls(get_preset("tiny"), ["ours", "espnet"])
    assert check_agreement(impls, 1e-4)[0]["ok"]
    with torch.no_grad():
        impls["ours"].module.layers[0].ffn1.linear_ff.bias.add_(1e-2)
    with pytest.raises(AssertionError, match="disagree"):
        check_agreement(impls, 1e-4)


@needs_espnet
def test_masked_padding_is_checked_on_full_length_rows():
    impls = build_impls(get_preset("tiny"), ["ours", "espnet"], padding="masked")
    (res,) = check_agreement(impls, 1e-4, padding="masked")
    assert res["ok"] and res["rows"] == [0]  # only row 0 has no padding
    with pytest.raises(AssertionError, match="disagree"):  # padded rows differ from ESPnet 202511 by design
        check_agreement(impls, 1e-4)


def test_files_are_written(tiny_result):
    res, paths = tiny_result
    assert set(paths) == {"json", "md", "png"}
    with open(paths["json"]) as f:
        assert json.load(f)["rows"] == json.loads(json.dumps(res["rows"]))
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(paths["md"]) as f:
        md = f.read()
    assert "forward (eval, no grad)" in md and "forward+backward (train)" in md and "MFU" in md
    for name in res["impls"]:
        assert f"| {name} |" in md
    # the report says when our forward ran as row groups in threads: never with one thread
    assert res["env"]["row_groups"] == cpu_threads.available() and "groups of rows" not in md
    two = {**res, "env": {**res["env"], "torch_threads": 2}}
    assert ("groups of rows" in markdown(two)) == cpu_threads.available()


@pytest.mark.parametrize("kind", ["conv2d", "conv2d6", "conv2d8"])
def test_flop_formula_matches_flop_counter_ours(kind):
    conf = {**PRESETS["tiny"].encoder_conf, "input_layer": kind}
    from ebranchformer.interop.espnet import load_espnet_encoder

    enc = load_espnet_encoder(conf, 80).eval().set_fast_path(False)  # plain path: every matmul is visible
    x, n = torch.randn(2, 150, 80), torch.tensor([150, 120])
    counted = _flop_count(lambda: enc(x, n))
    formula = espnet_conf_flops(conf, 80, 2, 150)["total"]
    assert formula == pytest.approx(counted, rel=0.03)


@needs_espnet
def test_flop_formula_matches_flop_counter_espnet():
    impls = build_impls(get_preset("tiny"), ["espnet"], share_weights=False)
    e = impls["espnet"]
    e.set_train(False)
    assert e.flops["total"] == pytest.approx(_flop_count(e.forward), rel=0.03)


def test_flop_formula_matches_flop_counter_layers_and_conv6():
    impls = build_impls(get_preset("tiny"), ["ours_layers", "ours_conv6"], share_weights=False)
    for impl in impls.values():
        impl.module.eval().set_fast_path(False)
        assert impl.flops["total"] == pytest.approx(_flop_count(impl.forward), rel=0.03)
    assert impls["ours_layers"].flops["frontend"] == 0
    # conv6 by hand: 3x3 convs 1->32 on (T, 80), 32->64 at T/3 x 40, 64->64 at T/6 x 40, projection 2560 -> 64
    t = 160
    t3, t6 = math.ceil(t / 3), math.ceil(math.ceil(t / 3) / 2)
    by_hand = 3 * 2 * (32 * 9 * t * 80 + 64 * 32 * 9 * t3 * 40 + 64 * 64 * 9 * t6 * 40 + t6 * 2560 * 64)
    assert impls["ours_conv6"].flops["frontend"] == by_hand
    assert CONV6["out_dims"] == [32, 64, 64]


def test_flop_formula_components():
    f = encoder_flops(batch=2, frames=10, in_dim=8, d=8, heads=2, layers=1, ff_dim=16, cgmlp_ff_dim=4,
                      cgmlp_kernel=3, merge_kernel=5, frontend=None)  # fmt: skip
    assert f["frames_out"] == 10 and f["frontend"] == 0
    assert f["ffn"] == 2 * 4 * 2 * 10 * 8 * 16
    assert f["attn_scores"] == 4 * 2 * 10 * 10 * 8 and f["attn_pos"] == 2 * 2 * 10 * 19 * 8
    assert f["cgmlp"] == 6 * 2 * 10 * 8 * 4 + 2 * 2 * 10 * 4 * 3
    assert f["merge"] == 4 * 2 * 10 * 8 * 5 + 4 * 2 * 10 * 8 * 8
    assert f["total"] == sum(v for k, v in f.items() if k not in ("total", "frames_out"))
    # the T^2 terms take half of the FLOPs at the crossover length, less before it
    conf = PRESETS["ls100"].encoder_conf
    t = quadratic_crossover_frames(conf, 80)
    for frames, above in ((t, True), (t - 8, False)):
        g = espnet_conf_flops(conf, 80, 1, frames)
        assert ((g["attn_scores"] + g["attn_pos"]) / g["total"] >= 0.5) == above


@pytest.mark.skipif(not REFS["returnn"], reason="returnn is not installed")
def test_cpu_memory_child_returnn():
    spec = dict(preset="tiny", impl="returnn_conv6", mode="fwdbwd", threads=1, autocast=None, padding="masked",
                seed=0, frames=None, batch=None)  # fmt: skip
    (m,) = cpu_peak_rss([spec], jobs=2)
    assert m["peak_reset"] and m["peak_bytes"] > 0
    assert m["peak_bytes"] == m["rss_run_bytes"] - m["rss_baseline_bytes"]


def test_matmul_peak_measures_something():
    p = matmul_peak("cpu", torch.float32, n=256, repeats=2, min_seconds=0.01)
    assert p["gflops"] > 0 and p["n"] == 256 and len(p["samples"]) == 2
    assert "mm" in p["kernels"] and p["gflops"] == max(p["kernels"].values())


@needs_espnet
def test_bf16_reports_deviation_and_ratio_against_espnet_fp32():
    opts = BenchOptions(preset="tiny", threads=1, dtype="bf16", repeats=1, warmup=1, memory=False,
                        impls=["ours", "ours_fp32", "espnet"], modes=["fwd"], peak_n=512)  # fmt: skip
    res = run_benchmark(opts)
    dev = res["bf16_deviation"]
    assert 0 < dev["mean_abs"] <= dev["max_abs"] < 1.0  # bf16 rounding, but not garbage
    by = {r["impl"]: r for r in res["rows"]}
    assert by["ours"]["dtype"] == "bf16" and by["ours_fp32"]["dtype"] == "fp32" and by["espnet"]["dtype"] == "fp32"
    assert by["ours"]["mfu"] == pytest.approx(by["ours"]["gflops_per_s"] / res["peak"]["bf16"]["gflops"])
    assert by["ours"]["speedup_vs_espnet"] == pytest.approx(by["espnet"]["median_s"] / by["ours"]["median_s"])
    assert by["ours_fp32"]["peer"] == "ours" and by["ours_fp32"]["speedup_vs_peer"] > 0
    assert "bf16 autocast vs fp32" in markdown(res)


@needs_espnet
def test_sweep(tmp_path):
    opts = BenchOptions(preset="tiny-long", threads=1, repeats=1, warmup=1, seconds=[1.0, 2.0], mem_jobs=2, peak_n=512)
    res = run_benchmark(opts)
    paths = write_outputs(res, str(tmp_path))
    assert res["impls"] == ["ours", "espnet"] and res["modes"] == ["fwd"]
    assert [a["length_s"] for a in res["agreement"]] == [1.0, 2.0] and all(a["ok"] for a in res["agreement"])
    rows = {(r["impl"], r["length_s"]): r for r in res["rows"]}
    assert set(rows) == {(n, s) for n in ("ours", "espnet") for s in (1.0, 2.0)}
    for (_, sec), r in rows.items():
        assert r["batch"] == 1 and r["input_frames_valid"] == int(sec * 100)
        # a 1-2 s forward of the tiny encoder can fit in pages the baseline process also touched: >= 0 per row
        assert isinstance(r["peak_mem_bytes"], int) and r["peak_mem_bytes"] >= 0 and 0 < r["quadratic_flop_share"] < 0.5
    assert max(r["peak_mem_bytes"] for r in rows.values()) > 0  # but the sweep does measure memory
    assert rows[("ours", 2.0)]["frames_out"] > rows[("ours", 1.0)]["frames_out"]
    assert res["quadratic_crossover"]["seconds"] > 2.0
    with open(paths["md"]) as f:
        assert "Long-utterance sweep" in f.read()
    with open(paths["png"], "rb") as f:
        assert f.read(4) == b"\x89PNG"


def test_cli(tmp_path, capsys):
    assert main(["--list"]) == 0
    assert "ls100" in capsys.readouterr().out
    out = tmp_path / "o"
    rc = main(["--preset", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--no-memory",
               "--impls", "ours", "--modes", "fwd", "--out", str(out), "-q", "--peak-n", "256"])  # fmt: skip
    assert rc == 0
    res = json.loads((out / "result.json").read_text())
    assert res["options"]["threads"] == 2 and [r["impl"] for r in res["rows"]] == ["ours"]
    assert res["rows"][0]["peak_mem_bytes"] is None and (out / "result.md").exists() and (out / "result.png").exists()
    assert main(["--preset", "tiny", "--impls", "nope", "--no-memory", "-q", "--out", str(out)]) == 2


def test_presets_and_lengths():
    assert PRESETS["ls100"].encoder_conf["output_size"] == 256 and PRESETS["ls100"].batch == (8, 2000)
    ls960 = PRESETS["ls960"]
    assert ls960.encoder_conf["num_blocks"] == 17 and ls960.encoder_conf["cgmlp_linear_units"] == 3072
    assert ls960.batch_for("cuda") == (16, 3000)
    assert PRESETS["long"].sweep_seconds == (5, 10, 20, 40, 80)
    assert all(p.encoder_conf["layer_drop_rate"] == 0.0 for p in PRESETS.values())
    n = batch_lengths(8, 2000, 0.8)
    assert n[0] == 2000 and n[-1] == 1600 and torch.all(n[:-1] >= n[1:])
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("ls9000")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run():
    res = run_benchmark(BenchOptions(preset="tiny", device="cuda", threads=None, dtype="bf16", repeats=2, warmup=1))
    for r in res["rows"]:
        assert r["peak_mem_bytes"] > 0 and r["median_s"] > 0
    assert "gpu" in res["env"]


def test_bf16_matmul_peak_includes_the_linear_kernel_our_layers_run():
    # under bf16 autocast inference our Linear runs oneDNN (native bf16, or float32 on bf16-rounded operands where
    # the CPU has no bf16 kernels); the peak includes it, and torch.mm's time stays bounded on any CPU
    t0 = time.perf_counter()
    p = matmul_peak("cpu", torch.bfloat16, n=256, repeats=2, min_seconds=0.01)
    assert time.perf_counter() - t0 < 30
    assert {"mm", "linear"} <= set(p["kernels"]) and p["gflops"] == max(p["kernels"].values()) > 0
    assert p["dtype"] == "bfloat16" and p["n"] == 256
