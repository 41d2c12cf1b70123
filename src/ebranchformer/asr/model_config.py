"""``ModelConfig``: everything that defines a :class:`~ebranchformer.asr.ctc_model.CTCModel`.

Frontend (log-mel features), feature normalization, SpecAugment, the encoder and the CTC head, as one frozen
dataclass that round-trips through dict / YAML / JSON (it is the ``"model"`` entry of a model directory's
``config.json``).

``encoder`` holds the :class:`~ebranchformer.nn.EncoderConfig` fields except ``in_dim`` (the feature dim,
``features.n_mels``) and ``vocab_size`` (this config's ``vocab_size``), which are derived. Options left out
take :class:`~ebranchformer.nn.EncoderConfig`'s defaults (not those of :func:`default_encoder`, which only
applies when ``encoder`` is not given at all). It is stored fully resolved: every encoder option appears with
its value, and classes by their registered names.

The default encoder is ESPnet's E-Branchformer recipe shape (LibriSpeech-100): Conv2dSubsampling x4, D=256,
12 layers, 4 heads, FFN 1024, cgMLP 1024 (gate 512), kernels 31, input scale sqrt(D), final LayerNorm.

Example:
    >>> cfg = ModelConfig(vocab_size=30, encoder={**default_encoder(out_dim=32), "num_layers": 2})
    >>> cfg.encoder_config().in_dim, cfg.encoder["input_layer"]["class"], cfg.encoder["input_embedding_scale"]
    (80, 'Conv2dSubsampling', 5.656854249492381)
    >>> ModelConfig.from_json(cfg.to_json()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ebranchformer.asr.feature_config import FeatureConfig
from ebranchformer.asr.specaug import SpecAugConfig
from ebranchformer.config import ConfigBase, check
from ebranchformer.nn.encoder import EncoderConfig

__all__ = ["NORMALIZE_KINDS", "ModelConfig", "default_encoder"]

NORMALIZE_KINDS = ("global_mvn",)
_DERIVED = ("in_dim", "vocab_size")


def default_encoder(out_dim: int = 256) -> dict[str, Any]:
    """ESPnet's E-Branchformer recipe encoder options (no in_dim/vocab_size) for model dim ``out_dim``."""
    return {
        "out_dim": out_dim,
        "num_layers": 12,
        "num_heads": 4,
        "input_layer": {"class": "Conv2dSubsampling", "kind": "conv2d"},
        "encoder_layer": {
            "class": "EBranchformerLayer",
            "ff_dim": 4 * out_dim,
            "cgmlp_ff_dim": 2 * out_dim,
            "cgmlp_conv_kernel": 31,
            "merge_conv_kernel": 31,
            "norm_eps": 1e-12,
        },
        "input_embedding_scale": math.sqrt(out_dim),
        "final_norm": True,
    }


