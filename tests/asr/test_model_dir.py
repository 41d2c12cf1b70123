"""Model directory: exact save/load round trips, the versioned config.json, clear errors naming the bad file,
and atomic saving (nothing half-written after a failure; an existing model kept until the new one is
complete)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ebranchformer.asr import model_dir as md
from ebranchformer.asr.atomic import is_temp_name
from ebranchformer.asr.ctc_model import CTCModel
from ebranchformer.asr.global_mvn import compute_stats
from ebranchformer.asr.model_config import ModelConfig
from ebranchformer.asr.model_dir import ModelDirError, load_model, read_config, save_model
from ebranchformer.asr.tokenizer import CharTokenizer, SentencePieceTokenizer
from tests.asr.ctc_corpus import single_thread, tiny_model_config


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


TEXTS = ["abc abd", "dcba", "bad cab", "aab ddc"]


def _model(tokenizer=None, **model) -> CTCModel:
    tok = tokenizer if tokenizer is not None else CharTokenizer.train(TEXTS)
    cfg = ModelConfig.from_dict({**tiny_model_config(), "vocab_size": tok.vocab_size, **model})
    g = torch.Generator().manual_seed(3)
    mvn = compute_stats([torch.randn(40, 23, generator=g) * 2 + 1]) if cfg.normalize else None
    return CTCModel(cfg, tokenizer=tok, normalizer=mvn).eval()


def _wav():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4000, generator=g) * 0.3, torch.tensor([4000, 2900])


def _assert_same(a: CTCModel, b: CTCModel) -> None:
    wav, lengths = _wav()
    lp_a, n_a = a.log_probs(wav, lengths)
    lp_b, n_b = b.log_probs(wav, lengths)
    assert torch.equal(lp_a, lp_b) and torch.equal(n_a, n_b)
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_char_model_is_exact(tmp_path):
    model = _model()
    path = model.save(tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "feats_stats.npz",
        "model.safetensors",
        "tokenizer.json",
        "tokens.txt",
    ]
    back = CTCModel.load(path)
    assert not back.training
    _assert_same(model, back)
    assert back.tokenizer.tokens == model.tokenizer.tokens
    for name in ("count", "feat_sum", "feat_sum_square", "mean", "std"):
        assert torch.equal(getattr(back.normalize, name), getattr(model.normalize, name))
    wav = np.random.default_rng(0).standard_normal(3000).astype(np.float32) * 0.3
    assert back.transcribe([wav], beam=3) == model.transcribe([wav], beam=3)


def test_round_trip_sentencepiece_interctc_model(tmp_path):
    tok = SentencePieceTokenizer.train(TEXTS * 4, tmp_path / "bpe", vocab_size=12)
    enc = {**tiny_model_config()["encoder"], "interctc_layers": [1], "interctc_use_conditioning": True}
    model = _model(tok, interctc_weight=0.4, encoder=enc)
    back = load_model(save_model(model, tmp_path / "m"))
    _assert_same(model, back)
    assert (tmp_path / "m" / "bpe.model").is_file() and back.tokenizer.kind == "sentencepiece"
    assert back.encoder.conditioning_layer is not None


def test_model_without_normalization_or_tokenizer(tmp_path):
    model = _model(normalize=None)
    model.tokenizer = None
    back = load_model(save_model(model, tmp_path / "m"))
    _assert_same(model, back)
    assert back.normalize is None and back.tokenizer is None
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]


def test_config_json_schema(tmp_path):
    model = _model()
    save_model(model, tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    assert doc["format"] == "ebranchformer" and doc["version"] == 1
    assert doc["model"] == json.loads(json.dumps(model.config.to_dict()))
    assert {"features", "normalize", "encoder", "vocab_size", "ctc_dropout"} <= set(doc["model"])
    assert doc["files"] == {
        "weights": "model.safetensors",
        "normalization_stats": "feats_stats.npz",
        "tokenizer": "tokenizer.json",
    }
    cfg, _ = read_config(tmp_path / "m")
    assert cfg == model.config


def test_load_on_device_argument(tmp_path):
    back = load_model(save_model(_model(), tmp_path / "m"), map_location="cpu")
    assert back.device == torch.device("cpu")


# --------------------------------------------------------------------------------------------------- errors
@pytest.fixture
def saved(tmp_path):
    return save_model(_model(), tmp_path / "m")


def _edit_config(path, fn):
    doc = json.loads((path / "config.json").read_text())
    fn(doc)
    (path / "config.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("version", [2, 0, None, "1"])
def test_unknown_schema_version(saved, version):
    _edit_config(saved, lambda d: d.__setitem__("version", version))
    with pytest.raises(ValueError, match=r"config\.json.*version"):
        load_model(saved)


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda d: d.__setitem__("format", "espnet"), "format"),
        (lambda d: d["model"].__setitem__("normalize", "bogus"), "invalid model config"),
        (lambda d: d["model"].__setitem__("bogus_key", 1), "bogus_key"),
        (lambda d: d["files"].__setitem__("weights", "../x.safetensors"), "files.weights"),
        (lambda d: d["files"].__setitem__("normalization_stats", None), "normalization_stats"),
        (lambda d: d.pop("files"), "files"),
    ],
)
def test_malformed_config_json(saved, edit, words):
    _edit_config(saved, edit)
    with pytest.raises(ModelDirError, match=words) as e:
        load_model(saved)
    assert "config.json" in str(e.value)


@pytest.mark.parametrize(
    "name", ["config.json", "model.safetensors", "feats_stats.npz", "tokenizer.json", "tokens.txt"]
)
def test_missing_file_is_named(saved, name):
    (saved / name).unlink()
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_model(saved)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "feats_stats.npz", "tokens.txt"])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_file_is_named(saved, name, damage):
    f = saved / name
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage\xff" * 20)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_model(saved)


def test_weights_that_do_not_fit_the_config(saved):
    _edit_config(saved, lambda d: d["model"]["encoder"].__setitem__("num_layers", 3))
    with pytest.raises(ModelDirError, match=r"model\.safetensors.*missing"):
        load_model(saved)
    _edit_config(saved, lambda d: d["model"]["encoder"].update(num_layers=2, out_dim=16))
    with pytest.raises(ModelDirError, match=r"model\.safetensors"):
        load_model(saved)


def test_stats_that_disagree_with_weights(saved, tmp_path):
    compute_stats([torch.randn(10, 23)]).save_stats(saved / "feats_stats.npz")
    with pytest.raises(ModelDirError, match=r"feats_stats\.npz.*disagrees"):
        load_model(saved)


def test_tokenizer_of_wrong_size(saved):
    CharTokenizer.train(["xyz"]).save(saved)
    with pytest.raises(ModelDirError, match=r"tokenizer\.json.*vocab_size"):
        load_model(saved)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ModelDirError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirError, match=r"config\.json.*missing"):
        load_model(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------ atomicity
def _no_temps(folder) -> bool:
    return not any(is_temp_name(p.name) for p in folder.iterdir())


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = _model()

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(md, "save_weights", broken)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tmp_path / "m")
    assert not (tmp_path / "m").exists() and _no_temps(tmp_path)


def test_failed_save_keeps_the_previous_model(tmp_path, monkeypatch):
    old = _model()
    path = save_model(old, tmp_path / "m")
    new = _model()
    with torch.no_grad():
        new.ctc.linear.bias.add_(1.0)
    monkeypatch.setattr(
        type(new.tokenizer), "save", lambda self, d: (_ for _ in ()).throw(RuntimeError("boom"))
    )
    with pytest.raises(RuntimeError, match="boom"):
        save_model(new, path)
    assert _no_temps(tmp_path)
    _assert_same(old, load_model(path))
    monkeypatch.undo()
    save_model(new, path)  # a successful save replaces it
    _assert_same(new, load_model(path))
    assert _no_temps(tmp_path)


def test_refuses_to_overwrite_other_directories(tmp_path):
    other = tmp_path / "data"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(ModelDirError, match="not a model directory"):
        save_model(_model(), other)
    assert (other / "precious.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelDirError, match="not a directory"):
        save_model(_model(), tmp_path / "file")
    (tmp_path / "empty").mkdir()
    save_model(_model(), tmp_path / "empty")  # an empty directory is fine
    assert (tmp_path / "empty" / "config.json").is_file()
    with pytest.raises(TypeError, match="CTCModel"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "x")
