"""Export: ONNX (dynamo exporter, onnxruntime) and torch.export programs of the encoder and CTC parts match
eager PyTorch on several (B, T) shapes, carry their metadata, and failures leave nothing behind."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

import pytest
import torch

from ebranchformer.asr.ctc_model import CTCModel
from ebranchformer.asr.feature_config import FeatureConfig
from ebranchformer.config import build_dict
from ebranchformer.interop import export as export_mod
from ebranchformer.interop.encoder_dir import save_encoder
from ebranchformer.interop.export import default_export_name, export_model, load_torch_export
from ebranchformer.nn import ConformerEncoder, EBranchformerLayer
from ebranchformer.nn.conv_subsample import ConformerConvSubsample

from ..asr.ctc_corpus import single_thread
from ..nn.conftest import perturb_
from .export_models import exported, model_dir


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():  # tiny models: more threads only wait for each other on a shared CPU
        yield


ort = pytest.importorskip("onnxruntime")

SHAPES = [(1, 23), (3, 157), (5, 64)]  # (B, T): one utterance, a long batch, a wide batch


def _batch(b: int, t: int, f: int, seed: int, lo: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, t + 1, (b,), generator=g)
    lengths[0] = t
    return torch.randn(b, t, f, generator=g) * 2.0 - 8.0, lengths  # about log-mel scale


def _assert_rows_close(y, n, y_ref, n_ref, atol):
    y, n = torch.as_tensor(y), torch.as_tensor(n)
    assert n.dtype == torch.int64 and n.tolist() == n_ref.tolist()
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    for b in range(y.shape[0]):
        torch.testing.assert_close(y[b, : n[b]], y_ref[b, : n[b]], rtol=0, atol=atol)


def test_onnx_ctc_part_matches_pytorch():
    """The ctc part as shipped (optimized graph): GlobalMVN + encoder + CTC head + log_softmax."""
    path = exported("ctc")
    assert path.name == default_export_name("onnx", "ctc") == "model.ctc.onnx"
    model = CTCModel.load(model_dir())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = [(i.name, i.type, i.shape) for i in session.get_inputs()]
    assert inputs == [("x", "tensor(float)", ["batch", "time", 80]), ("lengths", "tensor(int64)", ["batch"])]
    assert [o.name for o in session.get_outputs()] == ["log_probs", "log_probs_lengths"]
    for seed, (b, t) in enumerate(SHAPES):
        x, lengths = _batch(b, t, 80, seed)
        with torch.no_grad():
            y_ref, n_ref = model.log_probs_features(x, lengths)
        y, n = session.run(None, {"x": x.numpy(), "lengths": lengths.numpy()})
        _assert_rows_close(y, n, y_ref, n_ref, atol=1e-4)


def test_onnx_metadata():
    session = ort.InferenceSession(str(exported("ctc")), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    model = CTCModel.load(model_dir())
    assert meta["format"] == "ebranchformer-export" and meta["part"] == "ctc" and meta["version"] == "1"
    assert FeatureConfig.from_dict(json.loads(meta["feature_config"])) == model.config.features
    assert float(meta["feature_frame_shift"]) == 0.01 and meta["subsampling_factor"] == "4"
    assert float(meta["frame_shift"]) == pytest.approx(0.04) and meta["sample_rate"] == "16000"
    assert json.loads(meta["vocabulary"]) == model.tokenizer.tokens and meta["blank_id"] == "0"
    assert json.loads(meta["tokenizer"]) == {
        "text_kind": "char",
        "space_symbol": "<space>",
        "bpemodel_base64": None,
    }
    assert meta["normalization_in_graph"] == "true" and meta["padding"] == "masked"
    assert meta["min_input_frames"] == "7" and meta["vocab_size"] == str(model.config.vocab_size)
    assert json.loads(meta["model_config"]) == model.config.to_dict()
    assert set(json.loads(meta["inputs"])) == {"x", "lengths"}


def test_torch_export_reloads_and_matches_eager(tmp_path, caplog):
    """A model with ESPnet's legacy padding: the program is exported batch-invariant, with a warning, i.e. it
    computes what the eager model computes with padding="masked"."""
    masked = CTCModel.load(model_dir())
    model = copy.deepcopy(masked)
    model.encoder.config = dataclasses.replace(masked.encoder.config, padding="espnet_legacy")
    out = tmp_path / default_export_name("torch-export", "ctc")
    with caplog.at_level(logging.WARNING, logger="ebranchformer.interop.export"):
        export_model(model, out, format="torch-export", part="ctc")
    assert any("switched to 'masked'" in r.getMessage() for r in caplog.records)
    assert model.encoder.config.padding == "espnet_legacy"  # the caller's model is untouched
    program, meta = load_torch_export(out)  # torch.export.load, reading the metadata file too
    assert isinstance(program, torch.export.ExportedProgram)
    assert meta["part"] == "ctc" and json.loads(meta["vocabulary"]) == model.tokenizer.tokens
    min_frames = int(meta["min_input_frames"])
    assert min_frames == 15  # conv2d needs 7; the program's guards rule out 1- or 2-frame outputs
    run = program.module()
    masked.encoder.set_cpu_blocks(False)  # the paths export traces (the CPU-only ones equal them: test_fast_paths)
    masked.ctc.linear.onednn = False
    for seed, (b, t) in enumerate(SHAPES):
        x, lengths = _batch(b, t, 80, seed, lo=min_frames)
        with torch.no_grad():
            y_ref, n_ref = masked.log_probs_features(x, lengths)
            y, n = run(x, lengths)
        _assert_rows_close(y, n, y_ref, n_ref, atol=1e-5)
    too_short = (torch.zeros(1, min_frames - 1, 80), torch.tensor([min_frames - 1]))
    with pytest.raises((AssertionError, RuntimeError, ValueError)):  # the program's input guards reject it
        run(*too_short)


def test_onnx_encoder_part_of_an_encoder_only_directory(tmp_path):
    """The encoder part under onnxruntime: a RETURNN-style encoder (ConformerConvSubsample frontend, no final
    norm) read from an encoder directory."""
    torch.manual_seed(5)
    enc = ConformerEncoder(
        in_dim=40, out_dim=32, num_layers=1,
        input_layer=build_dict(ConformerConvSubsample, out_dims=[8, 16], filter_sizes=[(3, 3), (3, 3)],
                               strides=[(2, 1), (2, 1)], pool_sizes=[(1, 2)]),
        encoder_layer=build_dict(EBranchformerLayer, ff_dim=48, num_heads=4, cgmlp_ff_dim=40, cgmlp_conv_kernel=5,
                                 merge_conv_kernel=3),
    )  # fmt: skip
    enc = perturb_(enc).eval()
    enc_dir = save_encoder(enc, tmp_path / "enc")
    out = export_model(enc_dir, tmp_path / "enc.onnx", part="encoder", optimize=False)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["subsampling_factor"] == "4" and meta["feature_config"] == "null" and meta["vocabulary"] == "null"
    assert meta["normalization_in_graph"] == "false" and meta["feature_dim"] == "40"
    for seed, (b, t) in enumerate(SHAPES):
        x, lengths = _batch(b, t, 40, seed, lo=int(meta["min_input_frames"]))
        with torch.no_grad():
            y_ref, n_ref = enc(x, lengths)
        _assert_rows_close(*session.run(None, {"x": x.numpy(), "lengths": lengths.numpy()}), y_ref, n_ref, atol=1e-4)
    with pytest.raises(ValueError, match="part='ctc' needs a CTC model"):
        export_model(enc_dir, tmp_path / "ctc.onnx", part="ctc")
    assert not (tmp_path / "ctc.onnx").exists()


def test_bad_arguments_and_failed_checks_leave_nothing(tmp_path, monkeypatch):
    model = CTCModel.load(model_dir())
    out = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(model, out, format="tflite")
    with pytest.raises(ValueError, match="part must be one of"):
        export_model(model, out, part="decoder")
    with pytest.raises(ValueError, match="folder .* does not exist"):
        export_model(model, tmp_path / "missing" / "m.onnx")
    with pytest.raises(ValueError, match="is not a model directory"):
        export_model(tmp_path, out)
    with pytest.raises(TypeError, match="model_dir_or_model must be"):
        export_model(42, out)

    def exporter_fails(*args, **kwargs):
        raise NotImplementedError("an op the exporter cannot handle")

    def mismatch(*args, **kwargs):
        raise RuntimeError("exported output differs from PyTorch")

    out.write_bytes(b"previous")
    monkeypatch.setattr(torch.export, "export", exporter_fails)
    with pytest.raises(RuntimeError, match="torch.export of part='ctc' failed: an op the exporter cannot handle"):
        export_model(model, out, format="torch-export", part="ctc")
    monkeypatch.undo()
    monkeypatch.setattr(export_mod, "_compare", mismatch)
    monkeypatch.setattr(export_mod, "_min_frames", lambda run, enc: 7)
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        export_model(model, out, format="torch-export", part="ctc")
    assert out.read_bytes() == b"previous"  # an existing file is not touched
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # and no temporary file is left
