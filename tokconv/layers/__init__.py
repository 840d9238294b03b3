"""Small shared blocks: coordinate queries, grid resampling, attention, MLP/GLU, projections, conv."""
from .attention import AttentionBlock, CrossAttention
from .conv import DSConv3dBlock
from .coords import CoordQueries, FourierFeatures, grid_coords
from .mlp import DropPath, GluMlp, Mlp, ResidualMlp, SwiGLU
from .projection import LowRankLinear, make_projection
from .resample import resample_tokens, tokens_to_volume, volume_to_tokens

__all__ = [
           "AttentionBlock",
           "CoordQueries",
           "CrossAttention",
           "DSConv3dBlock",
           "DropPath",
           "FourierFeatures",
           "GluMlp",
           "LowRankLinear",
           "Mlp",
           "ResidualMlp",
           "SwiGLU",
           "grid_coords",
           "make_projection",
           "resample_tokens",
           "tokens_to_volume",
           "volume_to_tokens",
]
