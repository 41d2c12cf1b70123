"""ESPnet experiment import: a genuine espnet2 experiment directory (config.yaml, ESPnetASRModel state_dict,
feats_stats.npz, tokens.txt) converted into our model directory gives ESPnet's own pipeline's encoder output and
greedy CTC tokens; bad experiments fail with clear errors and leave nothing behind."""

from __future__ import annotations

import itertools
import logging
import os
import shutil

import numpy as np
import pytest
import torch
import yaml

from ebranchformer.asr.ctc_model import CTCModel
from ebranchformer.asr.decoding import ctc_greedy
from ebranchformer.asr.feature_config import FeatureConfig
from ebranchformer.asr.features import LogMelFeatures
from ebranchformer.interop.espnet_experiment import (
    convert_espnet_experiment,
    espnet_feature_config,
    espnet_specaug_config,
)

from ..asr.ctc_corpus import single_thread
from ..asr.test_features import espnet_layers  # noqa: F401  (fixture: ESPnet's Stft, LogMel with stand-ins)
from ..nn.conftest import perturb_
from .speech import utterances


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():  # tiny models: more threads only wait for each other on a shared CPU
        yield


ENCODER_CONF = {  # a recipe's encoder_conf at small dims (d64, 2 blocks, conv2d, macaron FFNs)
    "output_size": 64, "attention_heads": 4, "attention_layer_type": "rel_selfattn", "pos_enc_layer_type": "rel_pos",
    "rel_pos_type": "latest", "cgmlp_linear_units": 128, "cgmlp_conv_kernel": 7, "use_linear_after_conv": False,
    "gate_activation": "identity", "num_blocks": 2, "dropout_rate": 0.1, "positional_dropout_rate": 0.1,
    "attention_dropout_rate": 0.1, "input_layer": "conv2d", "layer_drop_rate": 0.0, "linear_units": 96,
    "positionwise_layer_type": "linear", "use_ffn": True, "macaron_ffn": True, "merge_conv_kernel": 5,
}  # fmt: skip
FRONTEND_CONF = {"n_fft": 512, "win_length": 400, "hop_length": 160, "fs": "16k"}
TOKENS = ["<blank>", "<unk>", "<space>", *"etaoinshrdlcumwfgypbvk", "<sos/eos>"]
STATS = "exp/asr_stats_raw_en_char/train/feats_stats.npz"
TOKEN_FILE = "data/en_token_list/char/tokens.txt"
EXP = "exp/asr_train_asr_e_branchformer_raw_en_char"


def _recipe_config(**changes) -> dict:
    """A config.yaml as espnet2's asr.sh writes it (small dims)."""
    conf = {
        "config": "conf/tuning/train_asr_e_branchformer.yaml",
        "output_dir": EXP,
        "ngpu": 1,
        "seed": 2022,
        "batch_type": "numel",
        "max_epoch": 70,
        "optim": "adam",
        "optim_conf": {"lr": 0.002, "weight_decay": 1.0e-06},
        "scheduler": "warmuplr",
        "scheduler_conf": {"warmup_steps": 15000},
        "token_list": TOKEN_FILE,
        "init": None,
        "input_size": None,
        "ctc_conf": {"dropout_rate": 0.0, "ctc_type": "builtin", "reduce": True, "ignore_nan_grad": None,
                     "zero_infinity": True},
        "use_preprocessor": True,
        "token_type": "char",
        "bpemodel": None,
        "non_linguistic_symbols": None,
        "cleaner": None,
        "g2p": None,
        "frontend": "default",
        "frontend_conf": dict(FRONTEND_CONF),
        "specaug": "specaug",
        "specaug_conf": {"apply_time_warp": True, "time_warp_window": 5, "time_warp_mode": "bicubic",
                         "apply_freq_mask": True, "freq_mask_width_range": [0, 27], "num_freq_mask": 2,
                         "apply_time_mask": True, "time_mask_width_ratio_range": [0.0, 0.05], "num_time_mask": 10},
        "normalize": "global_mvn",
        "normalize_conf": {"stats_file": STATS},
        "model": "espnet",
        "model_conf": {"ctc_weight": 0.3, "lsm_weight": 0.1, "length_normalized_loss": False},
        "preencoder": None,
        "preencoder_conf": {},
        "encoder": "e_branchformer",
        "encoder_conf": dict(ENCODER_CONF),
        "postencoder": None,
        "postencoder_conf": {},
        "decoder": "transformer",
        "decoder_conf": {"attention_heads": 4, "linear_units": 64, "num_blocks": 1, "dropout_rate": 0.1},
        "preprocessor": "default",
        "preprocessor_conf": {},
        "required": ["output_dir", "token_list"],
        "version": "202511",
        "distributed": False,
    }  # fmt: skip
    conf.update(changes)
    return conf


