"""TrainConfig: the full YAML round trip, unknown keys rejected per section, overrides, validation messages,
and every field documented next to its definition."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import yaml

from ebranchformer.asr import train_config as tc
from ebranchformer.asr.model_config import ModelConfig
from ebranchformer.asr.train_config import TrainConfig, load_train_config

MINIMAL = {"output_dir": "exp/x", "data": {"train": "train.jsonl"}, "optim": {"total_steps": 100}}


def test_defaults_and_round_trips(tmp_path):
    cfg = TrainConfig.from_dict(MINIMAL)
    assert cfg.model == ModelConfig() and cfg.optim.betas == (0.9, 0.98) and cfg.precision == "fp32"
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_train_config(path) == cfg
    full = yaml.safe_load(cfg.to_yaml())
    assert set(full) == {f.name for f in dataclasses.fields(TrainConfig)}  # the YAML lists every field


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ({**MINIMAL, "bogus": 1}, "bogus"),
        ({**MINIMAL, "data": {"train": "t", "max_frame": 3}}, "max_frame"),
        ({**MINIMAL, "optim": {"total_steps": 3, "learning_rate": 1}}, "learning_rate"),
        ({**MINIMAL, "model": {"encoder": {"num_layer": 2}}}, "num_layer"),
        ({**MINIMAL, "checkpoint": {"every": 3}}, "every"),
        ({**MINIMAL, "log": {"progress": False}}, "progress"),
        ({**MINIMAL, "tokenizer": {"type": "char"}}, "type"),
    ],
)
def test_unknown_keys_are_rejected(doc, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig.from_dict(doc)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"output_dir": ""}, "output_dir"),
        ({"data": {"train": ""}}, "data.train"),
        ({"data": {"train": "t", "max_frames": 0}}, "data.max_frames"),
        ({"data": {"train": "t", "sample_rate": 8000}}, "sample_rate"),
        ({"optim": {}}, "total_steps or max_epochs"),
        ({"optim": {"total_steps": 5, "name": "sgd"}}, "optim.name"),
        ({"optim": {"total_steps": 5, "betas": [0.9]}}, "optim.betas"),
        ({"optim": {"total_steps": 5, "scheduler": "noam", "warmup_steps": 0}}, "warmup_steps"),
        ({"optim": {"total_steps": 5, "accum_grad": 0}}, "accum_grad"),
        ({"optim": {"total_steps": 5, "grad_clip": -1}}, "grad_clip"),
        ({"optim": {"total_steps": 5, "scheduler": "warmup_cosine", "warmup_steps": 5}}, "total_steps > warmup"),
        ({"tokenizer": {"kind": "bpe"}}, "tokenizer.vocab_size"),
        ({"tokenizer": {"kind": "word"}}, "tokenizer.kind"),
        ({"checkpoint": {"average_by": "bleu"}}, "average_by"),
        ({"checkpoint": {"keep_last": 0}}, "keep_last"),
        ({"precision": "fp8"}, "precision"),
        ({"device": "tpu"}, "device"),
        ({"seed": -1}, "seed"),
        ({"model": {"features": None, "feature_dim": 80}}, "model.features"),
    ],
)
def test_bad_values_name_the_field(change, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig.from_dict({**MINIMAL, **change})


def test_overrides_and_file_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    cfg = load_train_config(
        path, ["optim.lr=0.01", "data.valid=v.jsonl", "model.encoder.num_layers=3", "checkpoint.resume=false"]
    )
    assert cfg.optim.lr == 0.01 and cfg.data.valid == "v.jsonl" and not cfg.checkpoint.resume
    assert cfg.model.encoder["num_layers"] == 3
    with pytest.raises(ValueError, match="section.field=value"):
        load_train_config(path, ["optim.lr"])
    with pytest.raises(ValueError, match="not a section"):
        load_train_config(path, ["output_dir.x=1"])
    with pytest.raises(ValueError, match="c.yaml.*bogus"):
        load_train_config(path, ["bogus=1"])
    with pytest.raises(ValueError, match="cannot read"):
        load_train_config(tmp_path / "missing.yaml")
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_train_config(path)
    path.write_text("a: [unclosed\n")
    with pytest.raises(ValueError, match="YAML"):
        load_train_config(path)


def test_layer_and_frontend_options_are_checked_when_the_config_is_read(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    enc = "model.encoder.encoder_layer={class: EBranchformerLayer, cgmlp_kernel: 7}"
    with pytest.raises(ValueError, match="encoder_layer: EBranchformerLayer has no option 'cgmlp_kernel'"):
        load_train_config(path, [enc])
    with pytest.raises(ValueError, match="unknown module class 'Conv2dSubsampling4'"):
        load_train_config(path, ["model.encoder.input_layer={class: Conv2dSubsampling4}"])
    ok = load_train_config(path, ["model.encoder.encoder_layer={class: EBranchformerLayer, cgmlp_conv_kernel: 7}"])
    assert ok.model.encoder["encoder_layer"]["cgmlp_conv_kernel"] == 7


def test_floats_without_a_dot_are_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: x\ndata: {train: t.jsonl}\noptim: {total_steps: 10, eps: 1e-8, lr: 2E-3}\n")
    cfg = load_train_config(path, ["optim.weight_decay=1e-2", "data.max_frames=4e3"])
    assert (cfg.optim.eps, cfg.optim.lr, cfg.optim.weight_decay, cfg.data.max_frames) == (1e-8, 2e-3, 0.01, 4000.0)
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg


@pytest.mark.parametrize(
    "cls",
    [tc.DataConfig, tc.TokenizerConfig, tc.OptimConfig, tc.CheckpointConfig, tc.LogConfig, tc.TrainConfig],
)
def test_every_field_is_documented(cls):
    source = inspect.getsource(cls)
    for f in dataclasses.fields(cls):
        lines = [line for line in source.splitlines() if line.strip().startswith(f"{f.name}:")]
        assert len(lines) == 1 and "  # " in lines[0], f"{cls.__name__}.{f.name} lacks a comment"
