"""The ``ebranchformer`` command line: ``demo``, ``train``, ``transcribe``, ``evaluate``, ``info``, ``bench``,
``convert`` and ``export`` (``ebranchformer SUBCOMMAND --help`` for each).

Heavy imports (torch, the models) happen inside the subcommands, so ``ebranchformer --help`` stays quick.
User errors (a missing file, a bad option, a non-audio input) print one ``ebranchformer SUBCOMMAND: error:
...`` line on stderr and exit with status 2; set ``EBRANCHFORMER_DEBUG=1`` to see the traceback instead.

Example:
    $ ebranchformer demo --seed 0 --out runs/demo
    $ ebranchformer transcribe runs/demo/model a.wav b.wav --beam 4
    $ ebranchformer evaluate runs/demo/model --manifest runs/demo/corpus/test_heldout.jsonl --json wer.json
    $ ebranchformer info runs/demo/model --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]

_DEBUG_ENV = "EBRANCHFORMER_DEBUG"
_LEXICON_DEFAULT_BEAM = 8


class CLIError(Exception):
    """A user error detected by the CLI itself (printed without a traceback)."""


# -- helpers --------------------------------------------------------------------------------------------------
def _arg_type(convert, ok, expected: str):
    """An argparse ``type``: ``convert(text)``, accepted when ``ok(value)``; else "expected {expected}"."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _arg_type(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _arg_type(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _arg_type(float, lambda v: 0 < v < float("inf"), "a positive number")