def _espnet_asr_model(Stft, LogMel, stats_file: str):
    """ESPnet's ESPnetASRModel with a DefaultFrontend-equivalent frontend (ESPnet's Stft + LogMel: the real
    DefaultFrontend needs torchaudio), ESPnet's GlobalMVN, EBranchformerEncoder, TransformerDecoder and CTC;
    random weights, every 1-D parameter moved off its init value."""
    from espnet2.asr import espnet_model
    from espnet2.asr.ctc import CTC
    from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
    from espnet2.asr.encoder.e_branchformer_encoder import EBranchformerEncoder
    from espnet2.asr.frontend.abs_frontend import AbsFrontend
    from espnet2.layers.global_mvn import GlobalMVN

    class Frontend(AbsFrontend):  # DefaultFrontend.forward without its WPE/beamformer branches
        def __init__(self):
            super().__init__()
            self.stft = Stft(n_fft=512, win_length=400, hop_length=160)
            self.logmel = LogMel(fs=16000, n_fft=512, n_mels=80)

        def output_size(self) -> int:
            return 80

        def forward(self, x, lengths):
            spec, feat_lengths = self.stft(x, lengths)
            feats, _ = self.logmel(spec[..., 0] ** 2 + spec[..., 1] ** 2, feat_lengths)
            return feats, feat_lengths

    torch.manual_seed(7)
    v = len(TOKENS)
    encoder = EBranchformerEncoder(80, **ENCODER_CONF)
    decoder = TransformerDecoder(v, 64, attention_heads=4, linear_units=64, num_blocks=1)
    ctc = CTC(v, 64)
    model = espnet_model.ESPnetASRModel(
        v,
        TOKENS,
        Frontend(),
        None,
        GlobalMVN(stats_file),
        None,
        encoder,
        None,
        decoder,
        ctc,
        None,
        ctc_weight=0.3,
    )
    perturb_(model, seed=7)
    model.eval()
    # A random encoder's output barely moves over time; centre the CTC head on its mean output and scale it up
    # so that the argmax changes from frame to frame and stays far from ties.
    with torch.no_grad():
        mean_h = torch.cat([_espnet_encode(model, w)[0] for w in utterances()]).mean(0)  # (D,)
        ctc.ctc_lo.weight.mul_(20.0)
        ctc.ctc_lo.bias.copy_(-ctc.ctc_lo.weight @ mean_h)
        ctc.ctc_lo.bias[0] += 2.0
    return model


def _feats_stats(path, Stft, LogMel) -> None:
    """ESPnet's collect_stats output over the test utterances (count, sum, sum_square of the log-mels)."""
    stft, logmel = Stft(n_fft=512, win_length=400, hop_length=160), LogMel(fs=16000, n_fft=512, n_mels=80)
    count, total, total_sq = 0, np.zeros(80), np.zeros(80)
    for w in utterances():
        spec, n = stft(torch.from_numpy(w.copy())[None], torch.tensor([len(w)]))
        f = logmel(spec[..., 0] ** 2 + spec[..., 1] ** 2, n)[0][0].double().numpy()
        count, total, total_sq = count + f.shape[0], total + f.sum(0), total_sq + (f * f).sum(0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, count=np.asarray(count), sum=total, sum_square=total_sq)


