"""Dtype names as configs and the feature store spell them ("float16", ...), one table for all.

``TORCH_DTYPES[name]`` is the torch dtype; ``RAW_NUMPY_DTYPES[name]`` the numpy dtype that holds a
tensor's raw bytes (numpy has no bfloat16: its bytes are held as uint16 and viewed in torch).
"""
from __future__ import annotations

import numpy as np
import torch

TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
RAW_NUMPY_DTYPES = {
    "float16": np.float16,
    "bfloat16": np.uint16,
    "float32": np.float32,
    "float64": np.float64,
}

