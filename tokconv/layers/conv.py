"""Depthwise-separable 3D convolution block on token grids.

(B, T*H*W, dim) on ``grid`` -> same shape: x + dwconv3d(norm(x)), then x + GLU(norm(x)).
The depthwise conv mixes space-time neighbours per channel; the GLU (gMLP style, GELU gate)
mixes channels per token. Works on any grid size including (1, 1, 1)."""
from __future__ import annotations

import torch
from torch import nn

from .mlp import DropPath, GluMlp
from .resample import tokens_to_volume, volume_to_tokens


class DSConv3dBlock(nn.Module):
    def __init__(self, *, dim: int, kernel_size: tuple[int, int, int] | int = 3,
                 mlp_hidden: int | None = None, drop_path: float = 0.0):
        super().__init__()
        k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        if any(x % 2 == 0 for x in k):
            raise ValueError(f"DSConv3dBlock: kernel_size must be odd, got {k}")
        self.norm1 = nn.LayerNorm(dim)
        self.dwconv = nn.Conv3d(dim, dim, k, padding=tuple(x // 2 for x in k), groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.glu = GluMlp(dim, mlp_hidden or 2 * dim, dim, act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        y = volume_to_tokens(self.dwconv(tokens_to_volume(self.norm1(x), grid)))
        x = x + self.drop_path(y)
        return x + self.drop_path(self.glu(self.norm2(x)))
