"""tokconv: small converters that map student video tokens into teacher token layouts.

Pure torch (no Ray, no pydantic), so exported models load anywhere torch does.
"""
from .registry import create_converter, is_converter, list_converters, register_converter
from .targets import ALL_SPECS, STUDENT, TEACHERS, TargetSpec

__all__ = ["create_converter", "is_converter", "list_converters", "register_converter",
           "TargetSpec", "STUDENT", "TEACHERS", "ALL_SPECS"]