@dataclasses.dataclass(frozen=True)
class ModelConfig(ConfigBase):
    """Options of a CTC speech recognizer.

    Attributes:
        features: log-mel frontend (:class:`FeatureConfig`, or its dict); None for a model fed with features
            (then ``feature_dim`` gives F and only the ``*_features`` methods work). Default ESPnet's 80 mels.
        feature_dim: F when ``features`` is None; must be None (or equal n_mels) otherwise.
        normalize: "global_mvn" (ESPnet's GlobalMVN with train-set statistics) or None. Default "global_mvn".
        specaug: :class:`SpecAugConfig` (or its dict) applied in training only, after normalization; None
            disables. Default ESPnet's recipe settings.
        encoder: the encoder options (see the module doc); a dict or an :class:`EncoderConfig`. Default
            :func:`default_encoder`.
        vocab_size: CTC output size V (blank at id 0); None until known (training fills it in from the
            tokenizer). A model needs it.
        interctc_weight: w in ``loss = (1 - w) * ctc + w * mean(interctc)`` (ESPnet); in [0, 1). The
            intermediate layers are ``encoder["interctc_layers"]`` (needed when w > 0). Default 0.0.
        ctc_dropout: dropout on the encoder output before the CTC projection, training only (ESPnet CTC
            dropout_rate). Default 0.0.
        ctc_zero_infinity: zero the infinite losses (and gradients) of impossible CTC alignments. Default
            True.
    """

    features: FeatureConfig | None = dataclasses.field(default_factory=FeatureConfig.espnet)
    feature_dim: int | None = None
    normalize: str | None = "global_mvn"
    specaug: SpecAugConfig | None = dataclasses.field(default_factory=SpecAugConfig)
    encoder: dict[str, Any] = dataclasses.field(default_factory=default_encoder)
    vocab_size: int | None = None
    interctc_weight: float = 0.0
    ctc_dropout: float = 0.0
    ctc_zero_infinity: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.features, dict):
            object.__setattr__(self, "features", FeatureConfig.from_dict(self.features))
        if isinstance(self.specaug, dict):
            object.__setattr__(self, "specaug", SpecAugConfig.from_dict(self.specaug))
        check(
            self.features is None or isinstance(self.features, FeatureConfig),
            f"features must be a FeatureConfig, its dict or None, got {type(self.features).__name__}",
            TypeError,
        )
        check(
            self.specaug is None or isinstance(self.specaug, SpecAugConfig),
            f"specaug must be a SpecAugConfig, its dict or None, got {type(self.specaug).__name__}",
            TypeError,
        )
        self._check_feature_dim()
        check(
            self.normalize is None or self.normalize in NORMALIZE_KINDS,
            f"normalize must be one of {NORMALIZE_KINDS} or None, got {self.normalize!r}",
        )
        self._take_encoder_vocab()
        if self.vocab_size is not None:
            check(
                isinstance(self.vocab_size, int)
                and not isinstance(self.vocab_size, bool)
                and self.vocab_size >= 2,
                f"vocab_size must be an int >= 2 (blank + tokens) or None, got {self.vocab_size!r}",
            )
        for name in ("interctc_weight", "ctc_dropout"):
            v = getattr(self, name)
            check(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < 1.0,
                f"{name} must be a number in [0, 1), got {v!r}",
            )
            object.__setattr__(self, name, float(v))
        check(
            isinstance(self.ctc_zero_infinity, bool),
            f"ctc_zero_infinity must be a bool, got {self.ctc_zero_infinity!r}",
            TypeError,
        )
        object.__setattr__(self, "encoder", self._resolve_encoder(self.encoder))
        if self.interctc_weight > 0:
            check(
                bool(self.encoder["interctc_layers"]),
                f"interctc_weight={self.interctc_weight} needs encoder interctc_layers (1-based indices)",
            )

    def _check_feature_dim(self) -> None:
        if self.features is None:
            v = self.feature_dim
            check(
                isinstance(v, int) and not isinstance(v, bool) and v > 0,
                f"feature_dim must be a positive int when features is None, got {v!r}",
            )
        else:
            check(
                self.feature_dim in (None, self.features.n_mels),
                f"feature_dim must be None or features.n_mels={self.features.n_mels}, "
                f"got {self.feature_dim!r}",
            )
            object.__setattr__(self, "feature_dim", None)

    def _take_encoder_vocab(self) -> None:
        """An encoder ``vocab_size`` must agree with ``vocab_size``; it fills it in when that is None."""
        given = self.encoder.get("vocab_size") if isinstance(self.encoder, dict) else None
        if isinstance(self.encoder, EncoderConfig):
            given = self.encoder.vocab_size
        check(
            given is None or self.vocab_size is None or given == self.vocab_size,
            f"encoder vocab_size must equal vocab_size={self.vocab_size} (or be left out), got {given!r}",
        )
        if self.vocab_size is None and given is not None:
            object.__setattr__(self, "vocab_size", given)

    @property
    def in_dim(self) -> int:
        """The encoder's input feature dim F."""
        return self.features.n_mels if self.features is not None else int(self.feature_dim)

    def _resolve_encoder(self, encoder: Any) -> dict[str, Any]:
        """Validate the encoder options and return them complete, without the derived in_dim/vocab_size."""
        if isinstance(encoder, EncoderConfig):
            encoder = {f.name: getattr(encoder, f.name) for f in dataclasses.fields(encoder)}
        check(
            isinstance(encoder, dict),
            f"encoder must be a dict of EncoderConfig fields or an EncoderConfig, "
            f"got {type(encoder).__name__}",
            TypeError,
        )
        opts = dict(encoder)
        given_in = opts.pop("in_dim", None)
        check(
            given_in in (None, self.in_dim),
            f"encoder in_dim must be the feature dim {self.in_dim} (or left out), got {given_in!r}",
        )
        opts.pop("vocab_size", None)  # merged into self.vocab_size by _take_encoder_vocab
        # A conditioning layer needs V; before V is known (a training config), validate with a stand-in.
        vocab = self.vocab_size if self.vocab_size is not None else 2
        try:
            resolved = EncoderConfig.from_dict({**opts, "in_dim": self.in_dim, "vocab_size": vocab}).to_dict()
        except (TypeError, ValueError) as e:
            raise type(e)(f"invalid encoder options: {e}") from e
        for name in _DERIVED:
            resolved.pop(name)
        return resolved

    def encoder_config(self) -> EncoderConfig:
        """The full :class:`EncoderConfig` (in_dim and vocab_size filled in). Needs ``vocab_size``."""
        check(self.vocab_size is not None, "ModelConfig.vocab_size is None; set it (e.g. from the tokenizer)")
        return EncoderConfig.from_dict({**self.encoder, "in_dim": self.in_dim, "vocab_size": self.vocab_size})

    @property
    def model_dim(self) -> int:
        """The encoder output dim D."""
        return int(self.encoder["out_dim"])
