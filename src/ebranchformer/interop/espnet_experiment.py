"""Convert an ESPnet ASR experiment (``config.yaml`` + ``*.pth``) with an E-Branchformer encoder and a CTC head
into our model directory (:mod:`ebranchformer.asr.model_dir`).

What is read from ``config.yaml`` (espnet2 ``asr.sh`` / ``asr_train`` layout):

- ``encoder: e_branchformer`` and ``encoder_conf`` (see :func:`~ebranchformer.interop.espnet.load_espnet_encoder`);
  any other encoder type is rejected (ValueError naming it). ``preencoder``/``postencoder`` must be null.
- ``frontend: default`` and ``frontend_conf`` (``fs``, ``n_fft``, ``win_length``, ``hop_length``, ``window``,
  ``center``, ``n_mels``, ``fmin``, ``fmax``; omitted keys take ``DefaultFrontend``'s defaults, e.g. hop 128) ->
  our ``"espnet"`` feature preset (:func:`espnet_feature_config`). ``frontend: null`` (precomputed features of
  ``input_size`` dims) gives a model without the waveform frontend.
- ``normalize: global_mvn`` with ``normalize_conf.stats_file`` (a ``feats_stats.npz``; the ``stats`` argument
  overrides the path). When the file cannot be found and no ``stats`` is given, the checkpoint's own
  ``normalize.mean``/``normalize.std`` are used (with a warning). ``normalize: null`` is supported too.
- ``token_list`` (a list, or the path of ``tokens.txt``) with ``token_type`` ``char`` or ``bpe`` (+ ``bpemodel``)
  -> a :class:`~ebranchformer.asr.tokenizer.TokenListTokenizer`.
- ``specaug``/``specaug_conf``, ``ctc_conf`` (dropout, zero_infinity) and ``model_conf.interctc_weight``:
  training options carried over for fine-tuning.

Relative paths in the config (token list, stats, bpe model) are tried relative to the current directory, then
relative to the config's folder and its two parents (``exp/<name>/config.yaml`` lives two levels below the
recipe directory the paths are relative to).

The checkpoint (``valid.acc.ave.pth`` -- a plain state_dict -- or a ``checkpoint.pth`` with a ``"model"``
entry) is loaded with ``weights_only=True``. Its keys must be ``encoder.*``, ``ctc.ctc_lo.{weight,bias}``,
``frontend.logmel.melmat`` (checked against the feature config), ``normalize.{mean,std}`` (checked against the
statistics) or ``decoder.*`` (the attention decoder: ignored, with a warning); anything else is an error.

Every error (a truncated checkpoint, an unsupported encoder, a token list whose size differs from the CTC
head's, statistics of the wrong dimension, ...) is raised before anything is written: ``out_dir`` is written
atomically, complete or not at all.

Example:
    >>> convert_espnet_experiment("exp/asr_train/config.yaml", "exp/asr_train/valid.acc.ave.pth",
    ...                           "models/ls100_ebf")  # doctest: +SKIP
    >>> from ebranchformer.asr.ctc_model import CTCModel
    >>> CTCModel.load("models/ls100_ebf").transcribe(["utt.wav"])  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..asr.feature_config import FeatureConfig
from ..asr.global_mvn import GlobalMVN
from ..asr.mel_filterbank import slaney_mel_filterbank
from ..asr.specaug import SpecAugConfig
from ..asr.tokenizer import TokenListTokenizer, read_token_list
from ._files import check_out_dir, load_torch_file, read_yaml_mapping
from .espnet import espnet_encoder_config, load_espnet_encoder

__all__ = [
    "convert_espnet_experiment",
    "espnet_feature_config",
    "espnet_specaug_config",
    "read_espnet_checkpoint",
]

logger = logging.getLogger(__name__)

# DefaultFrontend.__init__ defaults (espnet 202511)
_FRONTEND_DEFAULTS: dict[str, Any] = dict(
    fs=16000, n_fft=512, win_length=None, hop_length=128, window="hann", center=True, normalized=False,
    onesided=True, n_mels=80, fmin=None, fmax=None, htk=False, frontend_conf=None, apply_stft=True,
)  # fmt: skip
# SpecAug.__init__ defaults (espnet 202511)
_SPECAUG_DEFAULTS: dict[str, Any] = dict(
    apply_time_warp=True, time_warp_window=5, time_warp_mode="bicubic", apply_freq_mask=True,
    freq_mask_width_range=(0, 20), num_freq_mask=2, apply_time_mask=True, time_mask_width_range=None,
    time_mask_width_ratio_range=None, num_time_mask=2, replace_with_zero=True,
)  # fmt: skip
_GLOBAL_MVN_DEFAULTS = {"norm_means": True, "norm_vars": True, "eps": 1.0e-20}


def _parse_fs(fs: Any) -> int:
    """ESPnet's ``fs``: an int or a string such as ``"16k"`` (humanfriendly's decimal sizes)."""
    if isinstance(fs, bool):
        raise TypeError(f"frontend_conf fs must be a sample rate, got {fs!r}")
    if isinstance(fs, (int, np.integer)):
        return int(fs)
    if isinstance(fs, float) and fs.is_integer():
        return int(fs)
    if isinstance(fs, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kK]?)\s*", fs)
        if m:
            value = float(m[1]) * (1000 if m[2] else 1)
            if value.is_integer():
                return int(value)
    raise ValueError(f"frontend_conf fs must be an int or a size like '16k', got {fs!r}")


def espnet_feature_config(frontend_conf: Mapping[str, Any] | None) -> FeatureConfig:
    """Our ``"espnet"`` :class:`FeatureConfig` equal to ESPnet's ``DefaultFrontend(**frontend_conf)``.

    Omitted keys take DefaultFrontend's defaults (``hop_length=128``, ``win_length=n_fft``, ...). Raises
    ValueError naming the option for what the preset cannot reproduce (``normalized``, two-sided spectra,
    HTK mels, no window, WPE/beamforming front ends, ``apply_stft=False``) and for unknown options.
    """
    conf = dict(frontend_conf or {})
    unknown = sorted(set(conf) - set(_FRONTEND_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown ESPnet DefaultFrontend option(s) {unknown} in frontend_conf")
    c = {**_FRONTEND_DEFAULTS, **conf}
    for name, supported in (("normalized", False), ("onesided", True), ("htk", False), ("apply_stft", True)):
        if bool(c[name]) != supported:
            raise ValueError(f"frontend_conf {name}={c[name]!r} is not supported (only {supported})")
    inner = c["frontend_conf"]
    if inner is not None and (
        not isinstance(inner, Mapping) or inner.get("use_wpe") or inner.get("use_beamformer")
    ):
        raise ValueError(
            f"frontend_conf.frontend_conf (WPE / beamformer front end) is not supported, got {inner!r}"
        )
    if c["window"] is None:
        raise ValueError("frontend_conf window=None (a rectangular STFT window) is not supported")
    n_fft = int(c["n_fft"])
    return FeatureConfig.espnet(
        sample_rate=_parse_fs(c["fs"]),
        n_mels=int(c["n_mels"]),
        n_fft=n_fft,
        win_length=n_fft if c["win_length"] is None else int(c["win_length"]),
        hop_length=int(c["hop_length"]),
        window=str(c["window"]),
        center=bool(c["center"]),
        fmin=0.0 if c["fmin"] is None else float(c["fmin"]),
        fmax=None if c["fmax"] is None else float(c["fmax"]),
    )


def _half_open(v: Any, name: str, cast: type) -> tuple | None:
    if v is None:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (cast(0), cast(v))
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return (cast(v[0]), cast(v[1]))
    raise ValueError(f"specaug_conf {name} must be a number or a pair, got {v!r}")


def espnet_specaug_config(specaug_conf: Mapping[str, Any] | None) -> SpecAugConfig:
    """Our :class:`SpecAugConfig` for ESPnet's ``SpecAug(**specaug_conf)`` (omitted keys: SpecAug's defaults)."""
    conf = dict(specaug_conf or {})
    unknown = sorted(set(conf) - set(_SPECAUG_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown ESPnet SpecAug option(s) {unknown} in specaug_conf")
    c = {**_SPECAUG_DEFAULTS, **conf}
    time_width = _half_open(c["time_mask_width_range"], "time_mask_width_range", int)
    time_ratio = _half_open(c["time_mask_width_ratio_range"], "time_mask_width_ratio_range", float)
    if c["apply_time_mask"] and (time_width is None) == (time_ratio is None):
        raise ValueError(
            "specaug_conf needs exactly one of time_mask_width_range, time_mask_width_ratio_range"
        )
    return SpecAugConfig(
        time_warp_window=int(c["time_warp_window"]) if c["apply_time_warp"] else 0,
        time_warp_mode=str(c["time_warp_mode"]),
        num_freq_masks=int(c["num_freq_mask"]) if c["apply_freq_mask"] else 0,
        freq_mask_width=_half_open(c["freq_mask_width_range"], "freq_mask_width_range", int),
        num_time_masks=int(c["num_time_mask"]) if c["apply_time_mask"] else 0,
        time_mask_width=time_width if c["apply_time_mask"] else None,
        time_mask_width_ratio=time_ratio if c["apply_time_mask"] else None,
        replace_with_zero=bool(c["replace_with_zero"]),
    )


def read_espnet_checkpoint(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state_dict of an ESPnet ``.pth`` (a plain state_dict, or a ``checkpoint.pth`` with a
    ``"model"`` entry), loaded with ``weights_only=True``. Raises ValueError naming the file when it is
    truncated, corrupt or holds no state_dict."""
    sd = load_torch_file(checkpoint)
    where = repr(os.fspath(checkpoint))
    if isinstance(sd, Mapping) and isinstance(sd.get("model"), Mapping):
        sd = sd["model"]  # espnet2's checkpoint.pth: {"model", "reporter", "optimizers", ...}
    if not isinstance(sd, Mapping) or not sd:
        raise ValueError(f"checkpoint {where} does not hold a model state_dict")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint {where}: entries {bad[:5]} are not named tensors")
    return dict(sd)


