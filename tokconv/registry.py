"""Name-keyed converter registry (timm ``_registry.py`` style).

Presets are plain functions decorated with ``@register_converter``; the function name is the
preset name used in job YAML. ``create_converter`` drops ``None`` kwargs so a YAML file can
leave a preset's defaults alone.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable

from torch import nn

from .targets import STUDENT, TEACHERS, TargetSpec

_CONVERTERS: dict[str, Callable[..., nn.Module]] = {}


def register_converter(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    name = fn.__name__
    if name in _CONVERTERS:
        raise ValueError(f"converter {name!r} is already registered")
    _CONVERTERS[name] = fn
    return fn


def _ensure_builtin_converters_loaded() -> None:
    from . import converters  # noqa: F401  (registers the presets on import)


def list_converters(pattern: str = "*") -> list[str]:
    _ensure_builtin_converters_loaded()
    return sorted(n for n in _CONVERTERS if fnmatch.fnmatch(n, pattern))


def is_converter(name: str) -> bool:
    _ensure_builtin_converters_loaded()
    return name in _CONVERTERS


def get_converter_fn(name: str) -> Callable[..., nn.Module]:
    """The preset function registered as ``name`` (its ``param_budget`` attribute, when set,
    documents the preset's parameter budget for the mission targets)."""
    _ensure_builtin_converters_loaded()
    if name not in _CONVERTERS:
        raise ValueError(f"unknown converter {name!r}; known: {', '.join(sorted(_CONVERTERS))}")
    return _CONVERTERS[name]


def create_converter(
    name: str,
    *,
    student: TargetSpec = STUDENT,
    targets: dict[str, TargetSpec] | None = None,
    **kwargs,
) -> nn.Module:
    """Build preset ``name`` mapping ``student`` tokens to each of ``targets`` (default: the
    three mission teachers). Unknown names raise with the list of known ones."""
    _ensure_builtin_converters_loaded()
    if name not in _CONVERTERS:
        raise ValueError(f"unknown converter {name!r}; known: {', '.join(sorted(_CONVERTERS))}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return _CONVERTERS[name](student=student, targets=dict(targets or TEACHERS), **kwargs)
