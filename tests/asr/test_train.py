"""The training loop on a tiny tone corpus (CPU): the loss falls, the outputs (checkpoints, metrics, plot,
averaged model directory), exact resume in deterministic mode, non-finite step skipping, bad data counting,
bf16/fp16, gradient accumulation and the ``python -m ebranchformer.asr.train`` entry point."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from ebranchformer.asr.audio import load_audio
from ebranchformer.asr.checkpoint import list_checkpoints, load_checkpoint
from ebranchformer.asr.features import LogMelFeatures
from ebranchformer.asr.global_mvn import GlobalMVN, compute_stats
from ebranchformer.asr.manifest import read_jsonl_manifest
from ebranchformer.asr.model_dir import load_model, load_weights
from ebranchformer.asr.train import Trainer, main, train
from ebranchformer.asr.train_config import TrainConfig, load_train_config
from tests.asr.ctc_corpus import (
    SAMPLE_RATE,
    single_thread,
    tiny_model_config,
    tiny_train_config,
    write_tone_corpus,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tone_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "exp"
    cfg = tiny_train_config(out, *corpus)
    return cfg, train(cfg)


# ----------------------------------------------------------------------------------------------- a full run
def test_loss_falls_and_model_learns(trained, corpus):
    _, result = trained
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert sorted(result.losses) == list(range(1, 41)) and result.step == 40 == result.updates
    assert np.mean(losses[-5:]) < 0.25 * np.mean(losses[:5])
    assert result.skipped_steps == 0 and not result.data_skips
    assert [v["step"] for v in result.valid] == [20, 40]
    assert result.valid[-1]["loss"] < result.valid[0]["loss"]
    assert result.final_valid["cer"] < 0.3
    model = load_model(result.model_dir)
    utts, _ = read_jsonl_manifest(corpus[1])
    hyps = model.transcribe([u.audio for u in utts])
    assert sum(h == u.text for h, u in zip(hyps, utts)) >= len(utts) // 2


def test_run_outputs(trained):
    cfg, result = trained
    out = result.output_dir
    assert load_train_config(out / "config.yaml") == cfg
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == list(range(5, 41, 5))
    assert all(
        {"loss", "loss_ctc", "lr", "grad_norm", "frames_per_s", "epoch"} <= r.keys() for r in train_recs
    )
    assert train_recs[0]["loss"] == pytest.approx(np.mean([result.losses[s] for s in range(1, 6)]))
    assert [r["step"] for r in records if r["kind"] == "valid"] == [20, 40]
    assert records[-1]["kind"] == "final" and records[-1]["averaged"] == [20, 40]
    # noam: the lr peaks at warmup_steps (8) at the configured lr, then decays
    lrs = {r["step"]: r["lr"] for r in train_recs}
    assert lrs[10] < cfg.optim.lr and lrs[40] < lrs[10]


def test_feature_stats_are_over_the_training_set(trained, corpus):
    cfg, result = trained
    fe = LogMelFeatures(cfg.model.features)
    utts, _ = read_jsonl_manifest(corpus[0])
    rows = []
    for u in utts:
        wav = torch.from_numpy(load_audio(u.audio, SAMPLE_RATE))[None]
        feats, _ = fe(wav, torch.tensor([wav.shape[1]]))
        rows.append(feats[0])
    expected = compute_stats(rows)
    got = GlobalMVN.from_espnet_stats(result.output_dir / "feats_stats.npz")
    assert int(got.count) == int(expected.count)
    # computed in padded batches, where a row's last frames see zeros instead of its reflected end (as ESPnet)
    torch.testing.assert_close(got.feat_sum, expected.feat_sum, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got.mean, expected.mean, rtol=1e-3, atol=1e-3)
    model = load_model(result.model_dir)
    torch.testing.assert_close(model.normalize.mean, got.mean)


def test_final_model_is_the_average_of_the_best_checkpoints(trained):
    _, result = trained
    ckpts = list_checkpoints(result.output_dir / "checkpoints")
    assert [c.name for c in ckpts] == ["step_00000020", "step_00000040"]
    w = [load_weights(c / "model.safetensors") for c in ckpts]
    final = load_weights(result.model_dir / "model.safetensors")
    for k, v in final.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, ((w[0][k].double() + w[1][k].double()) / 2).to(v.dtype))
        else:
            assert torch.equal(v, w[1][k])
    _, state, meta = load_checkpoint(ckpts[-1])
    assert state["step"] == 40 and meta["valid"]["loss"] == pytest.approx(result.valid[-1]["loss"])


# --------------------------------------------------------------------------------------------------- resume
def test_resume_reproduces_the_uninterrupted_run(corpus, tmp_path):
    regularized = {
        "model": tiny_model_config(dropout=0.1, specaug={"num_time_masks": 2, "time_warp_window": 2})
    }
    common = dict(
        checkpoint={"every_steps": 3, "keep_last": 10, "average_best": 0},
        data={"max_frames": 300.0},
        **regularized,
    )
    full = train(tiny_train_config(tmp_path / "full", *corpus, optim={"total_steps": 12}, **common))
    part = train(tiny_train_config(tmp_path / "part", *corpus, optim={"total_steps": 7}, **common))
    assert [part.losses[s] for s in range(1, 8)] == [full.losses[s] for s in range(1, 8)]
    _, state, _ = load_checkpoint(tmp_path / "part" / "checkpoints" / "step_00000007")
    assert state["position"] > 0  # the interruption falls inside an epoch
    # a crash while writing a later checkpoint left a temporary directory behind: ignored and cleaned up
    junk = tmp_path / "part" / "checkpoints" / ".step_00000009.tmp-123-abcd"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"half")
    rest = train(tiny_train_config(tmp_path / "part", *corpus, optim={"total_steps": 12}, **common))
    assert rest.resumed_from == 7 and sorted(rest.losses) == list(range(8, 13))
    assert [rest.losses[s] for s in range(8, 13)] == [full.losses[s] for s in range(8, 13)]
    assert not junk.exists()
    a = load_weights(tmp_path / "full" / "model" / "model.safetensors")
    b = load_weights(tmp_path / "part" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "train"
    ]
    assert steps == sorted(set(steps))  # no records of the interrupted run after its checkpoint


def test_checkpoints_are_pruned_to_last_and_best(corpus, tmp_path):
    cfg = tiny_train_config(
        tmp_path / "x",
        *corpus,
        optim={"total_steps": 8},
        checkpoint={"every_steps": 2, "keep_last": 1, "average_best": 2, "average_by": "cer"},
    )
    result = train(cfg)
    valid = {int(v["step"]): (v["cer"], -v["step"]) for v in result.valid}
    best = sorted(valid, key=valid.get)[:2]
    kept = [int(p.name[5:]) for p in list_checkpoints(tmp_path / "x" / "checkpoints")]
    assert kept == sorted(set(best) | {8})
    assert result.averaged_steps == sorted(best)


def test_existing_checkpoints_without_resume_are_refused(trained):
    cfg, _ = trained
    with pytest.raises(ValueError, match="resume"):
        train(cfg.replace(checkpoint=cfg.checkpoint.replace(resume=False)))


def test_rerun_with_other_tokenizer_or_features_is_refused(corpus, tmp_path, caplog):
    # a run restarted in the same output_dir before its first checkpoint reuses the tokenizer and statistics only
    # when this config would build the same ones
    out = tmp_path / "exp"
    cfg = tiny_train_config(out, *corpus)
    first = Trainer(cfg)
    assert json.loads((out / "tokenizer" / "source.json").read_text())["tokenizer"]["kind"] == "char"
    assert (out / "feats_stats.json").is_file()
    again = Trainer(cfg)  # the same settings: reused
    assert again.tokenizer.vocab_size == first.tokenizer.vocab_size
    with pytest.raises(ValueError, match=r"tokenizer.*kind.*'char'.*'bpe'.*remove"):
        Trainer(tiny_train_config(out, *corpus, tokenizer={"kind": "bpe", "vocab_size": 8}))
    model = tiny_model_config()
    model["features"] = {**model["features"], "n_mels": 20}
    with pytest.raises(ValueError, match=r"feature statistics.*n_mels.*23.*20"):
        Trainer(tiny_train_config(out, *corpus, model=model))
    # the training manifest moved (audio paths are relative to it, so it stays beside the audio): a warning
    moved = Path(corpus[0]).with_name("train_moved.jsonl")
    shutil.copy(corpus[0], moved)
    with caplog.at_level("WARNING"):
        Trainer(tiny_train_config(out, moved, corpus[1]))
    assert "built with a different train" in caplog.text


# ----------------------------------------------------------------------------------------------- robustness
def test_non_finite_gradient_skips_the_update(corpus, tmp_path):
    trainer = Trainer(tiny_train_config(tmp_path / "nan", *corpus, optim={"total_steps": 4}))
    stream = trainer._epoch_stream()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    hook = trainer.model.ctc.linear.weight.register_hook(lambda g: g * float("nan"))
    stats = trainer.train_step(stream, trainer.model)
    hook.remove()
    assert stats["skipped"] == 1.0 and not np.isfinite(stats["grad_norm"]) and np.isfinite(stats["loss"])
    assert (trainer.step, trainer.updates, trainer.skipped_steps) == (1, 0, 1)
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert trainer.scheduler.last_epoch == 0 and not trainer.optimizer.state
    stats = trainer.train_step(stream, trainer.model)
    assert stats["skipped"] == 0.0 and (trainer.step, trainer.updates) == (2, 1)
    assert not torch.equal(trainer.model.ctc.linear.weight, before["ctc.linear.weight"])


def test_a_run_with_a_nan_step_counts_it_and_carries_on(corpus, tmp_path):
    trainer = Trainer(
        tiny_train_config(tmp_path / "nan", *corpus, optim={"total_steps": 6}, checkpoint={"every_steps": 6})
    )
    calls = []

    def poison(g):
        calls.append(1)
        return g * float("nan") if len(calls) == 3 else g

    trainer.model.ctc.linear.weight.register_hook(poison)  # the 3rd step's gradient is NaN
    result = trainer.run()
    assert (result.step, result.updates, result.skipped_steps) == (6, 5, 1)
    assert all(np.isfinite(v) for v in result.losses.values())
    records = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records if r["kind"] == "train"] == [1, 1]  # logged at steps 5 and 6
    assert all(torch.isfinite(p).all() for p in load_model(result.model_dir).parameters())


def test_bad_items_are_skipped_and_counted(corpus, tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    lines = corpus[0].read_text().splitlines()
    base = corpus[0].parent
    good = [dict(json.loads(line), audio=str(base / json.loads(line)["audio"])) for line in lines]
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    sf.write(root / "short.wav", np.zeros(100, np.float32), SAMPLE_RATE)
    bad = [
        {"audio": str(root / "missing.wav"), "text": "ab", "duration": 0.5, "id": "missing"},
        {"audio": str(root / "corrupt.wav"), "text": "ab", "duration": 0.5, "id": "corrupt"},
        {"audio": str(root / "short.wav"), "text": "ab", "duration": 0.5, "id": "short"},
        {"audio": str(root / "short.wav"), "text": "", "duration": 0.5, "id": "empty"},
    ]
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in good + bad) + "not json\n")
    result = train(
        tiny_train_config(
            root / "exp",
            manifest,
            None,
            optim={"total_steps": 10, "max_epochs": 3},
            checkpoint={"every_steps": 10, "average_best": 1},
        )
    )
    assert result.data_skips.counts == {
        "bad json": 1,
        "empty transcript": 1,
        "missing audio": 1,
        "unreadable audio": 1,
        "too short": 1,
    }
    assert result.step == 10 and result.final_valid is None


def test_run_stops_after_max_epochs(corpus, tmp_path):
    trainer = Trainer(
        tiny_train_config(
            tmp_path / "ep",
            *corpus,
            optim={"total_steps": None, "max_epochs": 2},
            checkpoint={"every_steps": 100},
        )
    )
    result = trainer.run()
    epoch_batches = [len(trainer.sampler.rank_batches(epoch=e)) for e in (0, 1)]
    assert result.epoch == 2 and result.step == sum(epoch_batches)
    _, state, _ = load_checkpoint(list_checkpoints(tmp_path / "ep" / "checkpoints")[-1])
    assert (state["step"], state["epoch"], state["position"]) == (result.step, 2, 0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(corpus, tmp_path, precision):
    result = train(
        tiny_train_config(
            tmp_path / precision,
            *corpus,
            precision=precision,
            optim={"total_steps": 6},
            checkpoint={"every_steps": 6, "average_best": 1},
        )
    )
    assert result.step == 6 and result.updates + result.skipped_steps == 6 and result.updates >= 3
    assert all(np.isfinite(v) for v in result.losses.values())
    _, state, _ = load_checkpoint(tmp_path / precision / "checkpoints" / "step_00000006")
    if precision == "fp16":
        assert 0 < state["scaler"]["scale"] <= 65536.0
    assert all(torch.isfinite(p).all() for p in load_model(result.model_dir).parameters())


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_grad_accumulation_averages_the_batches_gradients(corpus, tmp_path):
    trainer = Trainer(
        tiny_train_config(
            tmp_path / "acc", *corpus, optim={"total_steps": 2, "accum_grad": 2, "grad_clip": 0.0}
        )
    )
    reference = copy.deepcopy(trainer.model).train()
    for idx in trainer.sampler.rank_batches(epoch=0)[:2]:
        batch = trainer.train_collate([trainer.train_set[i] for i in idx])
        loss, _ = reference(batch["wav"], batch["wav_lengths"], batch["tokens"], batch["token_lengths"])
        (loss / 2).backward()
    seen = {}
    trainer.scaler.step = lambda opt: seen.update(
        {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    )
    stats = trainer.train_step(trainer._epoch_stream(), trainer.model)
    assert trainer.position == 2 and trainer.updates == 1 and np.isfinite(stats["loss"])
    for name, p in reference.named_parameters():
        torch.testing.assert_close(seen[name], p.grad, rtol=1e-4, atol=1e-6)


def test_main_entry_point(corpus, tmp_path, capsys):
    cfg = tiny_train_config(tmp_path / "cli", *corpus)
    path = tmp_path / "train.yaml"
    path.write_text(cfg.to_yaml())
    assert main([str(path), "--set", "optim.total_steps=3", "--set", "checkpoint.every_steps=3"]) == 0
    assert "done: 3 steps" in capsys.readouterr().out
    assert load_model(tmp_path / "cli" / "model").config.vocab_size == 7  # blank, unk, a-d, sos/eos
    with pytest.raises(ValueError, match="unknown"):
        main([str(path), "--set", "optim.bogus=1"])
    assert isinstance(load_train_config(tmp_path / "cli" / "config.yaml"), TrainConfig)
    shutil.rmtree(tmp_path / "cli")
