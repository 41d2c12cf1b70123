"""RETURNN checkpoint import into an encoder-only directory: exact round trip of our own RETURNN checkpoints,
parity with a live RETURNN ConformerEncoder, and clear errors that leave nothing behind."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from ebranchformer.asr.model_dir import ModelDirError, load_model
from ebranchformer.interop.encoder_dir import EncoderDirError, load_encoder, read_dir_format
from ebranchformer.interop.returnn import save_returnn_checkpoint
from ebranchformer.interop.returnn_experiment import convert_returnn_checkpoint

from ..asr.ctc_corpus import single_thread
from .test_returnn import CONV6, EBF, PARITY_CASES, _returnn_run, _small_encoder, rf  # noqa: F401 (rf: fixture)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():  # tiny models: more threads only wait for each other on a shared CPU
        yield


def _options(path, **opts):
    base = {"in_dim": 80, "out_dim": 64, "num_layers": 2, "input_layer": CONV6, "encoder_layer": EBF}
    path.write_text(yaml.safe_dump({**base, **opts}), encoding="utf-8")
    return path


def test_round_trip_gives_identical_outputs(tmp_path):
    enc = _small_encoder()
    ckpt = tmp_path / "epoch.012.pt"
    save_returnn_checkpoint(ckpt, enc, epoch=12, step=3400, prefix="encoder.")
    out = convert_returnn_checkpoint(
        ckpt, _options(tmp_path / "enc.yaml", prefix="encoder."), tmp_path / "enc"
    )
    assert read_dir_format(out) == "ebranchformer-encoder"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    doc = json.loads((out / "config.json").read_text())
    assert doc["source"]["kind"] == "returnn" and (doc["source"]["epoch"], doc["source"]["step"]) == (
        12,
        3400,
    )
    again = load_encoder(out)
    assert not again.training and again.config.to_dict() == enc.config.to_dict()
    x, lengths = torch.randn(3, 61, 80), torch.tensor([61, 50, 23])
    with torch.no_grad():
        y, n = enc(x, lengths)
        y2, n2 = again(x, lengths)
    assert torch.equal(n, n2) and torch.equal(y, y2)
    for a, b in zip(enc.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parity
@pytest.mark.parametrize("case", ["ebf_conv6", "conformer_default"])
def test_imported_checkpoint_equals_live_returnn(rf, tmp_path, case):  # noqa: F811
    """RETURNN builds and runs the encoder; its parameters, saved the way RETURNN's torch engine saves them,
    convert to an encoder directory whose outputs equal RETURNN's."""
    c = PARITY_CASES[case]
    t, b = 61, 3
    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([t, t - 7, t // 2])
    x = torch.randn(b, t, c["in_dim"], generator=g)
    params, y_r, n_r = _returnn_run(
        rf, d=64, in_dim=c["in_dim"], num_layers=c["num_layers"], input_layer=c["input_layer"],
        encoder_layer=c["encoder_layer"], x=x, lengths=lengths, use_mask=True, seed=11, **c.get("enc_kw", {}),
    )  # fmt: skip
    ckpt = tmp_path / "epoch.001.pt"
    torch.save({"model": params, "epoch": 1, "step": 10, "effective_learning_rate": 1e-3}, ckpt)
    opts = {
        "in_dim": c["in_dim"], "out_dim": 64, "num_layers": c["num_layers"], "input_layer": c["input_layer"],
        "encoder_layer": c["encoder_layer"], **c.get("enc_kw", {}),
    }  # fmt: skip
    (tmp_path / "enc.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(opts))), encoding="utf-8")
    enc = load_encoder(convert_returnn_checkpoint(ckpt, tmp_path / "enc.yaml", tmp_path / "enc"))
    with torch.no_grad():
        y, n = enc(x, lengths)
    assert n.tolist() == n_r.tolist()
    for i in range(b):
        torch.testing.assert_close(y[i, : n[i]], y_r[i, : n[i]], rtol=0, atol=1e-4)


def _assert_nothing_written(out) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_bad_checkpoints_and_options(tmp_path):
    enc = _small_encoder()
    ckpt = tmp_path / "epoch.001.pt"
    save_returnn_checkpoint(ckpt, enc)
    opts = _options(tmp_path / "enc.yaml")
    out = tmp_path / "out"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    with pytest.raises(
        ValueError, match=r"truncated\.pt' is not a readable PyTorch checkpoint \(truncated\?\)"
    ):
        convert_returnn_checkpoint(truncated, opts, out)
    plain = tmp_path / "plain.pt"
    torch.save(enc.state_dict(), plain)  # a state_dict, not RETURNN's {"model": ...}
    with pytest.raises(ValueError, match="not a RETURNN checkpoint"):
        convert_returnn_checkpoint(plain, opts, out)
    with pytest.raises(ValueError, match=r"unknown keys \['layers.1.cgmlp.conv.bias'"):
        convert_returnn_checkpoint(ckpt, _options(tmp_path / "one.yaml", num_layers=1), out)
    with pytest.raises(ValueError, match=r"encoder options lack \['out_dim'\]"):
        convert_returnn_checkpoint(ckpt, {"in_dim": 80, "num_layers": 2}, out)
    with pytest.raises(ValueError, match="invalid encoder options"):
        convert_returnn_checkpoint(ckpt, _options(tmp_path / "typo.yaml", num_layer=2), out)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_returnn_checkpoint(tmp_path / "missing.pt", opts, out)
    _assert_nothing_written(out)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        convert_returnn_checkpoint(ckpt, opts, out)
    with pytest.raises(EncoderDirError, match="not an encoder directory"):
        convert_returnn_checkpoint(ckpt, opts, out, overwrite=True)  # overwrite never deletes unrelated data
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_encoder_dir_and_model_dir_refuse_each_other(tmp_path):
    enc_dir = tmp_path / "enc"
    ckpt = tmp_path / "epoch.001.pt"
    save_returnn_checkpoint(ckpt, _small_encoder())
    convert_returnn_checkpoint(ckpt, _options(tmp_path / "enc.yaml"), enc_dir)
    with pytest.raises(ModelDirError, match="format='ebranchformer-encoder'"):
        load_model(enc_dir)
    (enc_dir / "model.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(ModelDirError, match="model.safetensors' is not a readable safetensors file"):
        load_encoder(enc_dir)
