"""Frozen-dataclass configs that round-trip to dict, YAML and JSON, and the seed-style ``build_dict``.

``build_dict(EBranchformerLayer, ff_dim=1024)`` gives ``{"class": EBranchformerLayer, "ff_dim": 1024}``, a
description of a module that a parent builds later with its own defaults filled in (RETURNN's ``rf.build_dict``).
The class may also be given by its registered name (``"EBranchformerLayer"``), which is how it is written to YAML/JSON.

Example:
    >>> from ebranchformer import build_dict, EBranchformerLayer
    >>> spec = build_dict(EBranchformerLayer, ff_dim=1024, num_heads=4)
    >>> spec_to_dict(spec)
    {'class': 'EBranchformerLayer', 'ff_dim': 1024, 'num_heads': 4}
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from collections.abc import Callable
from typing import Any, TypeVar

import yaml

__all__ = ["ConfigBase", "build_dict", "build_module", "check_spec", "load_yaml", "register", "resolve_class", "spec_to_dict"]

_REGISTRY: dict[str, type] = {}


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2 floats without a dot (``1e-8``, ``5E3``): YAML 1.1, which PyYAML
    follows, reads those as strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that also reads ``1e-8`` as a float (every config file of this package goes through it).

    Example:
        >>> load_yaml("lr: 1e-3\nsteps: 100")
        {'lr': 0.001, 'steps': 100}
    """
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
T = TypeVar("T")


def register(cls: type[T]) -> type[T]:
    """Class decorator: make ``cls`` buildable by name from a serialized spec."""
    _REGISTRY[cls.__name__] = cls
    return cls


def resolve_class(cls_or_name: type | str) -> type:
    """The class for a registered name (or the class itself)."""
    if isinstance(cls_or_name, type):
        return cls_or_name
    if isinstance(cls_or_name, str):
        try:
            return _REGISTRY[cls_or_name]
        except KeyError:
            raise ValueError(f"unknown module class {cls_or_name!r}; known: {sorted(_REGISTRY)}") from None
    raise TypeError(f"expected a class or a registered class name, got {type(cls_or_name).__name__}")


def build_dict(cls: type | str, **opts: Any) -> dict[str, Any]:
    """Describe a module to be built later: ``{"class": cls, **opts}`` (as RETURNN's ``rf.build_dict``)."""
    resolve_class(cls)  # fail early on an unknown name
    return {"class": cls, **opts}


def check_spec(spec: Any, what: str) -> None:
    """Check a ``build_dict`` spec without building it: a known class, and options its constructor takes.

    ``what`` names the spec in the error (e.g. ``"encoder_layer"``). Classes, modules, factories and None pass.

    Example:
        >>> check_spec({"class": "EBranchformerLayer", "cgmlp_kernel": 7}, "encoder_layer")
        Traceback (most recent call last):
        ...
        ValueError: encoder_layer: EBranchformerLayer has no option 'cgmlp_kernel' (its options: ...)
    """
    if isinstance(spec, str):
        resolve_class(spec)
    if not isinstance(spec, dict):
        return
    if "class" not in spec:
        raise ValueError(f"{what}: a module spec dict needs a 'class' key, got keys {sorted(spec)}")
    cls = resolve_class(spec["class"])
    config_class = getattr(cls, "config_class", None)  # a module whose **opts go to a config dataclass
    if config_class is not None:
        params: Any = {f.name: f for f in dataclasses.fields(config_class)}
    else:
        params = inspect.signature(cls).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return
    unknown = sorted(k for k in spec if k != "class" and k not in params)
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise ValueError(
            f"{what}: {cls.__name__} has no option{'s' if len(unknown) > 1 else ''} {names} "
            f"(its options: {', '.join(params)})"
        )


def build_module(spec: Any, default_cls: type | None = None, **defaults: Any) -> Any:
    """Build a module from a spec, filling ``defaults`` for options the spec does not set.

    ``spec`` is None (use ``default_cls``), a class, a ``build_dict`` dict, or an already-built module (returned
    as is; the caller deep-copies where it needs independent copies).
    """
    import torch

    if spec is None:
        if default_cls is None:
            raise ValueError("no module spec given and no default class")
        return default_cls(**defaults)
    if isinstance(spec, torch.nn.Module):
        return spec
    if isinstance(spec, (type, str)):
        return resolve_class(spec)(**defaults)
    if isinstance(spec, dict):
        if "class" not in spec:
            raise ValueError(f"a module spec dict needs a 'class' key, got keys {sorted(spec)}")
        opts = {k: v for k, v in spec.items() if k != "class"}
        return resolve_class(spec["class"])(**{**defaults, **opts})
    if callable(spec):  # e.g. a factory function
        return spec(**defaults)
    raise TypeError(f"module spec must be a class, a build_dict dict or a module, got {type(spec).__name__}")


def spec_to_dict(spec: Any) -> Any:
    """A JSON-able form of a spec (classes by registered name). Raises TypeError for a live module."""
    import torch

    if spec is None or isinstance(spec, (bool, int, float, str)):
        return spec
    if isinstance(spec, type):
        if _REGISTRY.get(spec.__name__) is not spec:
            raise TypeError(f"class {spec.__qualname__} is not registered, so it cannot be serialized")
        return spec.__name__
    if isinstance(spec, dict):
        return {k: spec_to_dict(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [spec_to_dict(v) for v in spec]
    if isinstance(spec, torch.nn.Module):
        raise TypeError(f"a built module ({type(spec).__name__}) in a config cannot be serialized; pass a spec")
    raise TypeError(f"cannot serialize {spec!r} (type {type(spec).__name__}) in a config")


C = TypeVar("C", bound="ConfigBase")


class ConfigBase:
    """Mixin for frozen dataclass configs: dict/YAML/JSON round trips; unknown keys raise ValueError."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, ConfigBase) else spec_to_dict(v)
        return out

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        if not isinstance(d, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; expected a subset of {sorted(names)}")
        hints = _field_types(cls)
        kwargs = {}
        for k, v in d.items():
            sub = hints.get(k)
            if isinstance(v, dict) and isinstance(sub, type) and issubclass(sub, ConfigBase):
                v = sub.from_dict(v)
            elif isinstance(v, list) and k in getattr(cls, "_tuple_fields", ()):
                v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
            kwargs[k] = v
        return cls(**kwargs)

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **{"indent": 2, **kw})

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls: type[C], text: str) -> C:
        return cls.from_dict(load_yaml(text))

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _field_types(cls: type) -> dict[str, Any]:
    import typing

    try:
        return typing.get_type_hints(cls)
    except Exception:  # forward refs that cannot be resolved: no nested configs then
        return {}


def check(cond: bool, msg: str, exc: Callable[[str], Exception] = ValueError) -> None:
    """Raise ``exc(msg)`` unless ``cond``; the message names the argument and what was expected."""
    if not cond:
        raise exc(msg)
