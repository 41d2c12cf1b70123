"""docs/config.md stays in sync with the config classes: its YAML block is a valid TrainConfig that lists every
field of every section with its default, and the input_layer / encoder_layer option tables list every option."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from ebranchformer.asr.feature_config import FeatureConfig
from ebranchformer.asr.model_config import ModelConfig
from ebranchformer.asr.specaug import SpecAugConfig
from ebranchformer.asr.train_config import (
    CheckpointConfig,
    DataConfig,
    LogConfig,
    OptimConfig,
    TokenizerConfig,
    TrainConfig,
)
from ebranchformer.config import ConfigBase
from ebranchformer.nn import (
    ConformerConvSubsample,
    ConformerLayerConfig,
    Conv2dSubsampling,
    EBranchformerLayerConfig,
    EncoderConfig,
    FrameStacking,
    LinearInput,
)
from ebranchformer.nn.frontend import Frontend

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"

# Every config section in the YAML block: its path and its class (model.encoder is a dict, checked separately).
SECTIONS: dict[tuple[str, ...], type] = {
    (): TrainConfig,
    ("data",): DataConfig,
    ("tokenizer",): TokenizerConfig,
    ("model",): ModelConfig,
    ("model", "features"): FeatureConfig,
    ("model", "specaug"): SpecAugConfig,
    ("optim",): OptimConfig,
    ("checkpoint",): CheckpointConfig,
    ("log",): LogConfig,
}
ENCODER = ("model", "encoder")
ENCODER_DERIVED = {"in_dim", "vocab_size"}  # filled in by ModelConfig, not written in a config

# Fields the doc shows with an example value instead of the field default (which is not a valid value).
EXAMPLE_VALUES = {("output_dir",), ("data", "train"), ("optim", "total_steps")}

FRONTENDS = {
    "Conv2dSubsampling": Conv2dSubsampling,
    "FrameStacking": FrameStacking,
    "LinearInput": LinearInput,
    "ConformerConvSubsample": ConformerConvSubsample,
}
LAYERS = {"EBranchformerLayer": EBranchformerLayerConfig, "ConformerLayer": ConformerLayerConfig}


@pytest.fixture(scope="module")
def text() -> str:
    return DOC.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def doc(text) -> dict[str, Any]:
    match = re.search(r"^```yaml\n(.*?)^```", text, re.S | re.M)
    assert match, f"{DOC} has no ```yaml block"
    return yaml.safe_load(match.group(1))


def _at(doc: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING, f"{f.name} has no default"
    return f.default_factory()


def _same(doc_value: Any, default: Any) -> bool:
    """Equal values of the same type (tuples as YAML lists; 1 is not 1.0 and true is not 1)."""
    if isinstance(default, (tuple, list)):
        return (
            isinstance(doc_value, list)
            and len(doc_value) == len(default)
            and all(_same(a, b) for a, b in zip(doc_value, default))
        )
    if isinstance(default, dict):
        return (
            isinstance(doc_value, dict)
            and doc_value.keys() == default.keys()
            and all(_same(doc_value[k], default[k]) for k in default)
        )
    return type(doc_value) is type(default) and doc_value == default


def _config_classes(hint: Any) -> list[type]:
    """The ConfigBase classes in a type hint such as ``FeatureConfig | None``."""
    args = typing.get_args(hint) or (hint,)
    return [a for a in args if isinstance(a, type) and issubclass(a, ConfigBase)]


def _table(text: str, heading: str) -> dict[str, list[str]]:
    """The first markdown table after ``heading``: {first cell without backticks: the other cells}."""
    start = text.index(heading + "\n")
    rows: dict[str, list[str]] = {}
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[0] not in ("option", "key") and not set(cells[0]) <= set("-"):
                rows[cells[0].strip("`")] = cells[1:]
        elif rows:
            break
    assert rows, f"no table after {heading!r}"
    return rows


def _literal(cell: str) -> tuple[bool, Any]:
    """(True, value) for a cell that is exactly one `YAML literal`, else (False, None)."""
    m = re.fullmatch(r"`([^`]*)`", cell)
    return (True, yaml.safe_load(m.group(1))) if m else (False, None)


def test_the_yaml_block_is_a_valid_train_config(doc):
    cfg = TrainConfig.from_dict(doc)
    assert cfg.output_dir == doc["output_dir"] and cfg.data.train == doc["data"]["train"]
    assert cfg.model == ModelConfig()  # the documented model is the default one


def test_sections_cover_every_nested_config():
    for path, cls in SECTIONS.items():
        for name, hint in typing.get_type_hints(cls).items():
            if name in {f.name for f in dataclasses.fields(cls)} and _config_classes(hint):
                assert path + (name,) in SECTIONS, f"section {'.'.join(path + (name,))} is missing from SECTIONS"


@pytest.mark.parametrize("path", list(SECTIONS), ids=lambda p: ".".join(p) or "top")
def test_each_section_lists_exactly_its_fields(doc, path):
    section = _at(doc, path)
    assert isinstance(section, dict)
    assert set(section) == {f.name for f in dataclasses.fields(SECTIONS[path])}


def test_encoder_lists_exactly_the_encoder_config_fields(doc):
    names = {f.name for f in dataclasses.fields(EncoderConfig)}
    assert ENCODER_DERIVED <= names
    assert set(_at(doc, ENCODER)) == names - ENCODER_DERIVED


@pytest.mark.parametrize("path", list(SECTIONS), ids=lambda p: ".".join(p) or "top")
def test_each_documented_value_is_the_default(doc, path):
    section = _at(doc, path)
    wrong = {}
    for f in dataclasses.fields(SECTIONS[path]):
        key = path + (f.name,)
        if key in SECTIONS or key == ENCODER or key in EXAMPLE_VALUES:
            continue
        if not _same(section[f.name], _field_default(f)):
            wrong[f.name] = (section[f.name], _field_default(f))
    assert not wrong, f"documented value != default (doc, default): {wrong}"


def test_example_values(doc):
    assert isinstance(doc["output_dir"], str) and doc["output_dir"]
    assert isinstance(doc["data"]["train"], str) and doc["data"]["train"]
    # total_steps has no default inside an optim section; the doc shows the one used when optim is omitted
    optim = {f.name: f for f in dataclasses.fields(TrainConfig)}["optim"]
    assert _same(doc["optim"]["total_steps"], _field_default(optim).total_steps)
    for key in EXAMPLE_VALUES:
        owner = SECTIONS[key[:-1]]
        assert key[-1] in {f.name for f in dataclasses.fields(owner)}


def test_encoder_values_are_the_default_encoder(doc):
    default = ModelConfig().encoder  # default_encoder(), completed with EncoderConfig's defaults
    documented = _at(doc, ENCODER)
    wrong = {k: (documented[k], default[k]) for k in default if not _same(documented[k], default[k])}
    assert not wrong, f"documented encoder value != default (doc, default): {wrong}"


def test_partial_encoder_table_lists_what_differs_from_encoder_config(text):
    rows = _table(text, "### A partial `model.encoder`")
    fields = {f.name: f for f in dataclasses.fields(EncoderConfig)}
    default = ModelConfig().encoder
    assert set(rows) == {k for k in default if not _same(default[k], _field_default(fields[k]))}
    for name, (omitted, left_out) in rows.items():
        ok, value = _literal(omitted)
        assert ok and _same(value, default[name]), f"{name}: doc {omitted}, code {default[name]!r}"
        ok, value = _literal(left_out)
        own = _field_default(fields[name])
        assert ok and _same(value, own), f"{name}: doc {left_out}, EncoderConfig {own!r}"


def test_every_frontend_class_has_a_table():
    def subclasses(cls: type) -> set[type]:
        return {c for s in cls.__subclasses__() for c in {s} | subclasses(s)}

    ours = {c.__name__ for c in subclasses(Frontend) if c.__module__.startswith("ebranchformer.")}  # not test doubles
    assert ours == set(FRONTENDS)


@pytest.mark.parametrize("name", list(FRONTENDS))
def test_frontend_table_matches_the_signature(text, name):
    rows = _table(text, f"#### `{name}`")
    params = {p.name: p for p in inspect.signature(FRONTENDS[name]).parameters.values()}
    assert set(rows) == set(params)
    for opt, (cell, _) in rows.items():
        default = params[opt].default
        if cell == "required":
            assert default is inspect.Parameter.empty, f"{name}.{opt} has a default"
        ok, value = _literal(cell)
        if ok:
            assert _same(value, default), f"{name}.{opt}: doc {cell}, code {default!r}"


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_table_matches_the_config(text, name):
    rows = _table(text, f"#### `{name}`")
    fields = {f.name: f for f in dataclasses.fields(LAYERS[name])}
    assert set(rows) == set(fields)
    for opt, (cell, _) in rows.items():
        ok, value = _literal(cell)
        if ok:
            assert _same(value, _field_default(fields[opt])), f"{name}.{opt}: doc {cell}, code {fields[opt].default!r}"
        else:  # only the options the encoder fills in are described in words
            assert opt in {"out_dim", "dropout", "num_heads", "att_dropout"}, f"{name}.{opt}: {cell}"
