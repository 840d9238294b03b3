"""tokconv: small converters that map student video tokens into teacher token layouts.

Pure torch (no Ray, no pydantic), so exported models load anywhere torch does. The names below
load on first use (PEP 562): ``import tokconv.targets`` costs no torch or timm import, which the
feature store and the training worker's start-up rely on.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ALL_SPECS": "targets", "STUDENT": "targets", "TEACHERS": "targets", "TargetSpec": "targets",
    "ResidualHead": "heads",
    "load_converter": "io", "load_head": "io", "save_converter": "io", "save_head": "io",
    "distill_loss": "losses", "standardize": "losses",
    "create_converter": "registry", "get_converter_fn": "registry", "is_converter": "registry",
    "list_converters": "registry", "register_converter": "registry",
}
__all__ = [
    "ALL_SPECS",
    "STUDENT",
    "TEACHERS",
    "ResidualHead",
    "TargetSpec",
    "create_converter",
    "distill_loss",
    "get_converter_fn",
    "is_converter",
    "list_converters",
    "load_converter",
    "load_head",
    "register_converter",
    "save_converter",
    "save_head",
    "standardize",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tokconv' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