def _resolve(value: Any, name: str, config_path: Path) -> Path:
    """A path from the config: as given (relative to the working directory), else relative to the config's
    folder or one of its two parents. Raises FileNotFoundError listing what was tried."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, got {value!r}")
    p = Path(value)
    folder = config_path.resolve().parent
    tried = [p] if p.is_absolute() else [p, folder / p, folder.parent / p, folder.parent.parent / p]
    for cand in tried:
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"{name} {os.fspath(value)!r} not found (tried {[os.fspath(t) for t in tried]})")


def _check_architecture(conf: dict[str, Any], where: str) -> None:
    encoder = conf.get("encoder")
    if encoder != "e_branchformer":
        raise ValueError(
            f"{where}: unsupported encoder type {encoder!r}; only 'e_branchformer' can be converted"
        )
    for name in ("preencoder", "postencoder"):
        if conf.get(name) is not None:
            raise ValueError(f"{where}: {name}={conf[name]!r} is not supported (must be null)")
    if conf.get("frontend", "default") not in ("default", None):
        raise ValueError(f"{where}: unsupported frontend {conf['frontend']!r}; only 'default' or null")
    if conf.get("normalize") not in ("global_mvn", None):
        raise ValueError(f"{where}: unsupported normalize {conf['normalize']!r}; only 'global_mvn' or null")
    model = conf.get("model", "espnet")
    if model != "espnet":
        logger.warning("%s: model type %r; converting its encoder and CTC head like 'espnet'", where, model)
    if float((conf.get("model_conf") or {}).get("ctc_weight", 0.5)) == 0.0:
        raise ValueError(f"{where}: model_conf.ctc_weight is 0, so the model has no CTC head to convert")


def _tokenizer(conf: dict[str, Any], config_path: Path, token_list: Any, bpemodel: Any) -> TokenListTokenizer:
    where = str(config_path)
    tokens = conf.get("token_list") if token_list is None else token_list
    if tokens is None:
        raise ValueError(f"{where}: no token_list in the config (pass token_list=...)")
    if isinstance(tokens, (str, os.PathLike)):
        tokens = read_token_list(_resolve(tokens, "token_list", config_path))
    elif not isinstance(tokens, (list, tuple)):
        raise TypeError(f"token_list must be a list of tokens or a path, got {type(tokens).__name__}")
    model = conf.get("bpemodel") if bpemodel is None else bpemodel
    kind = conf.get("token_type", "bpe" if model else "char")
    if kind == "char":
        return TokenListTokenizer(list(tokens), text_kind="char")
    if kind == "bpe":
        if model is None:
            raise ValueError(f"{where}: token_type is 'bpe' but no bpemodel is given (pass bpemodel=...)")
        return TokenListTokenizer(
            list(tokens), text_kind="bpe", bpemodel=_resolve(model, "bpemodel", config_path)
        )
    raise ValueError(f"{where}: unsupported token_type {kind!r}; only 'char' and 'bpe'")


def _split_keys(
    sd: dict[str, torch.Tensor], where: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(encoder keys without the prefix, the other known keys); ignores decoder keys with a warning and
    raises ValueError for unexpected ones."""
    enc, rest, ignored, unexpected = {}, {}, [], []
    known = {
        "ctc.ctc_lo.weight",
        "ctc.ctc_lo.bias",
        "frontend.logmel.melmat",
        "normalize.mean",
        "normalize.std",
    }
    for k, v in sd.items():
        if k.startswith("encoder."):
            enc[k[len("encoder.") :]] = v
        elif k in known:
            rest[k] = v
        elif k.startswith("decoder."):
            ignored.append(k)
        else:
            unexpected.append(k)
    if unexpected:
        raise ValueError(
            f"checkpoint {where}: unexpected keys {sorted(unexpected)[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''} (only encoder.*, ctc.ctc_lo.*, decoder.*, "
            "frontend.logmel.melmat and normalize.mean/std are understood)"
        )
    if ignored:
        logger.warning(
            "checkpoint %s: ignoring the attention decoder's %d tensors (decoder.*): only the encoder and the "
            "CTC head are converted",
            where,
            len(ignored),
        )
    for k in ("ctc.ctc_lo.weight", "ctc.ctc_lo.bias"):
        if k not in rest:
            raise ValueError(
                f"checkpoint {where}: the CTC head {k!r} is missing (was model_conf.ctc_weight 0?)"
            )
    if not enc:
        raise ValueError(f"checkpoint {where}: no encoder.* weights")
    return enc, rest