@pytest.fixture
def experiment(tmp_path, request):
    """A recipe directory ``tmp_path/recipe`` with the experiment; returns (recipe, config, pth, model)."""
    pytest.importorskip("espnet2.asr.espnet_model")
    Stft, LogMel = request.getfixturevalue("espnet_layers")
    recipe = tmp_path / "recipe"
    (recipe / EXP).mkdir(parents=True)
    (recipe / TOKEN_FILE).parent.mkdir(parents=True)
    (recipe / TOKEN_FILE).write_text("".join(t + "\n" for t in TOKENS), encoding="utf-8")
    _feats_stats(str(recipe / STATS), Stft, LogMel)
    model = _espnet_asr_model(Stft, LogMel, str(recipe / STATS))
    config = recipe / EXP / "config.yaml"
    config.write_text(yaml.safe_dump(_recipe_config(), sort_keys=False), encoding="utf-8")
    pth = recipe / EXP / "valid.acc.ave_10best.pth"
    torch.save(model.state_dict(), pth)
    return recipe, config, pth, model


def _padded(wavs) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded batch (B, S) and lengths (B,) of waveforms."""
    lengths = torch.tensor([len(w) for w in wavs])
    batch = torch.zeros(len(wavs), int(lengths.max()))
    for i, w in enumerate(wavs):
        batch[i, : len(w)] = torch.from_numpy(w.copy())
    return batch, lengths


def _espnet_encode(model, wav: np.ndarray) -> torch.Tensor:
    """ESPnet's encode (frontend, normalize, encoder) of one utterance: (T', D)."""
    with torch.no_grad():
        return model.encode(torch.from_numpy(wav.copy())[None], torch.tensor([len(wav)]))[0]


def _espnet_greedy(model, wav: np.ndarray) -> tuple[torch.Tensor, list[int]]:
    """ESPnet's pipeline on one utterance: encode, CTC argmax, collapse repeats, drop blanks."""
    h = _espnet_encode(model, wav)
    with torch.no_grad():
        best = model.ctc.argmax(h)[0].tolist()
    return h[0], [t for t, _ in itertools.groupby(best) if t != 0]


@pytest.mark.parity
def test_converted_experiment_equals_espnet_pipeline(experiment, tmp_path, monkeypatch, caplog):
    _, config, pth, ref = experiment
    monkeypatch.chdir(tmp_path)  # paths in the config are relative to the recipe directory
    with caplog.at_level(logging.WARNING, logger="ebranchformer.interop.espnet_experiment"):
        out = convert_espnet_experiment(config, pth, tmp_path / "model")
    assert any("decoder" in r.getMessage() for r in caplog.records)  # the decoder is ignored with a notice
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "feats_stats.npz", "model.safetensors", "tokenizer.json", "tokens.txt"]
    )
    model = CTCModel.load(out)
    assert model.config.features == FeatureConfig.espnet()  # n_fft 512, win 400, hop 160, 80 mels at 16 kHz
    assert model.tokenizer.tokens == TOKENS

    wavs = utterances()
    batch, lengths = _padded(wavs)
    with torch.no_grad():
        h, h_lengths = model.encode(batch, lengths)  # one padded batch (masked mode is batch-invariant)
        lp, lp_lengths = model.log_probs(batch, lengths)
    ours_tokens = ctc_greedy(lp, lp_lengths)
    texts = model.transcribe([w.copy() for w in wavs], batch_size=1)
    some_tokens = False
    for i, w in enumerate(wavs):
        h_ref, tokens_ref = _espnet_greedy(ref, w)
        assert int(h_lengths[i]) == h_ref.shape[0]
        torch.testing.assert_close(h[i, : h_ref.shape[0]], h_ref, rtol=0, atol=1e-4)
        assert ours_tokens[i] == tokens_ref
        assert texts[i] == model.tokenizer.decode(tokens_ref)
        some_tokens |= len(tokens_ref) > 2
    assert some_tokens  # the comparison is not between two empty outputs


