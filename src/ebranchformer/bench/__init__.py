"""Side-by-side benchmark of our E-Branchformer encoder against ESPnet 202511 and RETURNN.

``python -m ebranchformer.bench --preset ls100`` (see ``--help`` and BENCHMARKS.md) builds each installed
implementation on the same ESPnet recipe config with the same weights, checks that their outputs agree, then
times forward (eval) and forward+backward (train) interleaved, measures peak memory, and reports frames/s,
achieved GFLOP/s and MFU against the measured matmul peak, as JSON, Markdown and a PNG chart.

Modules: :mod:`.presets` (cases), :mod:`.flops` (analytical FLOPs, matmul peak), :mod:`.impls` (the wrapped
implementations), :mod:`.measure` (timing, memory), :mod:`.runner` (the whole run), :mod:`.report` (outputs),
:mod:`.cli` (``main``).
"""

from .cli import main
from .flops import encoder_flops, espnet_conf_flops, matmul_peak
from .presets import PRESETS, Preset
from .runner import BenchOptions, run_benchmark

__all__ = [
    "PRESETS",
    "BenchOptions",
    "Preset",
    "encoder_flops",
    "espnet_conf_flops",
    "main",
    "matmul_peak",
    "run_benchmark",
]
