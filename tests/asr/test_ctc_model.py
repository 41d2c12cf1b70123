"""CTCModel and ModelConfig: the loss against a direct ctc_loss, interCTC and self-conditioning wiring,
padding invariance, SpecAugment only in training, the feature-input path, decoding / transcribe, input
checks."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ebranchformer.asr.ctc_model import CTCModel
from ebranchformer.asr.decoding import ctc_greedy
from ebranchformer.asr.global_mvn import compute_stats
from ebranchformer.asr.model_config import ModelConfig, default_encoder
from ebranchformer.asr.tokenizer import CharTokenizer
from ebranchformer.nn.encoder import EncoderConfig
from tests.asr.ctc_corpus import SAMPLE_RATE, single_thread, tiny_model_config, tone_wave


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


V = 7


def _config(**model) -> ModelConfig:
    return ModelConfig.from_dict({**tiny_model_config(), "vocab_size": V, **model})


def _batch(seed: int = 0, lengths=(4000, 2500, 3200)):
    g = torch.Generator().manual_seed(seed)
    wav = torch.randn(len(lengths), max(lengths), generator=g) * 0.3  # (B, S)
    wav_lengths = torch.tensor(lengths)
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, -1, -1], [2, 2, 3, -1]])[: len(lengths)]  # (B, U) padded -1
    token_lengths = torch.tensor([4, 2, 3])[: len(lengths)]
    return wav, wav_lengths, tokens, token_lengths


# --------------------------------------------------------------------------------------------------- config
def test_config_round_trips_and_is_complete():
    cfg = _config(interctc_weight=0.3, encoder={**tiny_model_config()["encoder"], "interctc_layers": [1]})
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert ModelConfig.from_yaml(cfg.to_yaml()) == cfg
    enc = cfg.encoder_config()
    assert isinstance(enc, EncoderConfig) and enc.in_dim == 23 and enc.vocab_size == V
    # every EncoderConfig option is stored (resolved), except the derived ones
    assert set(cfg.encoder) == {f for f in EncoderConfig.__dataclass_fields__} - {"in_dim", "vocab_size"}
    assert cfg.encoder["interctc_layers"] == [1]


def test_default_encoder_is_espnet_ebranchformer_shape():
    cfg = ModelConfig(vocab_size=10)
    enc = cfg.encoder_config()
    assert (enc.out_dim, enc.num_layers, enc.final_norm) == (256, 12, True)
    assert enc.input_embedding_scale == pytest.approx(16.0)
    assert cfg.encoder["encoder_layer"]["class"] == "EBranchformerLayer"
    assert default_encoder(64)["encoder_layer"]["ff_dim"] == 256


@pytest.mark.parametrize(
    ("changes", "exc", "words"),
    [
        ({"normalize": "utterance_mvn"}, ValueError, "normalize"),
        ({"interctc_weight": 0.5}, ValueError, "interctc_layers"),
        ({"interctc_weight": 1.0}, ValueError, "interctc_weight"),
        ({"ctc_dropout": -0.1}, ValueError, "ctc_dropout"),
        ({"vocab_size": 1}, ValueError, "vocab_size"),
        ({"features": None}, ValueError, "feature_dim"),
        ({"feature_dim": 40}, ValueError, "feature_dim"),
        ({"specaug": 3}, TypeError, "specaug"),
        ({"encoder": {"in_dim": 80}}, ValueError, "in_dim"),
        ({"encoder": {"vocab_size": 99}}, ValueError, "vocab_size"),
        ({"encoder": {"num_heads": 5}}, ValueError, "num_heads"),
        ({"encoder": {"bogus": 1}}, ValueError, "bogus"),
        ({"encoder": [1, 2]}, TypeError, "encoder"),
    ],
)
def test_config_rejects_bad_values(changes, exc, words):
    doc = {**tiny_model_config(), "vocab_size": V, **changes}
    with pytest.raises(exc, match=words):
        ModelConfig.from_dict(doc)


def test_config_without_vocab_validates_and_takes_encoder_vocab():
    enc = {**tiny_model_config()["encoder"], "interctc_layers": [1], "interctc_use_conditioning": True}
    cfg = ModelConfig.from_dict({**tiny_model_config(), "encoder": enc})  # vocab unknown yet: allowed
    assert cfg.vocab_size is None
    with pytest.raises(ValueError, match="vocab_size"):
        cfg.encoder_config()
    with pytest.raises(ValueError, match="vocab_size"):
        CTCModel(cfg)
    assert cfg.replace(vocab_size=9).encoder_config().vocab_size == 9
    assert (
        ModelConfig.from_dict({**tiny_model_config(), "encoder": {**enc, "vocab_size": 11}}).vocab_size == 11
    )


@settings(max_examples=20, deadline=None)
@given(w=st.floats(0.0, 0.99), layers=st.lists(st.integers(1, 3), min_size=1, max_size=3, unique=True))
def test_config_round_trip_property(w, layers):
    enc = {**tiny_model_config()["encoder"], "num_layers": 4, "interctc_layers": layers}
    cfg = ModelConfig.from_dict(
        {**tiny_model_config(), "vocab_size": V, "interctc_weight": w, "encoder": enc}
    )
    back = ModelConfig.from_json(cfg.to_json())
    assert back == cfg and back.interctc_weight == w and back.encoder["interctc_layers"] == layers


# ----------------------------------------------------------------------------------------------------- loss
def test_loss_is_espnet_batch_mean_ctc():
    model = CTCModel(_config()).eval()
    wav, wav_lengths, tokens, token_lengths = _batch()
    loss, stats = model(wav, wav_lengths, tokens, token_lengths)
    lp, lp_lengths = model.log_probs(wav, wav_lengths)  # (B, T', V)
    per_utt = [
        F.ctc_loss(
            lp[b, : lp_lengths[b]],
            tokens[b, : token_lengths[b]],
            lp_lengths[b : b + 1],
            token_lengths[b : b + 1],
            reduction="sum",
        )
        for b in range(3)
    ]
    expected = torch.stack(per_utt).sum() / 3
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert stats["loss"] == pytest.approx(loss.item()) and stats["loss_ctc"] == pytest.approx(loss.item())
    assert stats["frames"] == float(lp_lengths.sum()) and stats["batch_size"] == 3.0
    assert stats["feat_frames"] == float(model.frontend.num_frames(wav_lengths).sum())


def test_loss_does_not_depend_on_batch_mates_or_padding():
    model = CTCModel(_config()).eval()
    wav, wav_lengths, tokens, token_lengths = _batch()
    loss, _ = model(wav, wav_lengths, tokens, token_lengths)
    # each row alone, with the same (zero) padding after it: the batch loss is the mean of the rows' losses
    singles = [
        model(wav[b : b + 1], wav_lengths[b : b + 1], tokens[b : b + 1], token_lengths[b : b + 1])[0]
        for b in range(3)
    ]
    torch.testing.assert_close(loss, torch.stack(singles).mean(), rtol=1e-5, atol=1e-5)
    noisy = wav.clone()
    for b in range(3):  # garbage instead of zeros past the lengths changes nothing
        noisy[b, wav_lengths[b] :] = torch.randn(wav.shape[1] - int(wav_lengths[b]))
    torch.testing.assert_close(
        model(noisy, wav_lengths, tokens, token_lengths)[0], loss, rtol=1e-6, atol=1e-6
    )


def test_impossible_alignment_gives_zero_loss_not_inf():
    model = CTCModel(_config()).eval()
    wav = torch.randn(1, 600) * 0.3  # 7 frames -> 1 encoder frame, 4 tokens cannot fit
    loss, _ = model(wav, torch.tensor([600]), torch.tensor([[1, 2, 3, 4]]), torch.tensor([4]))
    assert loss.item() == 0.0
    strict = CTCModel(_config(ctc_zero_infinity=False)).eval()
    assert torch.isinf(strict(wav, torch.tensor([600]), torch.tensor([[1, 2, 3, 4]]), torch.tensor([4]))[0])


def test_interctc_loss_combines_layer_losses():
    enc = {**tiny_model_config()["encoder"], "num_layers": 3, "interctc_layers": [1, 2]}
    model = CTCModel(_config(interctc_weight=0.3, encoder=enc)).eval()
    wav, wav_lengths, tokens, token_lengths = _batch()
    outs = {}
    hooks = [
        layer.register_forward_hook(lambda m, a, y, i=i: outs.__setitem__(i, y))
        for i, layer in enumerate(model.encoder.layers)
    ]
    loss, stats = model(wav, wav_lengths, tokens, token_lengths)
    for h in hooks:
        h.remove()
    _, h_lengths = model.encode(wav, wav_lengths)
    inter = [model.ctc.loss(outs[i - 1], h_lengths, tokens, token_lengths) for i in (1, 2)]
    for i, li in zip((1, 2), inter):
        assert stats[f"loss_interctc_layer{i}"] == pytest.approx(li.item(), rel=1e-5)
    expected = 0.7 * stats["loss_ctc"] + 0.3 * (inter[0].item() + inter[1].item()) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["loss"] == pytest.approx(expected, rel=1e-5)
    assert "loss_interctc_layer3" not in stats


def test_self_conditioning_feeds_ctc_head_into_encoder():
    enc = {
        **tiny_model_config()["encoder"],
        "num_layers": 3,
        "interctc_layers": [1],
        "interctc_use_conditioning": True,
    }
    model = CTCModel(_config(interctc_weight=0.5, encoder=enc)).eval()
    assert model.encoder.conditioning_layer is not None
    wav, wav_lengths, tokens, token_lengths = _batch()
    h0, _ = model.encode(wav, wav_lengths)
    with torch.no_grad():
        model.ctc.linear.weight.add_(torch.randn_like(model.ctc.linear.weight))
    h1, _ = model.encode(wav, wav_lengths)
    assert not torch.allclose(h0, h1)  # the CTC head's posteriors enter the encoder
    loss, _ = model(wav, wav_lengths, tokens, token_lengths)
    loss.backward()
    assert model.encoder.conditioning_layer.weight.grad.abs().sum() > 0

    plain = CTCModel(_config(interctc_weight=0.5, encoder={**enc, "interctc_use_conditioning": False})).eval()
    p0, _ = plain.encode(wav, wav_lengths)
    with torch.no_grad():
        plain.ctc.linear.weight.add_(1.0)
    torch.testing.assert_close(plain.encode(wav, wav_lengths)[0], p0)  # no conditioning: head not involved


# ---------------------------------------------------------------------------------------------------- paths
def test_specaug_applies_in_training_only():
    spec = {
        "time_warp_window": 0,
        "num_freq_masks": 2,
        "freq_mask_width": [3, 6],
        "num_time_masks": 2,
        "time_mask_width": [2, 5],
    }
    model = CTCModel(_config(specaug=spec))
    plain = CTCModel(_config())
    plain.load_state_dict(model.state_dict())
    wav, wav_lengths, _, _ = _batch()
    model.eval(), plain.eval()
    torch.testing.assert_close(model.encode(wav, wav_lengths)[0], plain.encode(wav, wav_lengths)[0])
    model.train(), plain.train()  # dropout is 0: only SpecAugment differs
    assert not torch.allclose(model.encode(wav, wav_lengths)[0], plain.encode(wav, wav_lengths)[0])


def test_normalizer_is_applied_before_encoder():
    model = CTCModel(_config()).eval()
    wav, wav_lengths, _, _ = _batch()
    feats, feat_lengths = model.features(wav, wav_lengths)
    rows = [feats[b, : feat_lengths[b]] for b in range(3)]
    mvn = compute_stats(rows)
    model.set_normalizer(mvn)
    normed, _ = mvn(feats, feat_lengths)
    valid = torch.arange(feats.shape[1])[None] < feat_lengths[:, None]  # (B, T)
    assert (
        normed[valid].mean().abs() < 1e-4 and (normed[valid].std(dim=0, correction=0) - 1).abs().max() < 1e-3
    )
    bare = CTCModel(_config(normalize=None)).eval()
    bare.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("normalize.")})
    torch.testing.assert_close(
        model.encode(wav, wav_lengths)[0], bare.encode_features(normed, feat_lengths)[0]
    )
    with pytest.raises(ValueError, match="dim"):
        model.set_normalizer(compute_stats([torch.randn(5, 8)]))
    with pytest.raises(ValueError, match="no normalization"):
        bare.set_normalizer(mvn)


def test_feature_input_model():
    cfg = _config(features=None, feature_dim=23)
    model = CTCModel(cfg).eval()
    assert model.frontend is None
    feats, lengths = torch.randn(2, 60, 23), torch.tensor([60, 41])
    lp, lp_lengths = model.log_probs_features(feats, lengths)
    assert lp.shape == (2, 14, V) and lp_lengths.tolist() == [14, 9]
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, 14))
    loss, stats = model.forward_features(
        feats, lengths, torch.tensor([[1, 2], [3, -1]]), torch.tensor([2, 1])
    )
    assert torch.isfinite(loss) and stats["feat_frames"] == 101.0
    with pytest.raises(ValueError, match="frontend"):
        model.encode(torch.randn(2, 4000), torch.tensor([4000, 4000]))


def test_log_probs_shapes_and_lengths():
    model = CTCModel(_config()).eval()
    wav, wav_lengths, _, _ = _batch()
    lp, lengths = model.log_probs(wav, wav_lengths)
    feat_lengths = model.frontend.num_frames(wav_lengths)
    assert lengths.tolist() == model.encoder.output_lengths(feat_lengths).tolist()
    assert lp.dtype == torch.float32 and lp.shape == (3, int(lengths.max()), V)
    torch.testing.assert_close(lp.logsumexp(-1), torch.zeros(lp.shape[:2]), atol=1e-5, rtol=0)


def test_autocast_keeps_features_in_float32():
    model = CTCModel(_config()).eval()
    wav, wav_lengths, tokens, token_lengths = _batch()
    ref, _ = model.features(wav, wav_lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats, _ = model.features(wav, wav_lengths)
        loss, _ = model(wav, wav_lengths, tokens, token_lengths)
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats, ref)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_features_in_the_models_dtype():
    """A float64 waveform into a float32 model, and a float32 one into a float64 model: features in the model's
    dtype, the same values up to float32 rounding."""
    model = CTCModel(_config()).eval()
    wav, wav_lengths, _, _ = _batch()
    ref, _ = model.log_probs(wav, wav_lengths)
    feats, _ = model.features(wav.double(), wav_lengths)
    lp, _ = model.log_probs(wav.double(), wav_lengths)
    assert feats.dtype == torch.float32 and lp.dtype == torch.float32
    torch.testing.assert_close(lp, ref, atol=1e-4, rtol=0)
    model.double()
    feats, _ = model.features(wav, wav_lengths)
    lp, _ = model.log_probs(wav, wav_lengths)
    assert feats.dtype == torch.float64
    torch.testing.assert_close(lp.float(), ref, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize(
    ("tokens", "lengths", "exc", "words"),
    [
        ([[1, 0, 2]], [3], ValueError, "blank"),
        ([[1, 2, 9]], [3], ValueError, "vocab_size"),
        ([[1, 2, 3]], [4], ValueError, "token_lengths"),
        ([[1, 2, 3]], [0], ValueError, "token_lengths"),
        ([[1.0, 2.0, 3.0]], [3], TypeError, "tokens"),
        ([1, 2, 3], [3], ValueError, "tokens"),
    ],
)
def test_bad_targets_raise(tokens, lengths, exc, words):
    model = CTCModel(_config())
    with pytest.raises(exc, match=words):
        model(torch.randn(1, 3000), torch.tensor([3000]), torch.tensor(tokens), torch.tensor(lengths))


def test_model_argument_checks():
    with pytest.raises(TypeError, match="ModelConfig"):
        CTCModel({"vocab_size": 3})
    with pytest.raises(ValueError, match="vocab_size"):
        CTCModel(_config(), tokenizer=CharTokenizer.train(["abcdefgh"]))
    with pytest.raises(TypeError, match="Tokenizer"):
        CTCModel(_config(), tokenizer="abc")
    with pytest.raises(ValueError, match="normalize"):
        CTCModel(_config(normalize=None), normalizer=compute_stats([torch.randn(4, 23)]))


# ----------------------------------------------------------------------------------------------- transcribe
def _tok_model() -> CTCModel:
    tok = CharTokenizer.train(["abcd"])  # <blank> <unk> a b c d <sos/eos>: 7 tokens
    model = CTCModel(_config(), tokenizer=tok).eval()
    with torch.no_grad():  # a sharp random head, so that the untrained model emits varied tokens
        model.ctc.linear.weight.normal_(0.0, 1.0)
    return model


def test_transcribe_matches_per_utterance_decoding(tmp_path):
    model = _tok_model()
    rng = np.random.default_rng(0)
    wavs = [tone_wave(t, rng) for t in ("abc", "d", "cab", "bbda")]
    path = tmp_path / "u.wav"
    sf.write(path, wavs[2], SAMPLE_RATE, subtype="FLOAT")
    expected = []
    for w in wavs:
        lp, n = model.log_probs(torch.from_numpy(w)[None], torch.tensor([len(w)]))
        expected.append(model.tokenizer.transcript(ctc_greedy(lp, n)[0]))
    assert any(expected)  # a random model still emits something
    inputs = [wavs[0], torch.from_numpy(wavs[1]), str(path), wavs[3]]
    assert model.transcribe(inputs, batch_size=3) == expected
    assert model.transcribe(inputs, batch_size=1) == expected
    assert model.transcribe(wavs[0]) == expected[:1]
    assert model.training is False


def test_transcribe_reports_no_stray_spaces():
    tok = CharTokenizer.train(["ab ba", "abc"])  # <blank> <unk> a b <space> c <sos/eos>: 7 tokens
    model = CTCModel(_config(), tokenizer=tok).eval()
    bias = torch.full((V,), -5.0)
    bias[tok.encode(" ")[0]] = 5.0  # every frame says <space>
    with torch.no_grad():
        model.ctc.linear.weight.zero_()
        model.ctc.linear.bias.copy_(bias)
    wav = tone_wave("ab", np.random.default_rng(2))
    lp, n = model.log_probs(torch.from_numpy(wav)[None], torch.tensor([len(wav)]))
    assert tok.decode(ctc_greedy(lp, n)[0]) == " "  # the collapsed CTC output is one space
    assert model.transcribe([wav]) == [""]


def test_transcribe_beam_and_resampling():
    model = _tok_model()
    bias = torch.full((V,), -5.0)
    bias[3] = 5.0  # every frame says "b"
    with torch.no_grad():
        model.ctc.linear.weight.zero_()
        model.ctc.linear.bias.copy_(bias)
    wav = tone_wave("ab", np.random.default_rng(1))
    assert model.transcribe([wav], beam=4) == ["b"]
    assert model.transcribe([np.repeat(wav, 2)], sample_rate=2 * SAMPLE_RATE) == ["b"]
    model.train()
    model.transcribe([wav])
    assert model.training  # the mode is restored


def test_transcribe_input_checks():
    model = _tok_model()
    with pytest.raises(ValueError, match=r"audio\[1\] is too short"):
        model.transcribe([np.zeros(4000, np.float32), np.zeros(100, np.float32)])
    with pytest.raises(ValueError, match=r"audio\[0\].*1-D float"):
        model.transcribe([np.zeros((2, 4000), np.float32)])
    with pytest.raises(TypeError, match=r"audio\[0\]"):
        model.transcribe([42])
    with pytest.raises(ValueError, match="beam"):
        model.transcribe([np.zeros(4000, np.float32)], beam=0)
    with pytest.raises(ValueError, match="tokenizer"):
        CTCModel(_config()).transcribe([np.zeros(4000, np.float32)])
    n = model.min_num_samples()
    assert model.frontend.num_frames(n) >= model.encoder.input_layer.min_length
    assert model.frontend.num_frames(n - 80) < model.encoder.input_layer.min_length
