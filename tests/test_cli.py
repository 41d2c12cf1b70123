"""The ``ebranchformer`` command line: every subcommand's --help, transcribe (equal to ``CTCModel.transcribe``,
batched, bad audio), evaluate (WER/CER, JSON), info (a parameter table that adds up), demo/train argument
errors, and the console script itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ebranchformer.asr.ctc_model import CTCModel
from ebranchformer.asr.global_mvn import GlobalMVN
from ebranchformer.asr.lexicon import Lexicon
from ebranchformer.asr.model_config import ModelConfig
from ebranchformer.asr.tokenizer import CharTokenizer
from ebranchformer.cli import build_parser, main
from tests.asr.ctc_corpus import LETTERS, single_thread, tiny_model_config, write_tone_corpus

SUBCOMMANDS = ["demo", "train", "transcribe", "evaluate", "info", "convert", "convert espnet",
               "convert returnn", "export"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tone_corpus(tmp_path_factory.mktemp("corpus"), n_train=24, n_valid=6)


def _batches(manifest: Path, tok, size: int):
    from ebranchformer.asr.audio import load_audio
    from ebranchformer.asr.manifest import read_jsonl_manifest

    utts, _ = read_jsonl_manifest(manifest)
    items = [(torch.from_numpy(load_audio(u.audio, 8000)), torch.tensor(tok.encode(u.text))) for u in utts]
    for i in range(0, len(items), size):
        chunk = items[i : i + size]
        wav = torch.nn.utils.rnn.pad_sequence([w for w, _ in chunk], batch_first=True)
        toks = torch.nn.utils.rnn.pad_sequence([t for _, t in chunk], batch_first=True, padding_value=-1)
        yield (wav, torch.tensor([len(w) for w, _ in chunk]), toks, torch.tensor([len(t) for _, t in chunk]))


@pytest.fixture(scope="module")
def model_dir(corpus, tmp_path_factory):
    """A tiny model trained for a few dozen steps with the CTCModel API on the tone corpus, then saved."""
    train_manifest, _ = corpus
    tok = CharTokenizer.train([LETTERS])
    cfg = ModelConfig(vocab_size=tok.vocab_size, **tiny_model_config())
    torch.manual_seed(0)
    model = CTCModel(cfg, tokenizer=tok, normalizer=GlobalMVN(1, torch.zeros(23).numpy(), torch.ones(23).numpy()))
    opt = torch.optim.Adam(model.parameters(), lr=4e-3)
    batches = list(_batches(train_manifest, tok, 8))
    model.train()
    for _ in range(10):
        for wav, wl, toks, tl in batches:
            loss, _ = model(wav, wl, toks, tl)
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = tmp_path_factory.mktemp("model") / "model"
    model.eval().save(path)
    return path


def _audio(corpus) -> list[str]:
    from ebranchformer.asr.manifest import read_jsonl_manifest

    utts, _ = read_jsonl_manifest(corpus[1])
    return [u.audio for u in utts]


# -- help -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_every_subcommand_has_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([*sub.split(), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ebranchformer " + sub)


def test_top_level_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for sub in ("demo", "train", "transcribe", "evaluate", "info", "bench", "convert", "export"):
        assert sub in out


def test_bench_help_is_passed_through(capsys):
    pytest.importorskip("ebranchformer.bench")
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    assert "--preset" in capsys.readouterr().out


def test_console_script_help_is_fast_and_imports_no_torch():
    code = "import sys; from ebranchformer.cli import build_parser; build_parser().format_help(); " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- transcribe ---------------------------------------------------------------------------------------------------
def test_transcribe_prints_path_tab_text_equal_to_model_transcribe(model_dir, corpus, capsys):
    audio = _audio(corpus)
    assert main(["transcribe", str(model_dir), *audio, "--batch-size", "4", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    model = CTCModel.load(model_dir)
    expected = model.transcribe(audio)
    assert lines == [f"{p}\t{t}" for p, t in zip(audio, expected)]
    assert any(t for t in expected)  # the model learned something


def test_transcribe_manifest_and_beam(model_dir, corpus, capsys):
    audio = _audio(corpus)
    assert main(["transcribe", str(model_dir), "--manifest", str(corpus[1]), "--beam", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = CTCModel.load(model_dir).transcribe(audio, beam=4)
    assert lines == [f"{p}\t{t}" for p, t in zip(audio, expected)]


def test_transcribe_with_a_lexicon_gives_lexicon_words(model_dir, corpus, tmp_path, capsys):
    words = tmp_path / "words.txt"
    words.write_text("ab\nabc\ndcba\nbad\n")
    assert main(["transcribe", str(model_dir), *_audio(corpus)[:3], "--lexicon", str(words)]) == 0
    for line in capsys.readouterr().out.splitlines():
        _, text = line.split("\t")
        assert set(text.split()) <= {"ab", "abc", "dcba", "bad"}


def test_transcribe_and_evaluate_in_bf16(model_dir, corpus, capsys):
    from ebranchformer.asr.recognize import log_probs_batched, read_audio_files

    audio = _audio(corpus)[:4]
    assert main(["transcribe", str(model_dir), *audio, "--precision", "bf16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == audio
    model = CTCModel.load(model_dir)
    wavs = read_audio_files(model, audio)
    fp32, bf16 = log_probs_batched(model, wavs), log_probs_batched(model, wavs, precision="bf16")
    for a, b in zip(fp32, bf16):
        assert b.dtype == torch.float32 and a.shape == b.shape
        assert (a.exp() - b.exp()).abs().max() < 0.05  # posteriors within bf16 rounding of the fp32 ones
        assert not torch.equal(a, b)  # bf16 did run
    assert main(["evaluate", str(model_dir), "--manifest", str(corpus[1]), "--precision", "bf16"]) == 0
    assert "WER:" in capsys.readouterr().out
    assert main(["transcribe", str(model_dir), *audio, "--precision", "bf16", "--backend", "onnxruntime"]) == 2
    assert "--precision work with --backend torch only" in capsys.readouterr().err
    with pytest.raises(ValueError, match="precision must be one of"):
        log_probs_batched(model, wavs, precision="fp16")


def test_evaluate_compares_precisions(model_dir, corpus, tmp_path, capsys):
    from ebranchformer.asr.recognize import log_probs_batched, read_audio_files, recognize_manifest

    out = tmp_path / "both.json"
    argv = ["evaluate", str(model_dir), "--manifest", str(corpus[1]), "--precision", "both", "--json", str(out)]
    assert main([*argv, "--hyps", "--show", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    doc = json.loads(out.read_text())
    model = CTCModel.load(model_dir)
    res = {p: recognize_manifest(model, corpus[1], precision=p) for p in ("fp32", "bf16")}
    for p, r in res.items():
        assert doc[p]["wer"] == r.wer and doc[p]["cer"] == r.cer
        assert [h[f"hyp_{p}"] for h in doc["hyps"]] == r.hyps
        assert f"WER: {100 * r.wer:.2f}%" in next(line for line in lines if line.endswith(f"greedy, {p})"))
    assert lines[:3] == [f"REF: {res['fp32'].refs[0]}", f"HYP fp32: {res['fp32'].hyps[0]}", f"HYP bf16: {res['bf16'].hyps[0]}"]
    differ = [i for i, a, b in zip(res["fp32"].ids, res["fp32"].hyps, res["bf16"].hyps) if a != b]
    assert doc["differ_ids"] == differ and doc["hyps_differ"] == len(differ)
    wavs = read_audio_files(model, res["fp32"].audio)
    a = torch.cat(log_probs_batched(model, wavs))
    b = torch.cat(log_probs_batched(model, wavs, precision="bf16"))
    assert doc["frames"] == a.shape[0] and doc["frames_differ"] == int((a.argmax(-1) != b.argmax(-1)).sum())
    assert doc["log_prob_max_abs"] == pytest.approx(float((a - b).abs().max()))
    assert 0 < doc["log_prob_mean_abs"] <= doc["log_prob_max_abs"]
    assert lines[-1].startswith(f"bf16 vs fp32: {len(differ)} of {len(res['fp32'].ids)} hypotheses differ")
    with pytest.raises(SystemExit):  # evaluate only: argparse rejects it for transcribe
        main(["transcribe", str(model_dir), *_audio(corpus)[:1], "--precision", "both"])


def test_transcribe_non_audio_file_fails_clearly(model_dir, tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("this is not audio\n")
    assert main(["transcribe", str(model_dir), str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "error" in captured.err and "notes.txt" in captured.err and "Traceback" not in captured.err


def test_transcribe_console_script_exit_status(model_dir, tmp_path):
    bad = tmp_path / "x.wav"
    bad.write_bytes(b"RIFF....not really")
    out = subprocess.run([sys.executable, "-m", "ebranchformer.cli", "transcribe", str(model_dir), str(bad)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2
    assert "x.wav" in out.stderr and "Traceback" not in out.stderr


def test_transcribe_errors(model_dir, tmp_path, capsys):
    assert main(["transcribe", str(model_dir)]) == 2
    assert "nothing to transcribe" in capsys.readouterr().err
    assert main(["transcribe", str(tmp_path / "nope"), "a.wav"]) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["transcribe", str(model_dir), "a.wav", "--beam", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["transcribe", str(model_dir), "a.wav", "--backend", "tensorflow"])


# -- evaluate -----------------------------------------------------------------------------------------------------
def test_evaluate_prints_wer_cer_and_writes_json(model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "res.json"
    assert main(["evaluate", str(model_dir), "--manifest", str(corpus[1]), "--json", str(out), "--hyps"]) == 0
    text = capsys.readouterr().out
    assert "WER:" in text and "CER:" in text
    doc = json.loads(out.read_text())
    assert doc["utterances"] == 6 and 0 <= doc["cer"] and len(doc["hyps"]) == 6
    # the same numbers as the library's evaluation
    from ebranchformer.asr.evaluate import error_rates

    model = CTCModel.load(model_dir)
    refs = [h["ref"] for h in doc["hyps"]]
    wer, cer = error_rates(refs, model.transcribe(_audio(corpus)))
    assert doc["wer"] == pytest.approx(wer) and doc["cer"] == pytest.approx(cer)
    assert f"WER: {100 * wer:.2f}%" in text


def test_evaluate_needs_a_manifest(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", str(model_dir)])
    assert main(["evaluate", str(model_dir), "--manifest", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl" in capsys.readouterr().err


# -- info ---------------------------------------------------------------------------------------------------------
def _table(out: str) -> tuple[dict[str, int], int]:
    rows, total = {}, None
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].endswith("%") and parts[1].replace(",", "").isdigit():
            n = int(parts[1].replace(",", ""))
            if parts[0] == "total":
                total = n
            else:
                rows[parts[0]] = n
    return rows, total


def test_info_parameter_counts_add_up(model_dir, capsys):
    assert main(["info", str(model_dir), "--seconds", "2"]) == 0
    out = capsys.readouterr().out
    rows, total = _table(out)
    model = CTCModel.load(model_dir)
    assert total == sum(p.numel() for p in model.parameters())
    assert sum(rows.values()) == total
    assert {"encoder.layers.0", "encoder.layers.1", "encoder.input_layer", "ctc"} <= set(rows)
    assert "output frame rate: 25.00 frames/s" in out  # 8 kHz / hop 80 = 100 frames/s, conv2d x4
    assert "GFLOPs" in out


def test_info_on_a_training_config_and_flops(tmp_path, capsys):
    from ebranchformer.info import model_info

    cfg = tmp_path / "train.yaml"
    cfg.write_text(json.dumps({"output_dir": str(tmp_path / "exp"), "data": {"train": "t.jsonl"},
                               "optim": {"total_steps": 10},
                               "model": {"encoder": {"out_dim": 64, "num_layers": 2, "num_heads": 2,
                                                     "input_layer": {"class": "FrameStacking", "factor": 4}}}}))
    assert main(["info", str(cfg), "--vocab-size", "40"]) == 0
    rows, total = _table(capsys.readouterr().out)
    assert sum(rows.values()) == total and rows["ctc"] == 64 * 40 + 40
    one = model_info(cfg, seconds=4.0, vocab_size=40)
    two = model_info(cfg, seconds=8.0, vocab_size=40)
    assert one.output_rate == 25.0 and 1.8 < two.gflops / one.gflops < 2.3  # ~linear in length


def test_info_bad_path(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


# -- demo / train argument handling ---------------------------------------------------------------------------------
def test_demo_and_train_argument_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "0"])
    with pytest.raises(SystemExit):
        main(["demo", "--device", "tpu"])
    assert main(["train", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\ndata: {train: t.jsonl}\noptim: {total_steps: 1, lr: -1}\n")
    assert main(["train", str(bad)]) == 2
    assert "optim.lr" in capsys.readouterr().err


def test_parser_builds_without_heavy_imports():
    p = build_parser()
    args = p.parse_args(["transcribe", "m", "a.wav", "b.wav", "--beam", "3"])
    assert args.audio == ["a.wav", "b.wav"] and args.beam == 3 and args.backend == "torch"


def test_lexicon_words_file(tmp_path):
    tok = CharTokenizer.train([LETTERS])
    path = tmp_path / "w.txt"
    path.write_text("# words\nab\n\nba\nab\n")
    assert Lexicon.from_file(path, tok).words == ["ab", "ba"]


def test_busy_cores_reads_proc_stat(tmp_path, monkeypatch):
    from ebranchformer import cli

    busy = cli._busy_cores(0.05)
    assert busy is None or 0.0 <= busy <= (os.cpu_count() or 1)
    assert cli._busy_cores(0.0, stat=str(tmp_path / "missing")) is None
    samples = iter(["cpu 100 0 100 800 0 0 0 0 0 0\n", "cpu 200 0 200 1000 0 0 0 0 0 0\n"])  # 200 of 400 busy
    stat = tmp_path / "stat"
    monkeypatch.setattr(cli.time, "sleep", lambda s: stat.write_text(next(samples)))
    stat.write_text(next(samples))
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    assert cli._busy_cores(0.0, stat=str(stat)) == 1.0