@pytest.mark.parity
def test_legacy_padding_equals_espnet_batched_forward(experiment, tmp_path):
    _, config, pth, ref = experiment
    model = CTCModel.load(convert_espnet_experiment(config, pth, tmp_path / "m", padding="espnet_legacy"))
    wavs = utterances()
    batch, lengths = _padded(wavs)
    with torch.no_grad():
        h_ref, n_ref = ref.encode(batch, lengths)  # ESPnet's batched forward, padding quirks included
        h, n = model.encode(batch, lengths)
    assert n.tolist() == n_ref.tolist()
    for i in range(len(wavs)):
        torch.testing.assert_close(h[i, : n[i]], h_ref[i, : n[i]], rtol=0, atol=1e-4)


@pytest.mark.parity
def test_token_list_inline_and_stats_fallback(experiment, tmp_path, caplog):
    """token_list given inline in the yaml; a missing stats file falls back to the checkpoint's mean/std."""
    recipe, config, pth, ref = experiment
    conf = _recipe_config(token_list=TOKENS, normalize_conf={"stats_file": "gone/feats_stats.npz"})
    config.write_text(yaml.safe_dump(conf), encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        model = CTCModel.load(convert_espnet_experiment(config, pth, tmp_path / "m"))
    assert any("normalize.mean" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(model.normalize.mean, ref.normalize.mean.float(), rtol=0, atol=0)
    torch.testing.assert_close(model.normalize.std, ref.normalize.std.float(), rtol=1e-6, atol=0)
    # and the explicit stats argument wins over the config's path
    model2 = CTCModel.load(convert_espnet_experiment(config, pth, tmp_path / "m2", stats=recipe / STATS))
    assert int(model2.normalize.count) > 1


# ---------------------------------------------------------------------------------------------------------------
# Errors: each names the problem, and nothing is left at out_dir


def _assert_nothing_written(out) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temporaries


def _truncate(recipe, config, pth, tmp_path) -> dict:
    data = pth.read_bytes()
    pth.write_bytes(data[: len(data) // 2])
    return {}


def _conformer_encoder(recipe, config, pth, tmp_path) -> dict:
    config.write_text(yaml.safe_dump(_recipe_config(encoder="conformer")), encoding="utf-8")
    return {}


def _short_token_list(recipe, config, pth, tmp_path) -> dict:
    (recipe / TOKEN_FILE).write_text("".join(t + "\n" for t in TOKENS[:-2] + ["<sos/eos>"]), encoding="utf-8")
    return {}


def _stats_of_dim_40(recipe, config, pth, tmp_path) -> dict:
    bad = tmp_path / "stats40.npz"
    np.savez(bad, count=np.asarray(100), sum=np.zeros(40), sum_square=np.full(40, 100.0))
    return {"stats": bad}


@pytest.mark.parity
@pytest.mark.parametrize(
    "spoil, match",
    [
        (_truncate, r"not a readable PyTorch checkpoint \(truncated\?\)"),
        (_conformer_encoder, "unsupported encoder type 'conformer'"),
        (
            _short_token_list,
            rf"token list has {len(TOKENS) - 1} tokens, but the CTC head .* has {len(TOKENS)}",
        ),
        (_stats_of_dim_40, "have dimension 40, but the encoder input .* has dimension 80"),
    ],
    ids=["truncated-checkpoint", "unsupported-encoder", "token-list-size", "stats-dimension"],
)
def test_bad_experiment_fails_and_writes_nothing(experiment, tmp_path, spoil, match):
    recipe, config, pth, _ = experiment
    kwargs = spoil(recipe, config, pth, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        convert_espnet_experiment(config, pth, out, **kwargs)
    _assert_nothing_written(out)


@pytest.mark.parity
def test_other_bad_experiments(experiment, tmp_path):
    _, config, pth, ref = experiment
    out = tmp_path / "out"
    # stats of the right size but not this model's
    other = tmp_path / "other.npz"
    np.savez(other, count=np.asarray(10), sum=np.zeros(80), sum_square=np.full(80, 10.0))
    with pytest.raises(ValueError, match="disagree with the checkpoint's normalize.mean"):
        convert_espnet_experiment(config, pth, out, stats=other)
    # an unexpected checkpoint key
    sd = ref.state_dict()
    torch.save({**sd, "joint_network.lin_out.weight": torch.zeros(3, 3)}, pth)
    with pytest.raises(ValueError, match=r"unexpected keys \['joint_network.lin_out.weight'\]"):
        convert_espnet_experiment(config, pth, out)
    # encoder weights that do not fit encoder_conf
    torch.save({k: v for k, v in sd.items() if k != "encoder.encoders.1.norm_mha.weight"}, pth)
    with pytest.raises(ValueError, match=r"missing keys \['encoders.1.norm_mha.weight'\]"):
        convert_espnet_experiment(config, pth, out)
    # frontend_conf that does not match the checkpoint's mel matrix
    torch.save(sd, pth)
    config.write_text(
        yaml.safe_dump(_recipe_config(frontend_conf={**FRONTEND_CONF, "fs": "8k"})), encoding="utf-8"
    )
    with pytest.raises(ValueError, match="frontend.logmel.melmat .* does not match frontend_conf"):
        convert_espnet_experiment(config, pth, out)
    # a CTC-less model
    config.write_text(yaml.safe_dump(_recipe_config(model_conf={"ctc_weight": 0.0})), encoding="utf-8")
    with pytest.raises(ValueError, match="no CTC head"):
        convert_espnet_experiment(config, pth, out)
    _assert_nothing_written(out)
    # an existing out_dir is not replaced without overwrite=True, and kept as it was
    out.mkdir()
    (out / "keep.txt").write_text("x")
    config.write_text(yaml.safe_dump(_recipe_config()), encoding="utf-8")
    with pytest.raises(FileExistsError, match="already exists"):
        convert_espnet_experiment(config, pth, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    shutil.rmtree(out)


# ---------------------------------------------------------------------------------------------------------------
# Option mapping (no ESPnet needed)


def test_frontend_conf_mapping_follows_default_frontend():
    # DefaultFrontend's own defaults: hop 128, win_length = n_fft
    assert espnet_feature_config({}) == FeatureConfig.espnet(hop_length=128, win_length=512)
    fc = espnet_feature_config(
        {"fs": "8k", "n_fft": 256, "win_length": 200, "hop_length": 80, "n_mels": 40, "window": "hamming",
         "fmin": 20, "fmax": 3800, "center": False}
    )  # fmt: skip
    assert fc == FeatureConfig.espnet(
        sample_rate=8000, n_fft=256, win_length=200, hop_length=80, n_mels=40, window="hamming", fmin=20.0,
        fmax=3800.0, center=False,
    )  # fmt: skip
    feats, n = LogMelFeatures(fc)(torch.randn(1, 8000), torch.tensor([8000]))
    assert feats.shape == (1, (8000 - 256) // 80 + 1, 40) and n.tolist() == [feats.shape[1]]
    for bad, match in (
        ({"htk": True}, "htk=True is not supported"),
        ({"normalized": True}, "normalized=True"),
        ({"window": None}, "rectangular"),
        ({"frontend_conf": {"use_wpe": True}}, "WPE"),
        ({"fs": "16 kHz!"}, "fs must be"),
        ({"n_ftt": 512}, r"unknown ESPnet DefaultFrontend option\(s\) \['n_ftt'\]"),
    ):
        with pytest.raises(ValueError, match=match):
            espnet_feature_config(bad)


def test_specaug_conf_mapping():
    sa = espnet_specaug_config(_recipe_config()["specaug_conf"])
    assert (sa.time_warp_window, sa.num_freq_masks, sa.freq_mask_width, sa.num_time_masks) == (
        5,
        2,
        (0, 27),
        10,
    )
    assert sa.time_mask_width_ratio == (0.0, 0.05) and sa.time_mask_width is None
    off = espnet_specaug_config(
        {"apply_time_warp": False, "apply_time_mask": False, "freq_mask_width_range": 30}
    )
    assert (off.time_warp_window, off.num_time_masks, off.freq_mask_width) == (0, 0, (0, 30))
    with pytest.raises(ValueError, match="exactly one of"):
        espnet_specaug_config({})
