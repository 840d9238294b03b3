"""tokconv: small converters that map student video tokens into teacher token layouts.

Pure torch (no Ray, no pydantic), so exported models load anywhere torch does.
"""
from .heads import ResidualHead
from .io import load_converter, load_head, save_converter, save_head
from .losses import distill_loss, standardize
from .registry import (
    create_converter,
    get_converter_fn,
    is_converter,
    list_converters,
    register_converter,
)
from .targets import ALL_SPECS, STUDENT, TEACHERS, TargetSpec

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