def _normalizer(
    conf: dict[str, Any], config_path: Path, stats: Any, rest: dict[str, torch.Tensor], dim: int
) -> GlobalMVN | None:
    if conf.get("normalize") is None:
        if stats is not None:
            raise ValueError("stats given, but the config has normalize: null")
        return None
    nconf = dict(conf.get("normalize_conf") or {})
    for k, default in _GLOBAL_MVN_DEFAULTS.items():
        if k in nconf and nconf[k] != default:
            raise ValueError(f"normalize_conf {k}={nconf[k]!r} is not supported (only {default!r})")
    mean, std = rest.get("normalize.mean"), rest.get("normalize.std")
    path: Path | None = None
    if stats is not None:
        path = Path(stats)
        if not path.is_file():
            raise FileNotFoundError(f"stats {str(path)!r} does not exist")
    else:
        try:
            path = _resolve(nconf.get("stats_file"), "normalize_conf.stats_file", config_path)
        except (FileNotFoundError, TypeError) as e:
            if mean is None or std is None:
                raise FileNotFoundError(f"{e}; pass stats=... (the experiment's feats_stats.npz)") from None
            logger.warning("%s; using the checkpoint's normalize.mean / normalize.std instead", e)
    if path is not None:
        mvn = GlobalMVN.from_espnet_stats(path)  # ValueError naming the file when unreadable
        where = f"stats {str(path)!r}"
    else:  # count 1, sum = mean, sum_square = std^2 + mean^2: gives back this mean and std
        m, sd = mean.double().numpy(), std.double().numpy()
        mvn = GlobalMVN(1, m, sd * sd + m * m)
        where = "the checkpoint's normalize.mean/std"
    if mvn.dim != dim:
        raise ValueError(
            f"{where} have dimension {mvn.dim}, but the encoder input (features) has dimension {dim}"
        )
    for name, ref in (("mean", mean), ("std", std)):
        if ref is None:
            continue
        if tuple(ref.shape) != (dim,):
            raise ValueError(f"checkpoint normalize.{name} has shape {tuple(ref.shape)}, expected ({dim},)")
        ours = getattr(mvn, name).double()
        if not torch.allclose(ours, ref.double(), rtol=1e-4, atol=1e-5):
            raise ValueError(
                f"{where} disagree with the checkpoint's normalize.{name}: not this model's statistics"
            )
    return mvn


