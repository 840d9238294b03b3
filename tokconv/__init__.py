"""tokconv: small converters that map student video tokens into teacher token layouts.

Pure torch (no Ray, no pydantic), so exported models load anywhere torch does.
"""
from .heads import ResidualHead
from .io import load_converter, load_head, save_converter, save_head
from .losses import distill_loss, standardize
from .registry import (create_converter, get_converter_fn, is_converter, list_converters,
                       register_converter)
from .targets import ALL_SPECS, STUDENT, TEACHERS, TargetSpec

__all__ = ["create_converter", "get_converter_fn", "is_converter", "list_converters",
           "register_converter", "TargetSpec", "STUDENT", "TEACHERS", "ALL_SPECS", "ResidualHead",
           "save_converter", "load_converter", "save_head", "load_head", "distill_loss", "standardize"]
