"""Converter designs; importing this package registers every preset."""
from .base import Converter, build_preset, count_params, param_budget  # noqa: F401
from . import baseline, convmix, perceiver, tokenlearner  # noqa: F401,E402
from . import ssm  # noqa: F401,E402
