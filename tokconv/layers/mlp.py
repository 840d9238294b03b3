"""MLP blocks: timm's ``Mlp``/``GluMlp``/``SwiGLU``/``DropPath`` plus a pre-norm residual wrapper.

Shapes: every block maps (..., dim) -> (..., dim) (or ``out_features``)."""
from __future__ import annotations

import torch
from timm.layers import DropPath, GluMlp, Mlp, SwiGLU
from torch import nn

__all__ = ["DropPath", "GluMlp", "Mlp", "ResidualMlp", "SwiGLU"]


class ResidualMlp(nn.Module):
    """x + drop_path(mlp(norm(x))), (B, N, dim) -> (B, N, dim).

    ``glu=True`` uses a GELU-gated GLU (gMLP/GEGLU style, ``hidden`` counts both halves)."""

    def __init__(self, *, dim: int, hidden: int, glu: bool = False, drop: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        if glu:
            self.mlp = GluMlp(dim, hidden, dim, act_layer=nn.GELU, drop=drop)
        else:
            self.mlp = Mlp(dim, hidden, dim, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm(x)))
