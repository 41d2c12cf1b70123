"""The top-level package: lazy exports and ``ebranchformer.load`` for both kinds of model directory."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import ebranchformer


def test_importing_the_package_does_not_import_torch():
    code = "import sys, ebranchformer; assert 'torch' not in sys.modules; print(len(ebranchformer.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == len(ebranchformer.__all__)


def test_every_export_resolves():
    for name in ebranchformer.__all__:
        assert getattr(ebranchformer, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        ebranchformer.Nope  # noqa: B018


def test_load_reads_encoder_only_and_full_model_dirs(tmp_path):
    from ebranchformer.asr.ctc_model import CTCModel
    from ebranchformer.asr.model_config import ModelConfig
    from ebranchformer.interop.encoder_dir import save_encoder

    enc = ebranchformer.ConformerEncoder(in_dim=8, out_dim=16, num_layers=1).eval()
    save_encoder(enc, tmp_path / "enc")
    loaded = ebranchformer.load(tmp_path / "enc")
    assert isinstance(loaded, ebranchformer.ConformerEncoder)
    for (k, v), (k2, v2) in zip(enc.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)

    cfg = ModelConfig(features=None, feature_dim=8, normalize=None, vocab_size=5,
                      encoder=dict(out_dim=16, num_layers=1, num_heads=2))  # fmt: skip
    model = CTCModel(cfg).eval()
    model.save(tmp_path / "full")
    assert isinstance(ebranchformer.load(tmp_path / "full"), CTCModel)