def _device(name: str):
    """A torch device for ``auto`` / ``cpu`` / ``cuda`` (clear error when CUDA is asked for but absent)."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: CUDA is not available on this machine")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def _load_model(model_dir: str, device: str):
    from ebranchformer.asr.model_dir import load_model

    return load_model(model_dir, map_location=_device(device))


def _lexicon(path: str | None, model):
    if path is None:
        return None
    from ebranchformer.asr.lexicon import Lexicon

    if model.tokenizer is None:
        raise CLIError("--lexicon needs a model directory with a tokenizer")
    return Lexicon.from_file(path, model.tokenizer)


def _beam(args: argparse.Namespace) -> int:
    if args.beam is not None:
        return args.beam
    return _LEXICON_DEFAULT_BEAM if getattr(args, "lexicon", None) else 1


def _manifest_audio(manifest: str) -> list[str]:
    from ebranchformer.asr.manifest import read_jsonl_manifest

    if not Path(manifest).is_file():
        raise CLIError(f"--manifest {manifest!r}: no such file")
    utts, skips = read_jsonl_manifest(manifest)
    if skips:
        print(f"warning: {manifest}: {skips}", file=sys.stderr)
    if not utts:
        raise CLIError(f"--manifest {manifest!r} holds no usable utterances")
    return [u.audio for u in utts]


# -- subcommands ----------------------------------------------------------------------------------------------
def _busy_cores(interval: float = 0.5, stat: str = "/proc/stat") -> float | None:
    """CPU cores kept busy by other processes right now: the non-idle share of /proc/stat's CPU time over
    ``interval`` seconds, times the core count (None where /proc/stat is missing)."""

    def sample() -> tuple[int, int]:
        with open(stat, encoding="ascii") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def _passive_openmp_when_busy() -> None:
    """Let idle OpenMP threads sleep instead of spin when other processes keep the CPUs busy.

    With OpenMP's default (spinning) barriers, 2-thread training on a 2-core machine where another process
    runs took 14.4 s per step instead of 0.46 s with one thread (docs/demo_tuning.md); sleeping barriers bring
    it back to single-thread speed. On an idle machine spinning is faster (15.4k vs 10.4k frames/s), so this
    only applies when other processes keep at least half a core busy at the start (measured over 0.5 s; the
    load average would also count a set-up step that just ended) and the user has not set OMP_WAIT_POLICY. It
    must run before torch starts its thread pool; the results do not depend on it.
    """
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return
    busy = _busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            return
    if busy >= 0.5:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.device != "cuda":
        _passive_openmp_when_busy()
    from ebranchformer.asr.demo import run_demo

    run_demo(seed=args.seed, out_dir=args.out, steps=args.steps, minutes=args.minutes, device=args.device,
             procs=args.procs, threads=args.threads, n_train=args.n_train, decoder=args.decoder, overrides=args.set)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import logging

    from ebranchformer.asr.train import train
    from ebranchformer.asr.train_config import load_train_config

    rank = int(os.environ.get("RANK", "0") or 0)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not Path(args.config).is_file():
        raise CLIError(f"training config {args.config!r}: no such file")
    config = load_train_config(args.config, overrides=args.set)
    result = train(config)
    if rank == 0:
        valid = result.final_valid or {}
        scores = (f"; final valid WER {100 * valid['wer']:.2f}% CER {100 * valid['cer']:.2f}%"
                  if "wer" in valid else "")
        print(f"done: {result.step} steps ({result.updates} updates, {result.skipped_steps} skipped as "
              f"non-finite), model in {result.model_dir}{scores}")
    return 0


def _cmd_transcribe(args: argparse.Namespace) -> int:
    paths = list(args.audio)
    if args.manifest:
        paths += _manifest_audio(args.manifest)
    if not paths:
        raise CLIError("nothing to transcribe: give audio files and/or --manifest")
    beam = _beam(args)
    if args.backend == "onnxruntime":
        if args.lexicon or args.precision != "fp32":
            raise CLIError("--lexicon and --precision work with --backend torch only")
        if args.device == "cuda":
            raise CLIError("--backend onnxruntime runs on the CPU here; drop --device cuda")
        try:
            from ebranchformer.asr.onnx_runtime import transcribe_onnx
        except ImportError as e:
            raise CLIError(f"--backend onnxruntime is not available in this installation ({e}); "
                           "install the 'onnx' extra (pip install 'ebranchformer[onnx]')") from None
        for path in paths:  # check them first, so a bad file fails before any output
            _check_audio_file(path)
        pairs = transcribe_onnx(args.model_dir, paths, beam=beam, batch_size=args.batch_size)
        texts = [text for _, text in pairs]
    else:
        from ebranchformer.asr.recognize import transcribe_files

        model = _load_model(args.model_dir, args.device)
        texts = transcribe_files(model, paths, beam=beam, batch_size=args.batch_size,
                                 lexicon=_lexicon(args.lexicon, model), precision=args.precision)
    for path, text in zip(paths, texts):
        print(f"{path}\t{text}")
    return 0


def _check_audio_file(path: str) -> None:
    import soundfile as sf

    from ebranchformer.asr.audio import AudioError

    if not os.path.isfile(path):
        raise AudioError(f"audio file not found: {path!r}")
    try:
        sf.info(path)
    except Exception as e:  # libsndfile's errors for non-audio files
        raise AudioError(f"cannot read {path!r} as audio: {e}") from None


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ebranchformer.asr.recognize import compare_precisions, recognize_manifest

    if not Path(args.manifest).is_file():
        raise CLIError(f"--manifest {args.manifest!r}: no such file")
    model = _load_model(args.model_dir, args.device)
    lexicon = _lexicon(args.lexicon, model)
    beam = _beam(args)
    opts = {"beam": beam, "batch_size": args.batch_size, "lexicon": lexicon}
    if args.precision == "both":
        comparison = compare_precisions(model, args.manifest, **opts)
        results = {"fp32": comparison.fp32, "bf16": comparison.bf16}
    else:
        comparison = None
        results = {args.precision: recognize_manifest(model, args.manifest, precision=args.precision, **opts)}
    decoder = f"lexicon beam {beam}" if lexicon is not None else ("greedy" if beam == 1 else f"beam {beam}")
    first = next(iter(results.values()))
    if first.skipped:
        print(f"warning: {args.manifest}: {first.skipped}", file=sys.stderr)
    # with --precision both, hypotheses and results are labelled by precision
    labels = {p: ("" if comparison is None else f" {p}") for p in results}
    for k, ref in enumerate(first.refs[: args.show]):
        print(f"REF: {ref}")
        for p, result in results.items():
            print(f"HYP{labels[p]}: {result.hyps[k]}")
    for precision, result in results.items():
        label = decoder if comparison is None else f"{decoder}, {precision}"
        print(f"WER: {100 * result.wer:.2f}%  CER: {100 * result.cer:.2f}%  ({len(result.ids)} utterances, {label})")
    if comparison is not None:
        c = comparison
        print(f"bf16 vs fp32: {len(c.differ)} of {len(first.ids)} hypotheses differ, {c.frames_differ} of "
              f"{c.frames} frames change their most likely token; log-probabilities max abs difference "
              f"{c.log_prob_max_abs:.3g}, mean {c.log_prob_mean_abs:.3g}")
    if args.json:
        doc = {"model_dir": args.model_dir, "manifest": args.manifest, "decoder": decoder, "beam": beam,
               "lexicon": args.lexicon}
        doc.update(first.to_dict() if comparison is None else comparison.to_dict())
        if args.hyps:  # "hyp", or "hyp_fp32" and "hyp_bf16"
            keys = {p: "hyp" + labels[p].replace(" ", "_") for p in results}
            doc["hyps"] = [{"id": i, "ref": r, **{keys[p]: res.hyps[k] for p, res in results.items()}}
                           for k, (i, r) in enumerate(zip(first.ids, first.refs))]
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from ebranchformer.info import model_info

    report = model_info(args.path, seconds=args.seconds, vocab_size=args.vocab_size)
    print(report.format())
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    if args.source == "espnet":
        try:
            from ebranchformer.interop.espnet_experiment import convert_espnet_experiment
        except ImportError as e:
            raise CLIError(f"convert espnet is not available in this installation ({e})") from None
        out = convert_espnet_experiment(args.config, args.checkpoint, args.out, stats=args.stats,
                                        overwrite=args.overwrite)
        print(f"wrote the model directory {out}")
    else:
        try:
            from ebranchformer.interop.returnn_experiment import convert_returnn_checkpoint
        except ImportError as e:
            raise CLIError(f"convert returnn is not available in this installation ({e})") from None
        out = convert_returnn_checkpoint(args.checkpoint, args.encoder_options, args.out, overwrite=args.overwrite)
        print(f"wrote the encoder directory {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        from ebranchformer.interop.export import export_model
    except ImportError as e:
        raise CLIError(f"export is not available in this installation ({e})") from None
    out = export_model(args.model_dir, args.out, format=args.format, part=args.part, check=not args.no_check)
    print(f"wrote {out}")
    return 0


# -- the parser -----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``ebranchformer`` argument parser (``bench`` is passed through to ``ebranchformer.bench``)."""
    p = argparse.ArgumentParser(prog="ebranchformer",
                                description="E-Branchformer speech recognition: demo, training, recognition, "
                                "model info, benchmarks, conversion and export.")
    sub = p.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    d = sub.add_parser("demo", formatter_class=fmt, help="offline demo: synthesize speech, train, evaluate",
                       description="Synthesize a speech corpus with espeak-ng, train a small E-Branchformer CTC "
                       "recognizer (on the GPU when present, else on 2 CPU threads) and evaluate it on held-out "
                       "voices. "
                       "The last line printed is 'held-out WER: X.X%%'.")
    d.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the corpus, data order and model")
    d.add_argument("--out", default="runs/demo", help="output directory (corpus, model, plot, summary.json)")
    d.add_argument("--steps", type=_positive_int, default=None,
                   help="training steps (default: the demo's fixed, deterministic count)")
    d.add_argument("--minutes", type=_positive_float, default=None,
                   help="also stop training after this many minutes of wall-clock time (not deterministic)")
    d.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train")
    d.add_argument("--threads", type=_positive_int, default=2, help="torch threads on the CPU (per process)")
    d.add_argument("--procs", type=_positive_int, default=1,
                   help="CPU training processes (DistributedDataParallel over gloo); 1 trains in this process")
    d.add_argument("--n-train", type=_positive_int, default=None, help="training utterances to synthesize")
    d.add_argument("--decoder", choices=("lexicon", "greedy"), default="lexicon",
                   help="decoder of the last line: the closed-vocabulary lexicon search or plain greedy CTC")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the training recipe, e.g. --set optim.lr=0.001 (repeatable)")
    d.set_defaults(func=_cmd_demo)

    t = sub.add_parser("train", formatter_class=fmt, help="train a CTC model from a YAML config (torchrun too)",
                       description="Train a CTC recognizer from a TrainConfig YAML (see "
                       "ebranchformer.asr.train_config). Works alone or under torchrun "
                       "(torchrun --nproc_per_node N $(which ebranchformer) train CONFIG.yaml).")
    t.add_argument("config", help="training config YAML")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=0.001 (VALUE parsed as YAML; repeatable)")
    t.set_defaults(func=_cmd_train)

    tr = sub.add_parser("transcribe", formatter_class=fmt, help="transcribe audio files (path<TAB>text)",
                        description="Transcribe audio files with a model directory; prints 'path<TAB>text' per "
                        "input, in input order.")
    tr.add_argument("model_dir", help="model directory (or, with --backend onnxruntime, one with model.ctc.onnx "
                    "or the .onnx file)")
    tr.add_argument("audio", nargs="*", help="audio files (wav, flac, ...; resampled to the model's rate)")
    tr.add_argument("--manifest", help="also transcribe the audio of this JSONL manifest")
    tr.add_argument("--beam", type=_positive_int, default=None,
                    help="1: greedy; >1: CTC prefix beam search (default 1; 8 with --lexicon)")
    tr.add_argument("--lexicon", metavar="WORDS.txt", help="closed-vocabulary decoding: only words of this "
                    "word list (one per line) come out (ebranchformer.asr.lexicon)")
    tr.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run the model")
    tr.add_argument("--batch-size", type=_positive_int, default=16, help="utterances per forward pass")
    tr.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: run the model under bfloat16 autocast (torch backend)")
    tr.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                    help="run the model with PyTorch or an exported ONNX CTC model under onnxruntime")
    tr.set_defaults(func=_cmd_transcribe)

    ev = sub.add_parser("evaluate", formatter_class=fmt, help="WER/CER of a model on a manifest",
                        description="Transcribe a JSONL manifest and print the corpus WER and CER (jiwer).")
    ev.add_argument("model_dir", help="model directory")
    ev.add_argument("--manifest", required=True, help="JSONL manifest with audio and reference text")
    ev.add_argument("--beam", type=_positive_int, default=None,
                    help="1: greedy; >1: CTC prefix beam search (default 1; 8 with --lexicon)")
    ev.add_argument("--lexicon", metavar="WORDS.txt", help="closed-vocabulary decoding with this word list")
    ev.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run the model")
    ev.add_argument("--batch-size", type=_positive_int, default=16, help="utterances per forward pass")
    ev.add_argument("--precision", choices=("fp32", "bf16", "both"), default="fp32",
                    help="bf16: run the model under bfloat16 autocast; both: decode in fp32 and in bf16 and "
                    "report both, with the hypotheses and frames that differ")
    ev.add_argument("--json", metavar="OUT.json", help="also write the results to this JSON file")
    ev.add_argument("--hyps", action="store_true", help="with --json: include every reference and hypothesis")
    ev.add_argument("--show", type=_nonneg_int, default=0, help="print the first N reference/hypothesis pairs")
    ev.set_defaults(func=_cmd_evaluate)

    inf = sub.add_parser("info", formatter_class=fmt, help="parameters, frame rate and GFLOPs of a model",
                         description="Parameters per module, the encoder output frame rate and the GFLOPs of "
                         "one forward pass, for a model directory, an encoder directory, or a YAML config (a "
                         "TrainConfig or a ModelConfig).")
    inf.add_argument("path", help="model directory, encoder directory or config YAML")
    inf.add_argument("--seconds", type=_positive_float, default=10.0, help="utterance length for the GFLOPs")
    inf.add_argument("--vocab-size", type=_positive_int, default=None,
                     help="CTC vocabulary size for a config that leaves it to the tokenizer (default: 32)")
    inf.set_defaults(func=_cmd_info)

    sub.add_parser("bench", add_help=False, help="encoder benchmark (ebranchformer bench --help)")

    cv = sub.add_parser("convert", help="convert an ESPnet experiment or a RETURNN checkpoint",
                        description="Convert an ESPnet experiment into a model directory, or a RETURNN "
                        "checkpoint into an encoder directory.")
    cvs = cv.add_subparsers(dest="source", metavar="SOURCE", required=True)
    ce = cvs.add_parser("espnet", formatter_class=fmt, help="ESPnet E-Branchformer experiment -> model directory",
                        description="Convert an ESPnet E-Branchformer CTC/attention experiment (config.yaml + "
                        "checkpoint) into a model directory (encoder, CTC head, frontend, normalization, "
                        "tokenizer).")
    ce.add_argument("--config", required=True, help="the experiment's config.yaml")
    ce.add_argument("--checkpoint", required=True, help="the checkpoint, e.g. valid.acc.ave.pth")
    ce.add_argument("--out", required=True, help="the model directory to write")
    ce.add_argument("--stats", help="feats_stats.npz instead of the config's normalize_conf.stats_file")
    ce.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ce.set_defaults(func=_cmd_convert)
    cr = cvs.add_parser("returnn", formatter_class=fmt, help="RETURNN checkpoint -> encoder directory",
                        description="Write the E-Branchformer/Conformer encoder of a RETURNN checkpoint as an "
                        "encoder directory.")
    cr.add_argument("--checkpoint", required=True, help="the RETURNN checkpoint (.pt)")
    cr.add_argument("--encoder-options", required=True, help="YAML file of the encoder options")
    cr.add_argument("--out", required=True, help="the encoder directory to write")
    cr.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    cr.set_defaults(func=_cmd_convert)

    ex = sub.add_parser("export", formatter_class=fmt, help="export a model to ONNX or torch.export",
                        description="Export the encoder or the whole CTC model (features to log-probs) of a "
                        "model directory (or an encoder directory) to ONNX or a torch.export program.")
    ex.add_argument("model_dir", help="model directory or encoder directory")
    ex.add_argument("--format", choices=("onnx", "torch-export"), default="onnx", help="output format")
    ex.add_argument("--part", choices=("encoder", "ctc"), default="encoder",
                    help="encoder: features -> encoder output; ctc: features -> CTC log-probs")
    ex.add_argument("--out", required=True, help="the file to write")
    ex.add_argument("--no-check", action="store_true", help="skip running the export against PyTorch")
    ex.set_defaults(func=_cmd_export)
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    return (CLIError, ValueError, TypeError, OSError, ImportError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from ebranchformer.bench import main as bench_main

        return int(bench_main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ebranchformer.asr.demo import DEFAULT_N_TRAIN, DEFAULT_STEPS

        args.steps = DEFAULT_STEPS if args.steps is None else args.steps
        args.n_train = DEFAULT_N_TRAIN if args.n_train is None else args.n_train
    name = args.command + (f" {args.source}" if args.command == "convert" else "")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"ebranchformer {name}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if os.environ.get(_DEBUG_ENV):
            raise
        msg = str(e) or type(e).__name__
        print(f"ebranchformer {name}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
