"""The offline demo: synthesize a speech corpus with espeak-ng, train a small E-Branchformer CTC recognizer,
evaluate it on voices it never heard. ``ebranchformer demo`` (and ``make demo``) run :func:`run_demo`.

Steps, all under ``out_dir``:

1. ``corpus/``: :func:`~ebranchformer.asr.synth.synthesize_corpus` with :func:`demo_corpus_config` (the
   built-in 231-word vocabulary, sentences of 3-8 words, 10 training voices and 3 held-out ones, 130-220
   words per minute, pitch and intonation drawn per utterance, white/pink noise at 10-30 dB SNR, 16 kHz;
   8000 training utterances, 4.6 h). A complete corpus of the same config and seed is reused.
2. ``train.yaml``: the recipe (:func:`demo_train_config`, a :class:`~ebranchformer.asr.train_config.TrainConfig`),
   then training with :class:`~ebranchformer.asr.train.Trainer` on the CPU (2 threads; or ``procs``
   DistributedDataParallel processes) or on the GPU when there is one: ``checkpoints/``, ``metrics.jsonl``,
   ``learning_curves.png`` and the model directory ``model/`` (the average of the 2 best checkpoints).
3. Evaluation of ``model/`` on ``test_heldout`` (new sentences, held-out voices) and ``test_seen`` (new
   sentences, training voices) with greedy decoding, and with the closed-vocabulary lexicon search
   (:mod:`ebranchformer.asr.lexicon`, word list ``lexicon.txt``); a few reference/hypothesis pairs are
   printed, everything goes to ``summary.json``.

The last line printed is ``held-out WER: X.X%``: the held-out WER of the demo's decoder (``decoder``,
default ``"lexicon"``; ``"greedy"`` reports plain CTC greedy decoding).

Training runs a fixed number of optimizer steps (:data:`DEFAULT_STEPS`), sized so that the whole demo fits
its time budget on a 2-core CPU (docs/demo_tuning.md); with the same seed (and device, threads and processes)
the run is deterministic: seeded corpus, data order and initialization, deterministic kernels, 2 CPU threads.
``minutes`` additionally stops training at a wall-clock budget (then the result depends on the machine's
speed; the summary records the steps done).

Example:
    >>> summary = run_demo(seed=0, out_dir="runs/demo")  # doctest: +SKIP
    >>> summary["test_heldout"]["lexicon"]["wer"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DECODERS",
    "DEFAULT_N_TRAIN",
    "DEFAULT_STEPS",
    "demo_corpus_config",
    "demo_train_config",
    "run_demo",
]

DEFAULT_STEPS = 1300
"""Optimizer steps of the default demo (see docs/demo_tuning.md for how it was sized)."""

DEFAULT_N_TRAIN = 8000
"""Training utterances the default demo synthesizes."""

DECODERS = ("lexicon", "greedy")
"""What the last line reports: the lexicon-constrained beam search, or plain greedy CTC decoding."""

_LEXICON_BEAM = 32
_TRAIN_OUTPUTS = ("checkpoints", "model", "tokenizer", "metrics.jsonl", "learning_curves.png",
                  "feats_stats.npz", "feats_stats.json", "config.yaml", "train.yaml", "summary.json", "lexicon.txt")


def demo_corpus_config(n_train: int = DEFAULT_N_TRAIN, num_workers: int = 2, **overrides: Any):
    """The demo corpus: :class:`~ebranchformer.asr.synth.CorpusConfig`'s defaults (the spec above) with
    ``n_train`` training utterances, 200 valid, 200 test_seen and 300 test_heldout; ``overrides`` are other
    CorpusConfig fields."""
    from ebranchformer.asr.synth import CorpusConfig

    fields = {"n_train": n_train, "n_valid": 200, "n_test_seen": 200, "n_test_heldout": 300,
              "num_workers": num_workers, **overrides}
    return CorpusConfig(**fields)


def demo_train_config(out_dir: str | os.PathLike, corpus_dir: str | os.PathLike, *, seed: int = 0,
                      steps: int = DEFAULT_STEPS, device: str = "auto") -> dict[str, Any]:
    """The demo's training recipe as a :class:`~ebranchformer.asr.train_config.TrainConfig` dict.

    A 6-layer E-Branchformer (D=144, 4 heads, FFN 576, cgMLP gate 288 with kernel 7, merge kernel 3; 3.7 M
    parameters) on 80 log-mel features (ESPnet preset, global MVN), 4-frame stacking (25 encoder frames per
    second), character CTC with interCTC after layer 3 (weight 0.3), no dropout and no SpecAugment (the model
    underfits in this budget), AdamW (lr 2e-3, weight decay 0.01) with 10 % linear warm-up and cosine decay over
    ``steps`` steps, batches of 4000 padded feature frames (about 18 utterances); validation every ``steps/5``
    steps and the 2 best checkpoints (by validation loss) averaged. docs/demo_tuning.md has the experiments.
    """
    d = 144
    corpus = Path(corpus_dir)
    every = max(1, steps // 5)
    return {
        "output_dir": str(out_dir),
        "data": {"train": str(corpus / "train.jsonl"), "valid": str(corpus / "valid.jsonl"),
                 "max_frames": 4000, "num_buckets": 10, "num_workers": 0},
        "tokenizer": {"kind": "char"},
        "model": {
            "features": {"preset": "espnet", "n_mels": 80},
            "specaug": None,
            "encoder": {
                "out_dim": d, "num_layers": 6, "num_heads": 4,
                "input_layer": {"class": "FrameStacking", "factor": 4},
                "encoder_layer": {"class": "EBranchformerLayer", "ff_dim": 4 * d, "cgmlp_ff_dim": 2 * d,
                                  "cgmlp_conv_kernel": 7, "merge_conv_kernel": 3, "norm_eps": 1e-12},
                "input_embedding_scale": math.sqrt(d), "final_norm": True,
                "dropout": 0.0, "att_dropout": 0.0, "input_dropout": 0.0,
                "interctc_layers": [3],
            },
            "interctc_weight": 0.3,
        },
        "optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 1e-2, "scheduler": "warmup_cosine",
                  "warmup_steps": max(1, steps // 10), "min_lr_ratio": 0.02, "total_steps": steps,
                  "grad_clip": 5.0},
        "checkpoint": {"every_steps": every, "keep_last": 2, "average_best": 2, "average_by": "valid_loss",
                       "resume": False},
        "log": {"every_steps": max(1, min(25, steps // 10)), "progress_bar": False, "plot": True},
        "precision": "fp32",
        "seed": seed,
        "deterministic": True,
        "device": device,
    }


@contextlib.contextmanager
def _deterministic_torch(threads: int, device_is_cpu: bool) -> Iterator[None]:
    """Deterministic kernels and a fixed CPU thread count for the demo (restored afterwards)."""
    import torch

    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.get_num_threads())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)  # CTC's CUDA backward has no deterministic kernel
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    if device_is_cpu:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        torch.set_num_threads(saved[4])


def _clear_previous_run(out: Path) -> None:
    """Remove what an earlier demo run wrote into ``out`` (the corpus stays: it is reused when it matches)."""
    for name in _TRAIN_OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _demo_trainer_class():
    from ebranchformer.asr.train import Trainer

    class DemoTrainer(Trainer):
        """The library's Trainer, plus a progress line per log record and an optional wall-clock deadline
        (training stops as if the data had run out; all ranks agree on the step)."""

        deadline: float | None = None  # time.time() after which no step starts
        progress: Callable[[str], None] | None = None

        def train_step(self, stream, model):
            if self.deadline is not None and self.ctx.all_min(int(time.time() < self.deadline)) == 0:
                return None
            return super().train_step(stream, model)

        def _log_train(self, window):
            super()._log_train(window)
            if self.ctx.is_main and self.progress is not None and window:
                loss = sum(w["loss"] for w in window) / len(window)
                fps = sum(w["frames_per_s"] for w in window) / len(window)
                self.progress(f"[demo] step {self.step}/{self.max_steps}  loss {loss:7.2f}  "
                              f"lr {window[-1]['lr']:.2e}  {fps:6.0f} frames/s  "
                              f"{(time.perf_counter() - self.started) / 60:4.1f} min")

    return DemoTrainer


def _train_here(config, deadline: float | None, progress: Callable[[str], None] | None) -> dict[str, Any]:
    """Train in this process; returns the facts of the TrainResult the demo reports."""
    from ebranchformer.asr.distributed import setup_distributed

    ctx = setup_distributed(config.device)
    try:
        trainer = _demo_trainer_class()(config, ctx)
        trainer.deadline, trainer.progress, trainer.started = deadline, progress, time.perf_counter()
        r = trainer.run()
    finally:
        ctx.close()
    return {"step": r.step, "updates": r.updates, "epoch": r.epoch, "averaged_steps": r.averaged_steps,
            "final_valid": r.final_valid, "model_dir": str(r.model_dir)}


def _ddp_worker(rank: int, world: int, port: int, config_yaml: str, deadline: float | None, threads: int,
                result_path: str) -> None:
    """One CPU training process of :func:`_train_ddp` (rank ``rank`` of ``world``, gloo on localhost)."""
    import torch

    from ebranchformer.asr.train_config import TrainConfig

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    config = TrainConfig.from_yaml(config_yaml)
    with _deterministic_torch(threads, True):
        torch.set_num_threads(threads)
        facts = _train_here(config, deadline, (lambda line: print(line, flush=True)) if rank == 0 else None)
    if rank == 0:
        Path(result_path).write_text(json.dumps(facts), encoding="utf-8")


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _train_ddp(config, procs: int, threads: int, deadline: float | None, out: Path) -> dict[str, Any]:
    """Train with ``procs`` CPU processes (DistributedDataParallel over gloo), ``threads`` torch threads each."""
    import torch.multiprocessing as mp

    result_path = out / ".demo_train_result.json"
    result_path.unlink(missing_ok=True)
    try:
        mp.start_processes(_ddp_worker, args=(procs, _free_port(), config.to_yaml(), deadline, threads,
                                              str(result_path)),
                           nprocs=procs, join=True, start_method="spawn")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:  # a child's traceback is in the message; keep its last line
        last = [line for line in str(e).strip().splitlines() if line.strip()][-1]
        raise RuntimeError(f"a training process failed: {last}") from None
    facts = json.loads(result_path.read_text(encoding="utf-8"))
    result_path.unlink()
    return facts


def _check_args(seed: int, steps: int, minutes: float | None, device: str, procs: int, threads: int,
                n_train: int, decoder: str) -> None:
    for name, value, lo in (("seed", seed, 0), ("steps", steps, 1), ("procs", procs, 1), ("threads", threads, 1),
                            ("n_train", n_train, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float))
                                or not math.isfinite(minutes) or minutes <= 0):
        raise ValueError(f"minutes must be a number > 0 or None, got {minutes!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")


def _load() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def run_demo(
    seed: int = 0,
    out_dir: str | os.PathLike = "runs/demo",
    *,
    steps: int = DEFAULT_STEPS,
    minutes: float | None = None,
    device: str = "auto",
    procs: int = 1,
    threads: int = 2,
    n_train: int = DEFAULT_N_TRAIN,
    decoder: str = "lexicon",
    overrides: Sequence[str] = (),
    corpus: dict[str, Any] | None = None,
    examples: int = 5,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo (module doc) and return its summary (also written to ``out_dir/summary.json``).

    Args:
        seed: seeds the corpus, the data order and the model. Default 0.
        out_dir: where everything goes (earlier training outputs there are replaced; the corpus is reused
            when its config and seed match). Default ``runs/demo``.
        steps: optimizer steps. Default :data:`DEFAULT_STEPS`.
        minutes: optional wall-clock budget for training; it stops early when spent (not deterministic).
        device: "auto" (the GPU when present), "cpu" or "cuda".
        procs: training processes on the CPU (DistributedDataParallel over gloo); 1 (default) trains in this
            process. Ignored on the GPU (one process).
        threads: torch threads per process on the CPU. Default 2.
        n_train: training utterances to synthesize. Default :data:`DEFAULT_N_TRAIN` (8000).
        decoder: what the last line reports, one of :data:`DECODERS`. Default "lexicon".
        overrides: ``section.field=value`` items applied to the training recipe (as ``train --set``).
        corpus: other :class:`~ebranchformer.asr.synth.CorpusConfig` fields (e.g. smaller test sets for tests).
        examples: reference/hypothesis pairs to print per test set.
        log: where progress lines go (default ``print``).
    """
    _check_args(seed, steps, minutes, device, procs, threads, n_train, decoder)
    import torch

    from ebranchformer.asr.evaluate import error_rates
    from ebranchformer.asr.lexicon import Lexicon
    from ebranchformer.asr.manifest import read_jsonl_manifest
    from ebranchformer.asr.model_dir import load_model
    from ebranchformer.asr.recognize import decode_log_probs, log_probs_batched, read_audio_files
    from ebranchformer.asr.synth import synthesize_corpus
    from ebranchformer.asr.synth_text import VOCABULARY
    from ebranchformer.asr.train_config import load_train_config

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    on_gpu = device != "cpu" and torch.cuda.is_available()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    load_start = _load()
    t_all = time.perf_counter()

    # the recipe first: a bad override fails before anything is synthesized
    import yaml

    recipe = demo_train_config(out, out / "corpus", seed=seed, steps=steps, device=device)
    (out / "train.yaml.new").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    try:
        config = load_train_config(out / "train.yaml.new", overrides=overrides)
    except (TypeError, ValueError) as e:
        msg = str(e).replace(f"{str(out / 'train.yaml.new')!r}: ", "")
        raise type(e)(f"the demo's training recipe{' with the overrides' if overrides else ''}: {msg}") from None
    finally:
        (out / "train.yaml.new").unlink()
    _clear_previous_run(out)
    (out / "train.yaml").write_text(config.to_yaml(), encoding="utf-8")  # the recipe with the overrides

    # 1. corpus
    t0 = time.perf_counter()
    corpus_cfg = demo_corpus_config(n_train=n_train, **{"num_workers": max(1, min(8, os.cpu_count() or 1)),
                                                         **(corpus or {})})
    log(f"[demo] synthesizing the corpus ({n_train} training utterances) into {out / 'corpus'} ...")
    manifests = synthesize_corpus(out / "corpus", corpus_cfg, seed=seed)
    timings["synthesis_s"] = time.perf_counter() - t0
    corpus_info = json.loads((out / "corpus" / "corpus.json").read_text())
    hours = {k: v["hours"] for k, v in corpus_info["splits"].items()}
    log(f"[demo] corpus ready in {timings['synthesis_s']:.0f} s: " +
        ", ".join(f"{k} {v['utterances']} utts / {v['hours'] * 60:.1f} min" for k, v in
                  corpus_info["splits"].items()))

    # 2. training
    procs = 1 if on_gpu else procs
    where = (f"GPU ({torch.cuda.get_device_name()})" if on_gpu else
             f"CPU ({procs} process{'es' if procs > 1 else ''} x {threads} thread{'s' if threads > 1 else ''})")
    log(f"[demo] training {config.optim.total_steps} steps on {where}"
        + (f", at most {minutes:g} min" if minutes else "") + " ...")
    deadline = time.time() + 60.0 * minutes if minutes else None
    t0 = time.perf_counter()
    if procs > 1:
        facts = _train_ddp(config, procs, threads, deadline, out)
    else:
        with _deterministic_torch(threads, not on_gpu):
            facts = _train_here(config, deadline, log)
    timings["training_s"] = time.perf_counter() - t0
    log(f"[demo] trained {facts['step']} steps in {timings['training_s']:.0f} s; model in {facts['model_dir']}")

    with _deterministic_torch(threads, not on_gpu):
        # 3. evaluation
        t0 = time.perf_counter()
        model = load_model(facts["model_dir"], map_location="cuda" if on_gpu else "cpu")
        lexicon = Lexicon(VOCABULARY, model.tokenizer)
        lexicon.save(out / "lexicon.txt")
        tests: dict[str, Any] = {}
        for split in ("test_heldout", "test_seen"):
            utts, _ = read_jsonl_manifest(manifests[split])
            refs = [u.text for u in utts]
            lps = log_probs_batched(model, read_audio_files(model, [u.audio for u in utts]), batch_size=32)
            res: dict[str, Any] = {}
            hyps_by: dict[str, list[str]] = {}
            for name, kwargs in (("greedy", {}), ("lexicon", {"lexicon": lexicon, "beam": _LEXICON_BEAM})):
                td = time.perf_counter()
                hyps = decode_log_probs(model, lps, **kwargs)
                wer, cer = error_rates(refs, hyps)
                res[name] = {"wer": wer, "cer": cer, "decode_s": time.perf_counter() - td}
                hyps_by[name] = hyps
            res["utterances"] = len(utts)
            res["examples"] = [{"ref": r, "greedy": g, "lexicon": x} for r, g, x in
                               list(zip(refs, hyps_by["greedy"], hyps_by["lexicon"]))[:examples]]
            tests[split] = res
        timings["evaluation_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_all

    for split, title in (("test_heldout", "held-out voices"), ("test_seen", "training voices, new sentences")):
        log(f"[demo] {split} ({title}), {tests[split]['utterances']} utterances:")
        for ex in tests[split]["examples"]:
            log(f"  REF: {ex['ref']}")
            log(f"  HYP: {ex['greedy']}" + ("" if ex["lexicon"] == ex["greedy"] else f"   (lexicon: {ex['lexicon']})"))
    log("[demo] decoder     split          WER      CER")
    for split in ("test_heldout", "test_seen"):
        for name in ("greedy", "lexicon"):
            r = tests[split][name]
            log(f"[demo] {name:10s}  {split:13s} {100 * r['wer']:6.1f}%  {100 * r['cer']:6.1f}%")
    summary = {
        "seed": seed,
        "device": where,
        "decoder": decoder,
        "steps": facts["step"],
        "updates": facts["updates"],
        "epochs": facts["epoch"],
        "averaged_steps": facts["averaged_steps"],
        "final_valid": facts["final_valid"],
        "test_heldout": tests["test_heldout"],
        "test_seen": tests["test_seen"],
        "timings_s": timings,
        "corpus_hours": hours,
        "corpus_utterances": {k: v["utterances"] for k, v in corpus_info["splits"].items()},
        "load_average_start": load_start,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_end": _load(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model_dir": facts["model_dir"],
        "learning_curves": str(out / "learning_curves.png"),
        "lexicon": str(out / "lexicon.txt"),
        "overrides": list(overrides),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    log(f"[demo] total {timings['total_s'] / 60:.1f} min (synthesis {timings['synthesis_s']:.0f} s, training "
        f"{timings['training_s']:.0f} s, evaluation {timings['evaluation_s']:.0f} s); summary in "
        f"{out / 'summary.json'}")
    log(f"held-out WER: {100 * tests['test_heldout'][decoder]['wer']:.1f}%")
    return summary
