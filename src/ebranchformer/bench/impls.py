"""The implementations the benchmark runs, each wrapped as a :class:`Impl` with one ``forward()`` on a fixed batch.

Implementations (``name``: what it is):

- ``ours``: our ``ConformerEncoder`` built from the ESPnet ``encoder_conf`` with ESPnet's weights
  (:func:`~ebranchformer.interop.espnet.load_espnet_encoder`); bf16 autocast when ``--dtype bf16``. Its forward
  (eval, no grad) on the CPU runs the batch as groups of rows, one thread each, as the library does by default
  (``ConformerEncoder.split_rows``, :mod:`~ebranchformer.nn.cpu_threads`); the report says so.
- ``ours_fp32``: the same module in float32 (only added for ``--dtype bf16``, to show bf16's own gain).
- ``espnet``: ESPnet 202511 ``EBranchformerEncoder`` (always float32).
- ``ours_layers`` / ``returnn_layers``: RETURNN's ``ConformerEncoder`` + ``EBranchformerLayer`` without a
  frontend (input = (B, T', D) frames, T' as after ESPnet's conv2d), and ours configured the same way (LayerNorm
  eps 1e-6, no final norm, masked padding, feature-broadcast dropout), with the ESPnet weights of the layers
  mapped by :func:`~ebranchformer.interop.returnn.export_returnn_params`.
- ``ours_conv6`` / ``returnn_conv6``: the same with RETURNN's standard ``ConformerConvSubsample`` frontend
  (out_dims [32, 64, 64], filter (3, 3), pool (1, 2) after conv 1, time strides 3 and 2) on the 80-dim features;
  the frontend and its projection have their own (random) weights, copied from RETURNN to ours.

Builders take only the preset, so a memory-measuring subprocess can build one implementation alone (with random
weights: the values do not change memory or time).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..config import build_dict
from ..interop.espnet import load_espnet_encoder
from ..nn.ebranchformer_layer import EBranchformerLayer
from ..nn.encoder import ConformerEncoder
from ..nn.masking import lengths_to_valid
from .flops import espnet_conf_flops
from .presets import Preset

__all__ = [
    "CONV6",
    "IMPL_NAMES",
    "Impl",
    "available_references",
    "build_impls",
    "clear_grads",
    "make_batch",
    "run_step",
    "set_batch",
    "valid_frames_loss",
]

# RETURNN's standard ConformerConvSubsample ("conv6": x6 in time, 80 -> 40 freq, 64 channels).
CONV6: dict[str, Any] = dict(
    out_dims=[32, 64, 64], filter_sizes=[(3, 3)] * 3, pool_sizes=[(1, 2)], strides=[(1, 1), (3, 1), (2, 1)]
)
IMPL_NAMES = ("ours", "ours_fp32", "espnet", "ours_layers", "returnn_layers", "ours_conv6", "returnn_conv6")
# what each implementation's speed ratio is taken against (besides ESPnet fp32)
_PEER = {
    "espnet": "ours",
    "ours_fp32": "ours",
    "returnn_layers": "ours_layers",
    "returnn_conv6": "ours_conv6",
}


def available_references() -> dict[str, bool]:
    """Which reference packages are importable (without importing them)."""
    return {
        "espnet": importlib.util.find_spec("espnet2") is not None,
        "returnn": importlib.util.find_spec("returnn") is not None,
    }


@dataclasses.dataclass
class Impl:
    """One implementation on one fixed batch.

    ``call(x, lengths)`` returns ``(y (B, T', D) tensor, out_lengths (B,) long)``; ``forward()`` calls it on
    ``inputs``; ``set_train(bool)`` switches dropout
    (module mode, and RETURNN's run context); ``autocast`` is the autocast dtype or None (float32).
    """

    name: str
    module: nn.Module
    call: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    inputs: tuple[torch.Tensor, torch.Tensor]  # (x, lengths) of the benchmark batch
    set_train: Callable[[bool], None]
    autocast: torch.dtype | None
    flops: dict[str, int]
    input_frames: int  # valid feature frames in the batch (the audio it stands for)
    family: str  # "espnet_conf", "layers" or "conv6"
    peer: str | None = None

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.call(*self.inputs)

    def small_inputs(self, frames: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """A 1-row slice of the batch (at most ``frames`` long), for warming a fresh process up."""
        x, _ = self.inputs
        w = min(x.shape[1], frames)
        return x[:1, :w], torch.tensor([w], device=x.device)

    @property
    def dtype_name(self) -> str:
        return "bf16" if self.autocast == torch.bfloat16 else "fp32"


def make_batch(preset: Preset, device: str, seed: int, frames: int | None = None, batch: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The benchmark batch: x (B, T, F) standard normal (seeded) and lengths (B,) as in
    :func:`~ebranchformer.bench.presets.batch_lengths`; for a sweep, batch 1 of ``frames``."""
    from .presets import batch_lengths

    b, t = preset.batch_for(torch.device(device).type)
    b, t = batch or b, frames or t
    lengths = batch_lengths(b, t, preset.min_len_ratio if b > 1 else 1.0)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, preset.input_size, generator=g)
    return x.to(device), lengths.to(device)


def _layer_dims(conf: dict[str, Any]) -> dict[str, Any]:
    return dict(
        ff_dim=int(conf["linear_units"]), num_heads=int(conf["attention_heads"]),
        cgmlp_ff_dim=int(conf["cgmlp_linear_units"]) // 2, cgmlp_conv_kernel=int(conf["cgmlp_conv_kernel"]),
        merge_conv_kernel=int(conf["merge_conv_kernel"]),
    )  # fmt: skip


def _train_switch(module: nn.Module) -> Callable[[bool], None]:
    def set_train(flag: bool) -> None:
        module.train(flag)

    return set_train


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


# ---------------------------------------------------------------------------------------------------------------
# builders (one implementation each, random init unless weights are given)


def _make_espnet(conf: dict[str, Any], in_dim: int, seed: int) -> nn.Module:
    from espnet2.asr.encoder.e_branchformer_encoder import EBranchformerEncoder

    with _seeded(seed):
        return EBranchformerEncoder(input_size=in_dim, **conf)


def _make_ours(conf: dict[str, Any], in_dim: int, padding: str, state_dict: dict | None, seed: int) -> nn.Module:
    with _seeded(seed):
        return load_espnet_encoder(conf, in_dim, state_dict, padding=padding)


def _make_ours_returnn_style(conf: dict[str, Any], in_dim: int, conv6: bool, seed: int) -> ConformerEncoder:
    """Ours configured as RETURNN's ConformerEncoder (its defaults: eps 1e-6, no final norm, masking, broadcast
    dropout), layers-only or with conv6."""
    from ..nn.conv_subsample import ConformerConvSubsample

    d = int(conf["output_size"])
    with _seeded(seed):
        return ConformerEncoder(
            in_dim=in_dim if conv6 else d, out_dim=d, num_layers=int(conf["num_blocks"]),
            input_layer=build_dict(ConformerConvSubsample, **CONV6) if conv6 else None,
            encoder_layer=build_dict(EBranchformerLayer, **_layer_dims(conf)), padding="masked",
            **_returnn_style_opts(conf),
        )  # fmt: skip


def _returnn_style_opts(conf: dict[str, Any]) -> dict[str, Any]:
    """Encoder options that mirror RETURNN's ConformerEncoder with the recipe's dropouts."""
    drop = float(conf["dropout_rate"])
    return dict(dropout=drop, att_dropout=float(conf["attention_dropout_rate"]), input_dropout=drop,
                dropout_broadcast=True)  # fmt: skip


class _Returnn:
    """RETURNN's ConformerEncoder (PyTorch backend, latest behavior version) and a torch-style call on it."""

    def __init__(self, conf: dict[str, Any], in_dim: int, conv6: bool, seed: int, device: str) -> None:
        import returnn.frontend as rf
        from returnn.frontend.encoder.conformer import ConformerConvSubsample as RfConvSubsample
        from returnn.frontend.encoder.conformer import ConformerEncoder as RfEncoder
        from returnn.frontend.encoder.e_branchformer import EBranchformerLayer as RfLayer
        from returnn.tensor import Dim
        from returnn.torch.frontend.bridge import rf_module_to_pt_module
        from returnn.util.basic import BehaviorVersion

        rf.select_backend_torch()
        if BehaviorVersion.get_if_set() is None:
            BehaviorVersion.set(BehaviorVersion._latest_behavior_version)
        self.rf, self.Dim, self.device = rf, Dim, device
        d = int(conf["output_size"])
        drop = float(conf["dropout_rate"])
        rf.set_random_seed(seed)
        self.model_dim = Dim(d, name="model")
        self.feat_dim = Dim(in_dim, name="feat") if conv6 else self.model_dim
        self.model = RfEncoder(
            self.feat_dim, self.model_dim, num_layers=int(conf["num_blocks"]),
            input_layer=RfConvSubsample(self.feat_dim, **CONV6) if conv6 else None,
            encoder_layer=rf.build_dict(RfLayer, **_layer_dims(conf)),
            dropout=drop, att_dropout=float(conf["attention_dropout_rate"]), input_dropout=drop,
        )  # fmt: skip
        self.pt = rf_module_to_pt_module(self.model).to(device)
        self.train_flag = False

    def set_train(self, flag: bool) -> None:
        self.pt.train(flag)
        self.train_flag = flag

    def __call__(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from returnn.config import Config, global_config_ctx

        rf, Dim = self.rf, self.Dim
        if self.train_flag:
            rf.init_train_step_run_ctx(train_flag=True)
        else:
            rf.init_forward_step_run_ctx()
        batch_dim = Dim(x.shape[0], name="batch")
        time_dim = Dim(rf.convert_to_tensor(lengths.to("cpu", torch.int32), dims=[batch_dim]), name="time")
        src = rf.convert_to_tensor(x, dims=[batch_dim, time_dim, self.feat_dim])
        config = Config({"rf_use_mask": True, "rf_use_consistent_same_padding": True})
        with global_config_ctx(config), rf.set_default_device_ctx(self.device):
            y, out_dim = self.model(src, in_spatial_dim=time_dim)
        y = y.copy_transpose([batch_dim, out_dim, self.model_dim]).raw_tensor
        n = out_dim.dyn_size_ext.copy_transpose([batch_dim]).raw_tensor
        return y, n.to(device=y.device, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------


def _layers_input(
    preset: Preset, x: torch.Tensor, lengths: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T', D) input for the layers-only variants: T' and the lengths as after the preset's ESPnet frontend."""
    from ..nn.subsampling import Conv2dSubsampling

    d = int(preset.encoder_conf["output_size"])
    with torch.device("meta"):  # only its length rule is needed
        sub = Conv2dSubsampling(preset.input_size, d, kind=preset.encoder_conf.get("input_layer", "conv2d"))
    t_out = int(sub.output_lengths(torch.tensor([x.shape[1]]))[0])
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(x.shape[0], t_out, d, generator=g).to(x.device), sub.output_lengths(lengths)


def build_impls(
    preset: Preset,
    names: list[str],
    *,
    device: str = "cpu",
    autocast: torch.dtype | None = None,
    padding: str = "espnet_legacy",
    seed: int = 0,
    share_weights: bool = True,
    frames: int | None = None,
    batch: int | None = None,
) -> dict[str, Impl]:
    """Build the implementations ``names`` (a subset of :data:`IMPL_NAMES`) on the preset's batch.

    With ``share_weights`` (the benchmark's main process), ours takes ESPnet's weights and the RETURNN pair share
    theirs (ESPnet layers -> ours -> RETURNN, RETURNN frontend -> ours); without it (memory subprocesses) each
    implementation is built alone with its own random init. ``frames``/``batch`` override the preset's batch
    (sweeps). ``padding`` is our encoder's padding mode for ``ours``/``ours_fp32``.
    """
    unknown = [n for n in names if n not in IMPL_NAMES]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; choose from {list(IMPL_NAMES)}")
    conf, f = preset.encoder_conf, preset.input_size
    x, lengths = make_batch(preset, device, seed, frames=frames, batch=batch)
    b, t = x.shape[:2]
    input_frames = int(lengths.sum())
    xl, nl = _layers_input(preset, x, lengths, seed)
    out: dict[str, Impl] = {}

    espnet = None
    wants_espnet = "espnet" in names or (share_weights and any(n in names for n in ("ours", "ours_fp32")))
    if wants_espnet and available_references()["espnet"]:
        espnet = _make_espnet(conf, f, seed).to(device)
    if "espnet" in names:
        if espnet is None:
            raise RuntimeError("espnet is not installed")
        ref = espnet

        def call_espnet(x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y, olens, _ = ref(x, lengths)
            return y, olens.long()

        out["espnet"] = Impl("espnet", ref, call_espnet, (x, lengths), _train_switch(ref), None,
                             espnet_conf_flops(conf, f, b, t), input_frames, "espnet_conf")  # fmt: skip

    ours = None
    for name in ("ours", "ours_fp32"):
        if name not in names:
            continue
        if ours is None:
            sd = espnet.state_dict() if (share_weights and espnet is not None) else None
            ours = _make_ours(conf, f, padding, sd, seed).to(device)
        ac = autocast if name == "ours" else None
        out[name] = Impl(name, ours, ours, (x, lengths), _train_switch(ours), ac, espnet_conf_flops(conf, f, b, t),
                         input_frames, "espnet_conf")  # fmt: skip

    for conv6 in (False, True):
        suffix = "conv6" if conv6 else "layers"
        ours_name, ret_name = f"ours_{suffix}", f"returnn_{suffix}"
        if ours_name not in names and ret_name not in names:
            continue
        xin, nin = (x, lengths) if conv6 else (xl, nl)
        fl = espnet_conf_flops(conf, f, b, t, frontend=CONV6) if conv6 else espnet_conf_flops(
            conf, f, b, xl.shape[1], frontend=None)  # fmt: skip
        ret = None
        if ret_name in names or (share_weights and ours_name in names and available_references()["returnn"]):
            ret = _Returnn(conf, f, conv6, seed, device)
        ours_r = None
        if ours_name in names or (share_weights and ret is not None):
            ours_r = _make_ours_returnn_style(conf, f, conv6, seed).to(device)
        if share_weights and ret is not None and ours_r is not None:
            ours_r = _share_returnn_weights(ours_r, ret, ours, conf, f, conv6)
        if ours_name in names:
            out[ours_name] = Impl(ours_name, ours_r, ours_r, (xin, nin), _train_switch(ours_r), autocast, fl,
                                  input_frames, suffix)  # fmt: skip
        if ret_name in names:
            out[ret_name] = Impl(ret_name, ret.pt, ret, (xin, nin), ret.set_train, None, fl, input_frames, suffix)
    for impl in out.values():
        impl.peer = _PEER.get(impl.name) if _PEER.get(impl.name) in out else None
    return {n: out[n] for n in names if n in out}


def set_batch(impls: dict[str, Impl], preset: Preset, *, frames: int, batch: int, seed: int = 0) -> None:
    """Point every implementation at a new batch of ``batch`` x ``frames`` (as :func:`make_batch`; layers-only
    variants get their (B, T', D) input), updating ``inputs``, ``flops`` and ``input_frames``."""
    if not impls:
        return
    device = str(next(iter(impls.values())).inputs[0].device)
    conf, f = preset.encoder_conf, preset.input_size
    x, lengths = make_batch(preset, device, seed, frames=frames, batch=batch)
    xl, nl = _layers_input(preset, x, lengths, seed)
    b, t = x.shape[:2]
    for impl in impls.values():
        impl.input_frames = int(lengths.sum())
        if impl.family == "layers":
            impl.inputs = (xl, nl)
            impl.flops = espnet_conf_flops(conf, f, b, xl.shape[1], frontend=None)
        else:
            impl.inputs = (x, lengths)
            impl.flops = espnet_conf_flops(conf, f, b, t, frontend=CONV6 if impl.family == "conv6" else True)


def _share_returnn_weights(ours_r: ConformerEncoder, ret: _Returnn, ours_espnet: nn.Module | None,
                           conf: dict[str, Any], in_dim: int, conv6: bool) -> ConformerEncoder:  # fmt: skip
    """Give RETURNN ESPnet's layer weights (taken from ``ours_espnet``, mapped by the RETURNN interop) and keep
    RETURNN's own frontend/projection weights; return ours loaded from exactly those RETURNN parameters."""
    from ..interop.returnn import export_returnn_params, load_returnn_encoder

    with torch.no_grad():
        if ours_espnet is not None:
            layer_state = {k: v for k, v in ours_espnet.state_dict().items() if k.startswith("layers.")}
            missing, unexpected = ours_r.load_state_dict(layer_state, strict=False)
            if unexpected or any(k.startswith("layers.") for k in missing):
                raise RuntimeError(f"layer weights do not map: missing {missing}, unexpected {unexpected}")
        params = export_returnn_params(ours_r)  # RETURNN names and layouts
        for k, v in ret.pt.state_dict().items():
            if not k.startswith("layers."):
                params[k] = v.detach().cpu()  # RETURNN's frontend and input projection
        ret.pt.load_state_dict(params, strict=True)
    enc = load_returnn_encoder(
        params, in_dim=in_dim if conv6 else int(conf["output_size"]), out_dim=int(conf["output_size"]),
        num_layers=int(conf["num_blocks"]), input_layer=CONV6 if conv6 else None,
        encoder_layer=_layer_dims(conf), **_returnn_style_opts(conf),
    )  # fmt: skip
    return enc.to(next(ours_r.parameters()).device)


def valid_frames_loss(y: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Sum of squares over the valid frames (float32)."""
    valid = lengths_to_valid(n.to(y.device), y.shape[1])  # (B, T')
    return (y.float().square() * valid[:, :, None]).sum()


def run_step(impl: Impl, mode: str, inputs: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """One measured step: ``"fwd"`` = eval + no_grad forward; ``"fwdbwd"`` = train-mode forward, loss = sum of
    squares over valid frames, backward. Gradients are left in place (the caller clears them). ``inputs``
    replaces the benchmark batch (warm-up)."""
    dev = next(impl.module.parameters()).device
    ac = (torch.autocast(dev.type, dtype=impl.autocast) if impl.autocast is not None
          else contextlib.nullcontext())  # fmt: skip
    if mode == "fwd":
        impl.set_train(False)
        with torch.no_grad(), ac:
            impl.call(*(inputs or impl.inputs))
    elif mode == "fwdbwd":
        impl.set_train(True)
        with ac:
            y, n = impl.call(*(inputs or impl.inputs))
        valid_frames_loss(y, n).backward()
    else:
        raise ValueError(f"mode must be 'fwd' or 'fwdbwd', got {mode!r}")


def clear_grads(impl: Impl) -> None:
    for p in impl.module.parameters():
        p.grad = None
