"""Converter designs (listed in base.py's docstring); importing this package registers every
preset."""
from . import (  # noqa: F401
    baseline,
    convmix,
    perceiver,
    ssm,
    tokenlearner,
)
from .base import Converter, build_preset, count_params, param_budget  # noqa: F401