def _check_melmat(rest: dict[str, torch.Tensor], fc: FeatureConfig | None) -> None:
    melmat = rest.get("frontend.logmel.melmat")
    if melmat is None:
        return
    if fc is None:
        raise ValueError("checkpoint has frontend.logmel.melmat, but the config has frontend: null")
    ours = slaney_mel_filterbank(fc.sample_rate, fc.n_fft, fc.n_mels, fc.fmin, fc.fmax).T  # (n_freq, n_mels)
    theirs = melmat.double().numpy()
    if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=1e-4, atol=1e-7):
        raise ValueError(
            f"checkpoint frontend.logmel.melmat {theirs.shape} does not match frontend_conf (fs={fc.sample_rate}, "
            f"n_fft={fc.n_fft}, n_mels={fc.n_mels}, fmin={fc.fmin}, fmax={fc.fmax})"
        )


def convert_espnet_experiment(
    config_yaml: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    stats: str | os.PathLike | None = None,
    token_list: list[str] | str | os.PathLike | None = None,
    bpemodel: str | os.PathLike | None = None,
    padding: str = "masked",
    overwrite: bool = False,
) -> Path:
    """Convert an ESPnet E-Branchformer CTC/attention experiment into a model directory at ``out_dir``.

    Args:
        config_yaml: the experiment's ``config.yaml``.
        checkpoint: its ``.pth`` (e.g. ``valid.acc.ave.pth``).
        out_dir: the model directory to write (atomically).
        stats: ``feats_stats.npz`` to use instead of ``normalize_conf.stats_file``.
        token_list: the token list (list or ``tokens.txt``) instead of the config's ``token_list``.
        bpemodel: the sentencepiece model instead of the config's ``bpemodel`` (``token_type: bpe``).
        padding: the encoder's padding mode: ``"masked"`` (Default: batch-invariant; equals ESPnet's inference,
            which decodes one utterance at a time) or ``"espnet_legacy"`` (ESPnet's batched forward, padding
            quirks included).
        overwrite: replace an existing ``out_dir``. Default False (FileExistsError).

    Returns:
        ``Path(out_dir)``; load it with ``CTCModel.load``.

    Raises:
        ValueError / FileNotFoundError naming the file or option at fault (see the module doc); nothing is
        written then.
    """
    from ..asr.ctc_model import CTCModel
    from ..asr.model_config import ModelConfig

    out = check_out_dir(out_dir, overwrite)
    conf = read_yaml_mapping(config_yaml, "config_yaml")
    config_path = Path(config_yaml)
    where = str(config_path)
    _check_architecture(conf, where)
    tokenizer = _tokenizer(conf, config_path, token_list, bpemodel)
    fc = (
        espnet_feature_config(conf.get("frontend_conf"))
        if conf.get("frontend", "default") is not None
        else None
    )
    input_size = fc.n_mels if fc is not None else conf.get("input_size")
    if not isinstance(input_size, int) or input_size <= 0:
        raise ValueError(f"{where}: frontend: null needs a positive int input_size, got {input_size!r}")

    sd = read_espnet_checkpoint(checkpoint)
    enc_sd, rest = _split_keys(sd, repr(os.fspath(checkpoint)))
    weight, bias = rest["ctc.ctc_lo.weight"], rest["ctc.ctc_lo.bias"]
    vocab = int(weight.shape[0])
    if weight.dim() != 2 or tuple(bias.shape) != (vocab,):
        raise ValueError(f"checkpoint ctc.ctc_lo has shapes {tuple(weight.shape)} / {tuple(bias.shape)}")
    if vocab != tokenizer.vocab_size:
        raise ValueError(
            f"the token list has {tokenizer.vocab_size} tokens, but the CTC head (ctc.ctc_lo.weight) has {vocab} "
            "outputs: the token list does not belong to this checkpoint"
        )
    _check_melmat(rest, fc)
    mvn = _normalizer(conf, config_path, stats, rest, input_size)

    encoder_conf = conf.get("encoder_conf") or {}
    enc = load_espnet_encoder(encoder_conf, input_size, enc_sd, padding=padding, vocab_size=vocab)
    if enc.config.out_dim != weight.shape[1]:
        raise ValueError(
            f"ctc.ctc_lo.weight takes {weight.shape[1]} inputs, the encoder gives {enc.config.out_dim}"
        )
    ctc_conf = conf.get("ctc_conf") or {}
    if ctc_conf.get("ctc_type", "builtin") != "builtin":
        logger.warning(
            "%s: ctc_type %r; the converted model trains with the builtin CTC loss",
            where,
            ctc_conf["ctc_type"],
        )
    zero_inf = ctc_conf.get("ignore_nan_grad")
    zero_inf = ctc_conf.get("zero_infinity", True) if zero_inf is None else zero_inf
    specaug = None
    if conf.get("specaug") == "specaug":
        specaug = espnet_specaug_config(conf.get("specaug_conf"))
    elif conf.get("specaug") is not None:
        logger.warning(
            "%s: specaug %r is not supported; the converted model has no SpecAugment", where, conf["specaug"]
        )
    interctc_weight = float((conf.get("model_conf") or {}).get("interctc_weight", 0.0))
    cfg = ModelConfig(
        features=fc,
        feature_dim=None if fc is not None else input_size,
        normalize="global_mvn" if mvn is not None else None,
        specaug=specaug,
        encoder=espnet_encoder_config(encoder_conf, input_size, padding=padding, vocab_size=vocab),
        vocab_size=vocab,
        interctc_weight=interctc_weight,
        ctc_dropout=float(ctc_conf.get("dropout_rate", 0.0)),
        ctc_zero_infinity=bool(zero_inf),
    )
    model = CTCModel(cfg, tokenizer=tokenizer, normalizer=mvn)
    model.encoder.load_state_dict(enc.state_dict(), strict=True)
    with torch.no_grad():
        model.ctc.linear.weight.copy_(weight)
        model.ctc.linear.bias.copy_(bias)
    if not all(bool(torch.isfinite(p.detach()).all()) for p in model.parameters()):
        raise ValueError(f"checkpoint {os.fspath(checkpoint)!r} holds non-finite weights")
    return model.eval().save(out)
