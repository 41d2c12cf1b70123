"""Parity with the installed ESPnet 202511 ``EBranchformerEncoder`` (weights loaded from ESPnet), strict loading,
export round trip and parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ebranchformer.interop.espnet import export_espnet_state_dict, load_espnet_encoder

from .grads import assert_grads_close, backward_one_loss, exported_grads

espnet_enc = pytest.importorskip("espnet2.asr.encoder.e_branchformer_encoder")

SMALL = dict(
    output_size=64, attention_heads=4, cgmlp_linear_units=128, cgmlp_conv_kernel=7, num_blocks=2,
    linear_units=96, merge_conv_kernel=5, use_ffn=True, macaron_ffn=True, input_layer="conv2d",
    attention_dropout_rate=0.1, dropout_rate=0.1, positional_dropout_rate=0.1,
)  # fmt: skip

CONFIGS = {
    # LibriSpeech-100 recipe shape (d256, h4, U1024, F1024, K=M=31, conv2d), 2 of its 12 blocks.
    "ls100_conv2d": dict(
        output_size=256, attention_heads=4, cgmlp_linear_units=1024, cgmlp_conv_kernel=31, num_blocks=2,
        linear_units=1024, merge_conv_kernel=31, use_ffn=True, macaron_ffn=True, input_layer="conv2d",
    ),
    "none": {**SMALL, "input_layer": None},
    "linear": {**SMALL, "input_layer": "linear"},
    "conv2d2": {**SMALL, "input_layer": "conv2d2"},
    "conv2d6": {**SMALL, "input_layer": "conv2d6"},
    "conv2d8": {**SMALL, "input_layer": "conv2d8"},
    "linear_after_conv_tanh": {**SMALL, "use_linear_after_conv": True, "gate_activation": "tanh"},
    "interctc_selfcond": {**SMALL, "num_blocks": 3, "interctc_layer_idx": [1, 2], "interctc_use_conditioning": True},
    "selfattn_abs_pos": {**SMALL, "attention_layer_type": "selfattn", "pos_enc_layer_type": "abs_pos",
                         "use_flash_attn": False},
    "selfattn_abs_qknorm": {**SMALL, "attention_layer_type": "selfattn", "pos_enc_layer_type": "abs_pos",
                            "qk_norm": True, "use_flash_attn": False},
    "legacy_rel_pos": {**SMALL, "rel_pos_type": "legacy", "max_pos_emb_len": 300},
    # ESPnet's encoder ignores zero_triu with the legacy attention (it does not pass it on)
    "legacy_rel_pos_zero_triu": {**SMALL, "rel_pos_type": "legacy", "zero_triu": True},
    "zero_triu_single_ffn": {**SMALL, "zero_triu": True, "macaron_ffn": False},
    "no_ffn_espnet_defaults": {"output_size": 64, "cgmlp_linear_units": 96, "num_blocks": 2},
}  # fmt: skip
VOCAB = 11


def _input_size(conf: dict) -> int:
    """The feature dim for ``conf``: the model dim without a front end (ESPnet needs them equal then), else 40."""
    return conf.get("output_size", 256) if conf.get("input_layer", "conv2d") is None else 40


def _espnet_encoder(conf: dict, input_size: int, dtype: torch.dtype):
    torch.manual_seed(1)
    enc = espnet_enc.EBranchformerEncoder(input_size=input_size, **conf)
    if conf.get("interctc_use_conditioning"):
        enc.conditioning_layer = torch.nn.Linear(VOCAB, conf["output_size"])
    with torch.no_grad():  # no bias or LayerNorm gain at its init value
        for p in enc.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return enc.to(dtype).eval()


def _batch(input_size: int, dtype: torch.dtype, b: int = 4, t: int = 97, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    lengths[0] = t  # ESPnet needs T == max(lengths)
    x = torch.randn(b, t, input_size, generator=g, dtype=torch.float64).to(dtype)
    return x, lengths


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_espnet(name, dtype):
    conf = CONFIGS[name]
    input_size = _input_size(conf)
    ref = _espnet_encoder(conf, input_size, dtype)
    ours = load_espnet_encoder(conf, input_size, ref.state_dict()).to(dtype).eval()
    x, lengths = _batch(input_size, dtype)
    ctc_ref = ctc_ours = None
    if conf.get("interctc_use_conditioning"):
        from espnet2.asr.ctc import CTC

        ctc_ref = CTC(VOCAB, conf["output_size"]).to(dtype).eval()
        ctc_ours = ctc_ref.ctc_lo
    with torch.no_grad():
        out, olens, _ = ref(x, lengths, ctc=ctc_ref)
        if isinstance(out, tuple):
            out, _ = out
        collected: dict = {}
        y, ylens = ours(x, lengths, ctc=ctc_ours, collected_outputs=collected)
    assert torch.equal(ylens, olens.long())
    assert y.shape == out.shape
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    for b in range(x.shape[0]):
        n = int(olens[b])
        torch.testing.assert_close(y[b, :n], out[b, :n], atol=tol, rtol=0)
    assert len(collected) == len(ref.encoders)


@pytest.mark.parity
def test_matches_espnet_from_the_onednn_attention_threshold_on():
    # T' = 474 >= 448: the attention's inference runs on oneDNN pairs (attend_pairs), one (row, head) at a time
    from unittest import mock

    from ebranchformer.nn import attention
    from ebranchformer.nn.linear import onednn_float32

    conf = CONFIGS["ls100_conv2d"]
    ref = _espnet_encoder(conf, 40, torch.float32)
    ours = load_espnet_encoder(conf, 40, ref.state_dict()).eval()
    x, lengths = _batch(40, torch.float32, b=2, t=1900)
    spy = mock.patch.object(attention, "attend_pairs", wraps=attention.attend_pairs)
    not_intel = mock.patch.object(attention, "cpu_vendor", return_value="AuthenticAMD")  # Intel: SDPA's blocks
    with torch.no_grad(), not_intel, spy as pairs:
        out, olens, _ = ref(x, lengths)
        y, ylens = ours(x, lengths)
    assert out.shape[1] == 474 and torch.equal(ylens, olens.long())
    assert pairs.call_count >= (len(ref.encoders) if onednn_float32(x) else 0)  # per layer, or per row group
    for b in range(x.shape[0]):
        n = int(olens[b])
        torch.testing.assert_close(y[b, :n], out[b, :n], atol=1e-4, rtol=0)


@st.composite
def _espnet_cases(draw):
    """A random ESPnet encoder_conf (front end, widths, heads, kernels, gating, FFNs, positional encoding) and a
    random batch of 1-4 rows, 16-640 frames, row 0 the longest (ESPnet needs T == max(lengths))."""
    d = draw(st.sampled_from([32, 64, 128]))
    legacy = draw(st.booleans())
    conf = dict(
        output_size=d,
        attention_heads=draw(st.sampled_from([h for h in (1, 2, 4, 8) if d % h == 0])),
        num_blocks=draw(st.integers(1, 2)),
        cgmlp_linear_units=draw(st.sampled_from([2 * d, 4 * d])),
        linear_units=draw(st.sampled_from([d, 4 * d])),
        cgmlp_conv_kernel=draw(st.sampled_from([3, 7, 31])),
        merge_conv_kernel=draw(st.sampled_from([3, 15, 31])),
        input_layer=draw(st.sampled_from(["conv2d", "conv2d2", "conv2d6", "conv2d8", "linear", None])),
        use_linear_after_conv=draw(st.booleans()),
        gate_activation=draw(st.sampled_from(["identity", "tanh"])),
        use_ffn=draw(st.booleans()),
        macaron_ffn=draw(st.booleans()),
        zero_triu=draw(st.booleans()),
        rel_pos_type="legacy" if legacy else "latest",
    )
    t = draw(st.integers(16, 640))
    rest = draw(st.lists(st.integers(16, t), max_size=3))
    return conf, [t, *rest]


@pytest.mark.parity
@settings(max_examples=30, deadline=None)
@given(case=_espnet_cases(), seed=st.integers(0, 2**16))
def test_matches_espnet_on_random_configs_and_lengths(case, seed):
    """ESPnet and ours, fast paths on (the encoder's defaults), over drawn configs and row lengths: the outputs of
    every row agree on its valid frames, and the output lengths are equal."""
    conf, lengths = case
    input_size = _input_size(conf)
    ref = _espnet_encoder(conf, input_size, torch.float32)
    ours = load_espnet_encoder(conf, input_size, ref.state_dict()).eval()
    x = torch.randn(len(lengths), lengths[0], input_size, generator=torch.Generator().manual_seed(seed))
    n = torch.tensor(lengths)
    with torch.no_grad():
        out, olens, _ = ref(x, n)
        y, ylens = ours(x, n)
    assert torch.equal(ylens, olens.long()) and y.shape == out.shape
    for b, m in enumerate(olens.tolist()):
        torch.testing.assert_close(y[b, :m], out[b, :m], atol=1e-4, rtol=0)


def _check_training_step(conf: dict, lengths: list[int], seed: int) -> None:
    """Train mode (dropouts 0, so both are deterministic), ours on its CPU training fast paths: the outputs and
    every parameter's gradient of a loss over the valid frames equal ESPnet's."""
    conf = {**conf, "dropout_rate": 0.0, "positional_dropout_rate": 0.0, "attention_dropout_rate": 0.0}
    input_size = _input_size(conf)
    ref = _espnet_encoder(conf, input_size, torch.float32).train()
    ours = load_espnet_encoder(conf, input_size, ref.state_dict()).train()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), lengths[0], input_size, generator=gen)
    n = torch.tensor(lengths)
    out, olens, _ = ref(x, n)
    y, _ = ours(x, n)
    backward_one_loss(y, out, olens, gen)
    ref_grads = {name: p.grad for name, p in ref.named_parameters()}
    assert_grads_close(exported_grads(ours, export_espnet_state_dict), ref_grads)


@pytest.mark.parity
@settings(max_examples=25, deadline=None)
@given(case=_espnet_cases(), seed=st.integers(0, 2**16))
def test_training_step_matches_espnet_on_random_configs(case, seed):
    _check_training_step(*case, seed)


@pytest.mark.parity
def test_training_step_matches_espnet_at_librispeech_size():
    # the LibriSpeech-100 shape (2 of its 12 blocks) at the benchmark's lengths: T' = 499, the frontend and the
    # attention's training paths in several blocks
    _check_training_step(CONFIGS["ls100_conv2d"], [2000, 1733, 1600], seed=3)


@pytest.mark.parity
def test_interctc_intermediate_outputs_match_espnet():
    conf = CONFIGS["interctc_selfcond"]
    ref = _espnet_encoder(conf, 40, torch.float64)
    ours = load_espnet_encoder(conf, 40, ref.state_dict()).double().eval()
    from espnet2.asr.ctc import CTC

    ctc = CTC(VOCAB, conf["output_size"]).double().eval()
    x, lengths = _batch(40, torch.float64)
    with torch.no_grad():
        (_, inter), olens, _ = ref(x, lengths, ctc=ctc)
        collected: dict = {}
        ours(x, lengths, ctc=ctc.ctc_lo, collected_outputs=collected)
    assert [i for i, _ in inter] == [1, 2]
    for i, h in inter:
        for b in range(x.shape[0]):
            n = int(olens[b])
            torch.testing.assert_close(collected[str(i - 1)][b, :n], h[b, :n], atol=1e-9, rtol=0)


def test_export_round_trip_exact():
    ours = load_espnet_encoder(CONFIGS["conv2d8"], 40)
    sd = export_espnet_state_dict(ours)
    assert "embed.out.weight" in sd and "encoders.0.attn.linear_q.weight" in sd
    again = load_espnet_encoder(CONFIGS["conv2d8"], 40, {f"encoder.{k}": v for k, v in sd.items()})
    for (k1, v1), (k2, v2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


@pytest.mark.parity
def test_export_keys_equal_espnet_keys():
    for name in ("ls100_conv2d", "linear", "conv2d8", "selfattn_abs_qknorm", "linear_after_conv_tanh"):
        conf = CONFIGS[name]
        ref = espnet_enc.EBranchformerEncoder(input_size=40, **conf) if conf["input_layer"] else None
        if ref is None:
            continue
        ours = load_espnet_encoder(conf, 40, ref.state_dict())
        exported = export_espnet_state_dict(ours)
        assert set(exported) == set(ref.state_dict())
        for k, v in ref.state_dict().items():
            assert torch.equal(exported[k], v), k


def test_strict_loading_names_bad_keys():
    conf = CONFIGS["linear"]
    sd = export_espnet_state_dict(load_espnet_encoder(conf, 40))
    extra = {**sd, "encoders.0.bogus.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unknown keys \['encoders\.0\.bogus\.weight'\]"):
        load_espnet_encoder(conf, 40, extra)
    missing = {k: v for k, v in sd.items() if k != "encoders.1.merge_proj.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['encoders\.1\.merge_proj\.bias'\]"):
        load_espnet_encoder(conf, 40, missing)
    no_q = {k: v for k, v in sd.items() if k != "encoders.0.attn.linear_q.weight"}
    with pytest.raises(ValueError, match=r"encoders\.0\.attn\.linear_q\.weight"):
        load_espnet_encoder(conf, 40, no_q)
    shaped = {**sd, "after_norm.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"mis-shaped keys \[after_norm\.weight: expected \(64,\), got \(3,\)\]"):
        load_espnet_encoder(conf, 40, shaped)
    integer = {**sd, "encoders.0.merge_proj.weight": sd["encoders.0.merge_proj.weight"].long()}
    with pytest.raises(TypeError, match=r"integer/bool tensors for the parameters \['encoders\.0\.merge_proj\.weight'\]"):
        load_espnet_encoder(conf, 40, integer)


@pytest.mark.parametrize(
    "input_size, exc, match",
    [("40", TypeError, "input_size must be an int"), (True, TypeError, "input_size must be an int"),
     (0, ValueError, "input_size must be positive")],
)  # fmt: skip
def test_bad_input_size_is_named(input_size, exc, match):
    with pytest.raises(exc, match=match):
        load_espnet_encoder(CONFIGS["linear"], input_size)


def test_export_takes_an_encoder():
    with pytest.raises(TypeError, match="enc must be a ConformerEncoder, got Linear"):
        export_espnet_state_dict(torch.nn.Linear(3, 3))


@pytest.mark.parametrize(
    "conf, match",
    [
        ({"output_sizee": 256}, "unknown ESPnet EBranchformerEncoder option"),
        ({"gate_activation": "gelu"}, "gate_activation"),
        ({"cgmlp_linear_units": 101}, "cgmlp_linear_units must be even"),
        ({"cgmlp_conv_kernel": 4}, "cgmlp_conv_kernel must be a positive odd"),
        ({"merge_conv_kernel": 2}, "merge_conv_kernel must be a positive odd"),
        ({"attention_layer_type": "selfattn"}, "unsupported attention_layer_type/pos_enc_layer_type"),
        ({"input_layer": "conv1d2"}, "unsupported input_layer"),
        ({"output_size": 66, "attention_heads": 4}, "divisible by num_heads"),
        ({"input_layer": None}, "input_layer=None needs input_size == output_size"),
    ],
)
def test_bad_espnet_options(conf, match):
    with pytest.raises(ValueError, match=match):
        load_espnet_encoder({**SMALL, **conf}, 40)


LS960 = dict(
    output_size=512, attention_heads=8, attention_layer_type="rel_selfattn", pos_enc_layer_type="rel_pos",
    rel_pos_type="latest", cgmlp_linear_units=3072, cgmlp_conv_kernel=31, use_linear_after_conv=False,
    gate_activation="identity", num_blocks=17, dropout_rate=0.1, positional_dropout_rate=0.1,
    attention_dropout_rate=0.1, input_layer="conv2d", layer_drop_rate=0.1, linear_units=1024,
    positionwise_layer_type="linear", use_ffn=True, macaron_ffn=True, merge_conv_kernel=31,
)  # fmt: skip


@pytest.mark.parametrize(
    "conf, expected",
    [
        (LS960, 116_007_936),
        ({**LS960, "output_size": 256, "attention_heads": 4, "num_blocks": 12, "cgmlp_linear_units": 1024,
          "layer_drop_rate": 0.0}, 25_148_928),
    ],
)  # fmt: skip
def test_recipe_parameter_counts(conf, expected):
    with torch.device("meta"):
        enc = load_espnet_encoder(conf, 80)
    assert sum(p.numel() for p in enc.parameters()) == expected


def test_espnet_options_land_in_the_encoder():
    enc = load_espnet_encoder(LS960, 80, padding="masked")
    cfg = enc.config
    assert cfg.final_norm and cfg.final_norm_eps == 1e-12 and cfg.input_embedding_scale == math.sqrt(512)
    assert cfg.layer_drop == 0.1 and cfg.padding == "masked"
    layer = enc.layers[0]
    assert layer.final_layer_norm.eps == 1e-12 and layer.cgmlp.norm.eps == 1e-12 and layer.ff_scale == 0.5
