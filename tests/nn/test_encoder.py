"""The encoder frame: the seed's usage, configs, training behaviour and bad-input errors."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch

from ebranchformer import (
    ConformerEncoder,
    ConformerLayer,
    Conv2dSubsampling,
    EBranchformerLayer,
    EncoderConfig,
    build_dict,
)

from .conftest import perturb_, small_encoder


def test_seed_usage_runs_as_written():
    enc = ConformerEncoder(
        in_dim=80,
        out_dim=256,
        num_layers=12,
        input_layer=build_dict(Conv2dSubsampling, kind="conv2d"),
        encoder_layer=build_dict(
            EBranchformerLayer, ff_dim=1024, num_heads=4, cgmlp_ff_dim=512, cgmlp_conv_kernel=31, merge_conv_kernel=31
        ),
    ).eval()
    x, n = torch.randn(2, 120, 80), torch.tensor([120, 77])
    with torch.no_grad():
        y, yl = enc(x, n)
    assert yl.tolist() == [((120 - 1) // 2 - 1) // 2, ((77 - 1) // 2 - 1) // 2]
    assert y.shape == (2, 29, 256) and torch.isfinite(y).all()
    layer = enc.layers[0]
    assert isinstance(layer, EBranchformerLayer) and layer.cgmlp.conv.kernel_size == (31,)
    assert layer.merge.depthwise_conv_fusion.kernel_size == (31,) and layer.self_att.num_heads == 4
    assert enc.input_projection is None  # the frontend already outputs out_dim


def test_seed_17_layer_model_parameter_count():
    with torch.device("meta"):
        enc = ConformerEncoder(
            in_dim=512, out_dim=512, num_layers=17, input_layer=None,
            encoder_layer=build_dict(EBranchformerLayer, ff_dim=2048, num_heads=8, cgmlp_ff_dim=1536,
                                     cgmlp_conv_kernel=31, merge_conv_kernel=31),
        )  # fmt: skip
    assert sum(p.numel() for p in enc.parameters()) == 144_347_136


def test_returnn_defaults():
    layer = EBranchformerLayer(64)
    assert layer.ffn1.linear_ff.out_features == 4 * 64  # ff_dim 4·D
    assert layer.cgmlp.gate_dim == 3 * 64  # cgmlp_ff_dim 3·D
    assert layer.merge.depthwise_conv_fusion.kernel_size == (3,)
    assert layer.final_layer_norm.eps == 1e-6
    enc = ConformerEncoder(in_dim=40, out_dim=64, num_layers=1)
    assert isinstance(enc.layers[0], ConformerLayer)  # RETURNN's default layer
    assert enc.final_layer_norm is None and enc.config.input_embedding_scale == 1.0
    assert enc.input_projection is not None and enc.input_projection.bias is None


@pytest.mark.parametrize("fmt", ["dict", "yaml", "json"])
def test_config_round_trip(fmt):
    enc = small_encoder(build_dict(Conv2dSubsampling, kind="conv2d6"), interctc_layers=(1,),
                        interctc_use_conditioning=True, vocab_size=7, final_norm=True)  # fmt: skip
    cfg = enc.config
    text = {"dict": cfg.to_dict, "yaml": cfg.to_yaml, "json": cfg.to_json}[fmt]()
    back = {"dict": EncoderConfig.from_dict, "yaml": EncoderConfig.from_yaml, "json": EncoderConfig.from_json}[fmt](
        text
    )
    assert back.to_dict() == cfg.to_dict()
    enc2 = ConformerEncoder.from_config(back)
    assert [k for k in enc2.state_dict()] == [k for k in enc.state_dict()]


def test_layer_spec_forms_build_the_same_model():
    opts = dict(ff_dim=48, num_heads=4, cgmlp_ff_dim=40, cgmlp_conv_kernel=5, merge_conv_kernel=3)
    by_dict = small_encoder(encoder_layer=build_dict(EBranchformerLayer, **opts))
    by_name = small_encoder(encoder_layer={"class": "EBranchformerLayer", **opts})
    by_module = small_encoder(encoder_layer=EBranchformerLayer(32, **opts))
    shapes = [{k: v.shape for k, v in e.state_dict().items()} for e in (by_dict, by_name, by_module)]
    assert shapes[0] == shapes[1] == shapes[2]
    # built from a spec, each layer has its own init; a given module is deep-copied
    assert not torch.equal(by_dict.layers[0].merge.merge_proj.weight, by_dict.layers[1].merge.merge_proj.weight)
    assert by_module.layers[0] is not by_module.layers[1]
    with pytest.raises(TypeError, match="cannot be serialized"):
        by_module.config.to_dict()


def test_training_gradients_are_finite_and_nonzero(conv_encoder):
    enc = conv_encoder.train()
    x, n = torch.randn(3, 60, 24), torch.tensor([60, 41, 23])
    y, yl = enc(x, n)
    valid = torch.arange(y.shape[1])[None] < yl[:, None]
    (y.pow(2) * valid[..., None]).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_a_few_steps_reduce_a_toy_loss(conv_encoder):
    torch.manual_seed(0)
    enc = conv_encoder.train()
    x, n = torch.randn(4, 40, 24), torch.tensor([40, 35, 30, 25])
    target = torch.randn(4, 9, 32)
    opt = torch.optim.Adam(enc.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        y, yl = enc(x, n)
        valid = (torch.arange(y.shape[1])[None] < yl[:, None])[..., None]
        loss = ((y - target).pow(2) * valid).sum() / valid.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_dropout_only_in_training(conv_encoder):
    x, n = torch.randn(2, 40, 24), torch.tensor([40, 30])
    enc = conv_encoder.train()
    a, b = enc(x, n)[0], enc(x, n)[0]
    assert (a - b).abs().max() > 1e-3  # different dropout masks
    enc.eval()
    with torch.no_grad():
        assert torch.equal(enc(x, n)[0], enc(x, n)[0])


def test_dropout_broadcast_shares_the_mask_over_batch_and_time():
    from ebranchformer.nn import Dropout

    d = Dropout(0.5, broadcast=True).train()
    y = d(torch.ones(3, 7, 16))
    assert torch.equal(y, y[:1, :1].expand_as(y)) and (y == 0).any() and (y == 2).any()
    enc = small_encoder(dropout_broadcast=True)
    assert enc.layers[0].dropout.broadcast and enc.layers[0].ffn1.dropout.broadcast


def test_layer_drop_only_in_training():
    torch.manual_seed(0)
    enc = perturb_(small_encoder(num_layers=4, layer_drop=0.5, dropout=0.0, att_dropout=0.0, input_dropout=0.0))
    x, n = torch.randn(2, 20, 24), torch.tensor([20, 15])
    enc.train()
    ran = []
    for _ in range(10):
        out: dict = {}
        enc(x, n, collected_outputs=out)
        ran.append(len(out))
    assert min(ran) < 4 and max(ran) > 0  # some layers skipped, never all the time
    enc.eval()
    out = {}
    with torch.no_grad():
        y1 = enc(x, n, collected_outputs=out)[0]
        y2 = enc(x, n)[0]
    assert len(out) == 4 and torch.equal(y1, y2)


def test_collected_outputs_are_layer_outputs():
    enc = perturb_(small_encoder(num_layers=3)).eval()
    x, n = torch.randn(2, 20, 24), torch.tensor([20, 15])
    out: dict = {}
    with torch.no_grad():
        y, _ = enc(x, n, collected_outputs=out)
    assert sorted(out) == ["0", "1", "2"] and torch.equal(out["2"], y)


def test_self_conditioning_uses_the_ctc_softmax():
    enc = perturb_(small_encoder(num_layers=3, interctc_layers=(1, 2), interctc_use_conditioning=True, vocab_size=5))
    enc.eval()
    ctc = torch.nn.Linear(32, 5)
    x, n = torch.randn(2, 20, 24), torch.tensor([20, 15])
    out: dict = {}
    with torch.no_grad():
        y, _ = enc(x, n, ctc=ctc, collected_outputs=out)
        # layer 1's input is layer 0's output plus the conditioning term
        valid = torch.arange(20)[None] < n[:, None]
        h = out["0"] + enc.conditioning_layer(torch.softmax(ctc(out["0"]), -1))
        torch.testing.assert_close(enc.layers[1](h, valid), out["1"])
    with pytest.raises(ValueError, match="ctc must be given"):
        enc(x, n)


def _train_step(enc, x, n, *, ckpt: bool, recompute: bool):
    enc.zero_grad()
    enc.gradient_checkpointing, enc.recompute_attention = ckpt, recompute
    torch.manual_seed(1)  # the same dropout masks, recomputed identically under checkpointing
    y, _ = enc(x, n)
    y.pow(2).sum().backward()
    return y.detach(), {k: p.grad.clone() for k, p in enc.named_parameters()}


@pytest.mark.parametrize("ckpt, recompute", [(False, True), (True, False), (True, True)])
def test_checkpointing_and_attention_recompute_give_equal_gradients(conv_encoder, ckpt, recompute):
    enc = conv_encoder.double().train()
    x, n = torch.randn(2, 40, 24, dtype=torch.float64), torch.tensor([40, 27])
    y0, g0 = _train_step(enc, x, n, ckpt=False, recompute=False)
    y1, g1 = _train_step(enc, x, n, ckpt=ckpt, recompute=recompute)
    torch.testing.assert_close(y0, y1, atol=1e-12, rtol=0)
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], atol=1e-12, rtol=1e-9)
    # while whole layers are checkpointed the attention does not recompute a second time, and the blocked path
    # keeps its probabilities only when recompute_attention is off
    assert all(not m.recompute for m in enc.modules() if hasattr(m, "recompute")) or not ckpt
    assert all(m.keep_probs == (not recompute) for m in enc.modules() if hasattr(m, "keep_probs"))


def _saved_bytes(enc, x, n) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        enc(x, n)[0].sum()
    return sum(seen.values())


def test_attention_recompute_keeps_no_score_matrices(conv_encoder):
    enc = conv_encoder.train()
    x, n = torch.randn(2, 80, 24), torch.tensor([80, 61])
    enc.set_cpu_blocks(False)  # the one-pass paths, where recompute_attention decides
    enc.recompute_attention = False
    stored = _saved_bytes(enc, x, n)
    enc.recompute_attention = True
    lean = _saved_bytes(enc, x, n)
    t = enc.output_lengths(torch.tensor([80])).item()
    heads = enc.layers[0].self_att.num_heads
    score_bytes = 2 * heads * t * t * 4  # one float32 (B, H, T', T') tensor
    # without recompute: the softmax, its dropout mask and the dropped weights of every layer
    assert stored - lean >= 2 * score_bytes * len(enc.layers)
    # the CPU path in query blocks keeps no score matrix either: per layer only its bool (B, H, T', T') keep-mask
    # and key bias, and two (B, T', D) query tensors (q + u, and q + v scaled) that the one-pass path recomputes
    enc.set_cpu_blocks(True)
    extra = score_bytes // 4 + 2 * t * 4 + 2 * (2 * t * enc.layers[0].self_att.dim * 4)
    blocked_lean = _saved_bytes(enc, x, n)
    assert blocked_lean <= lean + extra * len(enc.layers)
    # with recompute_attention off it keeps the probabilities too: one float (B, H, T', T') tensor per layer
    enc.recompute_attention = False
    assert _saved_bytes(enc, x, n) - blocked_lean == score_bytes * len(enc.layers)


def test_dropout_rate_is_p():
    from ebranchformer.nn.dropout import dropout_bool_mask

    torch.manual_seed(0)
    x = torch.ones(200_000)
    for p in (0.1, 0.3):
        y = dropout_bool_mask(x, p)
        assert abs((y == 0).float().mean().item() - p) < 0.005  # 5 sigma is about 0.0035 here
        torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))


@pytest.mark.parametrize("p", [1e-4, 0.1, 0.5, 0.9])
def test_keep_mask_rate_scale_and_independence(p):
    from ebranchformer.nn.dropout import keep_mask, keep_scale

    torch.manual_seed(1)
    n = 1_000_001  # not a multiple of 4: only part of the last 64-bit draw is used
    keep = keep_mask((n,), p, "cpu")
    assert keep.dtype == torch.bool and keep.shape == (n,)
    q = round(p * 2**16) / 2**16  # the drop probability actually used
    assert abs(q - p) <= 2**-17
    sigma = (q * (1 - q) / n) ** 0.5
    assert abs((~keep).float().mean().item() - q) < 5 * sigma
    assert keep_scale(p) == pytest.approx(1 / (1 - q), rel=1e-12)  # E[keep * scale] = 1
    # the four 16-bit parts of a draw are independent: neighbours drop together at rate q^2
    for shift in (1, 2, 3):
        both = (~keep[:-shift] & ~keep[shift:]).float().mean().item()
        assert abs(both - q * q) < 5 * (q * q * (1 - q * q) / (n // 4)) ** 0.5 + 1e-6


def test_keep_mask_follows_torch_seed():
    from ebranchformer.nn.dropout import keep_mask

    torch.manual_seed(3)
    a, b = keep_mask((4, 1001), 0.3, "cpu"), keep_mask((4, 1001), 0.3, "cpu")
    torch.manual_seed(3)
    assert torch.equal(keep_mask((4, 1001), 0.3, "cpu"), a)  # the seed fixes every mask
    assert torch.equal(keep_mask((4, 1001), 0.3, "cpu"), b)
    assert (a != b).float().mean() > 0.3  # successive masks are independent: 2 q (1 - q) = 0.42 of entries differ


def test_keep_mask_edges():
    from ebranchformer.nn.dropout import keep_mask, keep_scale

    assert keep_mask((0, 3), 0.1, "cpu").shape == (0, 3)
    assert keep_scale(0.999999) == 2**16  # rounds to "keep 1 in 2^16", not to a division by zero
    assert keep_scale(1e-6) == 1.0 and bool(keep_mask((1000,), 1e-6, "cpu").all())  # rounds to no dropout


def test_dropout_keeps_a_one_byte_mask(conv_encoder):
    from ebranchformer.nn.dropout import Dropout

    drop, kinds = Dropout(0.5).train(), []
    x = torch.randn(64, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kinds.append(t.dtype) or t, lambda t: t):
        y = drop(x)
    assert kinds == [torch.bool]  # the mask itself, one byte per entry: no float copy is saved
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] * 2)
    assert 0.4 < kept.float().mean() < 0.6
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.float() * 2)


@pytest.mark.parametrize("chunk", [None, 64, 100])  # None: the whole-tensor path; else chunks of that many entries
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dropout_equals_mask_product(dtype, chunk):
    # the masked-scale autograd function (whole or in chunks, the last one partial at 100) against autograd through
    # the plain product with the same mask, exactly; a non-contiguous gradient takes the whole-tensor path
    from ebranchformer.nn import dropout
    from ebranchformer.nn.dropout import dropout_bool_mask, keep_mask, keep_scale

    x = torch.randn(3, 7, 33, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        x[0, 0] = float("nan")  # dropped or not, a NaN stays NaN (as in F.dropout)
    g = torch.randn(3, 33, 7, dtype=dtype).transpose(1, 2)
    with mock.patch.object(dropout, "_CHUNK", chunk or dropout._CHUNK):
        for grad in (g, g.contiguous()):
            torch.manual_seed(5)
            y = dropout_bool_mask(x, 0.3)
            (gx,) = torch.autograd.grad(y, x, grad)
            torch.manual_seed(5)
            keep = keep_mask(x.shape, 0.3, "cpu")
            x2 = x.detach().clone().requires_grad_(True)
            y_ref = x2 * keep.to(dtype) * keep_scale(0.3)
            (gx_ref,) = torch.autograd.grad(y_ref, x2, grad)
            assert y.dtype == dtype and not torch.equal(keep, torch.ones_like(keep))
            torch.testing.assert_close(y, y_ref, atol=0, rtol=0, equal_nan=True)
            torch.testing.assert_close(gx, gx_ref, atol=0, rtol=0)
            assert torch.isnan(y[0, 0]).all()


BAD_INPUT = [
    (lambda x, n: (x[..., :20], n), ValueError, "x feature dim must be in_dim=24"),
    (lambda x, n: (x.long(), n), TypeError, "x must be a floating-point tensor"),
    (lambda x, n: (x, n.float()), TypeError, "lengths must be an integer tensor"),
    (lambda x, n: (x[0], n), ValueError, "x must have shape"),
    (lambda x, n: (x, n[:, None]), ValueError, "lengths must have shape"),
    (lambda x, n: (x, n + 100), ValueError, "lengths must be <= T=40"),
    (lambda x, n: (x, n * 0), ValueError, "lengths must be >= 1"),
    (lambda x, n: (x, torch.tensor([40, 30, 20])), ValueError, "lengths has batch size 3 but x has batch size 2"),
    (lambda x, n: (x, torch.tensor([40, 5])), ValueError, "input too short for the subsampling"),
    (lambda x, n: (x.tolist(), n), TypeError, "x must be a torch.Tensor"),
    (lambda x, n: (x[:0], n[:0]), ValueError, "x must hold at least one utterance, got batch size 0"),
    (lambda x, n: (x.double(), n), TypeError, r"x has dtype torch.float64 but the module's parameters are torch.float32"),
    (lambda x, n: (x.bfloat16(), n), TypeError, r"x has dtype torch.bfloat16 .* or run under torch.autocast"),
    (lambda x, n: (x.to("meta"), n), ValueError, "x is on meta but the module's parameters are on cpu"),
]


@pytest.mark.parametrize("make, exc, match", BAD_INPUT)
def test_bad_input_is_named(conv_encoder, make, exc, match):
    x, n = make(torch.randn(2, 40, 24), torch.tensor([40, 30]))
    with pytest.raises(exc, match=match):
        conv_encoder(x, n)


def test_other_dtypes_under_autocast_and_int32_lengths(conv_encoder):
    """Under autocast x may have another float dtype than the parameters; lengths may be any integer dtype (the
    output lengths are int64; the encoder also moves lengths to x's device, which one CPU cannot show)."""
    x, n = torch.randn(2, 40, 24), torch.tensor([40, 30])
    conv_encoder.eval()
    with torch.no_grad():
        ref, ref_n = conv_encoder(x, n)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = conv_encoder(x.double(), n)
        y32, n32 = conv_encoder(x, n.int())
    assert y.dtype == torch.float32 and (y - ref).abs().max() < 0.05  # bf16 products (0.017 measured)
    torch.testing.assert_close(y32, ref, rtol=0, atol=0)
    assert n32.dtype == torch.int64 and torch.equal(n32, ref_n)


@pytest.mark.parametrize(
    "opts, match",
    [
        (dict(encoder_layer=build_dict(EBranchformerLayer, cgmlp_conv_kernel=4)), "cgmlp_conv_kernel must be a positive odd"),
        (dict(encoder_layer=build_dict(EBranchformerLayer, merge_conv_kernel=6)), "merge_conv_kernel must be a positive odd"),
        (dict(out_dim=30, num_heads=4), r"out_dim \(30\) must be divisible by num_heads \(4\)"),
        (dict(encoder_layer=build_dict(EBranchformerLayer, num_heads=7)), r"divisible by num_heads \(7\)"),
        (dict(padding="same"), "padding must be one of"),
        (dict(interctc_layers=(2,)), "interctc_layers must be 1-based"),
        (dict(interctc_layers=(1,), interctc_use_conditioning=True), "needs vocab_size"),
        (dict(encoder_layer=build_dict(EBranchformerLayer, ff_activation="nope")), "unknown activation"),
        (dict(encoder_layer={"class": "NoSuchLayer"}), "unknown module class .NoSuchLayer."),
        (dict(encoder_layer=build_dict(EBranchformerLayer, bogus=1)), "encoder_layer: EBranchformerLayer has no option 'bogus'"),
        (dict(input_layer={"class": "Conv2dSubsampling", "knid": "conv2d"}), "input_layer: .* no option 'knid'"),
        (dict(input_layer={"kind": "conv2d"}), "input_layer: a module spec dict needs a 'class' key"),
        (dict(input_layer=build_dict(Conv2dSubsampling, kind="conv2d5")), "kind must be one of"),
        (dict(layer_drop=1.0), r"layer_drop must be in \[0, 1\)"),
    ],
)  # fmt: skip
def test_bad_config_is_named(opts, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ConformerEncoder(**{"in_dim": 24, "out_dim": 32, "num_layers": 2, **opts})


def test_config_rejects_unknown_keys():
    d = small_encoder().config.to_dict()
    with pytest.raises(ValueError, match=r"unknown EncoderConfig keys \['bogus'\]"):
        EncoderConfig.from_dict({**d, "bogus": 1})


def test_extra_time_padding_is_allowed_in_both_modes(conv_encoder):
    x, n = torch.randn(2, 40, 24), torch.tensor([30, 20])
    legacy = copy.deepcopy(conv_encoder)
    object.__setattr__(legacy.config, "padding", "espnet_legacy")
    conv_encoder.eval(), legacy.eval()
    with torch.no_grad():
        for enc in (conv_encoder, legacy):
            y, yl = enc(x, n)
            y2, yl2 = enc(x[:, :30], n)
            assert torch.equal(yl, yl2)
            torch.testing.assert_close(y[:, : y2.shape[1]], y2)
