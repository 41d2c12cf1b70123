"""An utterance encodes the same alone or in any padded batch (``padding="masked"``)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebranchformer import ConformerLayer, Conv2dSubsampling, EBranchformerLayer, build_dict

from .conftest import perturb_, small_encoder

FRONTENDS = {
    "none": None,
    "conv2d": build_dict(Conv2dSubsampling, kind="conv2d"),
    "conv2d6": build_dict(Conv2dSubsampling, kind="conv2d6"),
}
LAYERS = {
    "ebranchformer": lambda k, m: build_dict(
        EBranchformerLayer, ff_dim=40, num_heads=2, cgmlp_ff_dim=24, cgmlp_conv_kernel=k, merge_conv_kernel=m
    ),
    "conformer": lambda k, m: build_dict(ConformerLayer, ff_dim=40, num_heads=2, conv_kernel_size=k + 1),
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frontend=st.sampled_from(sorted(FRONTENDS)),
    layer=st.sampled_from(sorted(LAYERS)),
    kernel=st.sampled_from([3, 7, 15]),
    merge=st.sampled_from([1, 3, 9]),
    lengths=st.lists(st.integers(12, 60), min_size=1, max_size=4),
    extra=st.integers(0, 9),
    fast=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_each_row_equals_itself_alone(frontend, layer, kernel, merge, lengths, extra, fast, seed):
    torch.manual_seed(seed)
    enc = small_encoder(FRONTENDS[frontend], in_dim=16, out_dim=24, encoder_layer=LAYERS[layer](kernel, merge))
    enc = perturb_(enc, seed=seed).double().eval().set_fast_path(fast)
    n = torch.tensor(lengths)
    t = max(lengths) + extra
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), t, 16, generator=g, dtype=torch.float64)
    x = x + 1e3 * (torch.arange(t)[None, :, None] >= n[:, None, None])  # garbage in the padding
    with torch.no_grad():
        y, yl = enc(x, n)
        for b, length in enumerate(lengths):
            y1, yl1 = enc(x[b : b + 1, :length], n[b : b + 1])
            assert int(yl1) == int(yl[b])
            torch.testing.assert_close(y[b, : int(yl[b])], y1[0, : int(yl1)], atol=1e-9, rtol=0)


def test_espnet_legacy_mode_depends_on_batch_mates():
    """Documents the known ESPnet <= 202511 behaviour that ``"masked"`` fixes: in ``"espnet_legacy"`` mode a
    short row gets more output frames next to a long one, and its values change through the unmasked convs."""
    torch.manual_seed(0)
    enc = perturb_(small_encoder(build_dict(Conv2dSubsampling, kind="conv2d"), in_dim=16, out_dim=24))
    enc = enc.double().eval()
    x = torch.randn(2, 100, 16, dtype=torch.float64)
    n = torch.tensor([100, 90])
    legacy = (
        small_encoder(build_dict(Conv2dSubsampling, kind="conv2d"), in_dim=16, out_dim=24, padding="espnet_legacy")
        .double()
        .eval()
    )
    legacy.load_state_dict(enc.state_dict())
    with torch.no_grad():
        _, yl_masked = enc(x, n)
        y_leg, yl_leg = legacy(x, n)
        y_alone, yl_alone = legacy(x[1:, :90], n[1:])
    assert yl_masked.tolist() == [24, 21]  # per-row conv formula ((L-1)//2-1)//2
    assert yl_leg.tolist() == [24, 23]  # ESPnet's sliced mask: ceil(ceil(90/2 ... )) style, 2 frames more
    assert yl_alone.tolist() == [21]
    diff = (y_leg[1, :21] - y_alone[0, :21]).abs().max()
    assert diff > 1e-3  # padded frames leak into valid ones
