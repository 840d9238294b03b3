"""Small shared blocks: coordinate queries, grid resampling, attention, MLP/GLU, spatial gating,
projections."""
from .attention import AttentionBlock, CrossAttention
from .coords import CoordQueries, FourierFeatures, grid_coords
from .mixing import SpatialGatingBlock
from .mlp import DropPath, GluMlp, Mlp, ResidualMlp, SwiGLU
from .projection import LowRankLinear, make_projection
from .resample import (
    GridResample,
    interp_matrices,
    resample_tokens,
    resample_tokens_fn,
    resample_tokens_ref,
    separable_mix,
    tokens_to_volume,
    volume_to_tokens,
)

__all__ = [
    "AttentionBlock",
    "CoordQueries",
    "CrossAttention",
    "DropPath",
    "FourierFeatures",
    "GluMlp",
    "GridResample",
    "LowRankLinear",
    "Mlp",
    "ResidualMlp",
    "SpatialGatingBlock",
    "SwiGLU",
    "grid_coords",
    "interp_matrices",
    "make_projection",
    "resample_tokens",
    "resample_tokens_fn",
    "resample_tokens_ref",
    "separable_mix",
    "tokens_to_volume",
    "volume_to_tokens",
]
