"""gMLP block with separable spatial gating on a token grid (design B's token mixing).

(B, T*H*W, dim) on a fixed ``grid`` -> same shape::

    u, v = split(GELU(fc1(norm(x))))                      (B, N, hidden) each
    v    = norm(v);  gate = b + M_t v + M_hw v              M_t (T x T) over frames, M_hw (HW x HW)
                                                            over each frame's tokens, b (N, 1)
    x    = x + fc2(u * gate)

The spatial gating unit of gMLP (Liu et al. 2021), its token-mixing matrix made separable over
time and space (channel-shared, like gMLP's): the depthwise-separable idea (token mixing apart
from channel mixing) as two small matmuls on the token layout. On an H200, cuDNN's grouped 3D
convolution was 15% of convmix's time and the interpolation kernel most of the rest
(issue 18). M_t and M_hw start at zero and b at one, so a fresh block is a plain GELU FFN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mlp import DropPath
from .resample import separable_mix


class SpatialGatingBlock(nn.Module):
    def __init__(self, *, dim: int, hidden: int, grid: tuple[int, int, int], drop_path: float = 0.0):
        super().__init__()
        t, h, w = grid
        self.grid = tuple(grid)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.gate_norm = nn.LayerNorm(hidden)
        self.mix_t = nn.Parameter(torch.zeros(t, t))
        self.mix_hw = nn.Parameter(torch.zeros(h * w, h * w))
        self.gate_bias = nn.Parameter(torch.ones(t * h * w, 1))
        self.fc2 = nn.Linear(hidden, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def gate(self, v: torch.Tensor) -> torch.Tensor:
        """(B, N, hidden) -> b + M_t v + M_hw v (B, N, hidden)."""
        mixed = separable_mix(v, self.grid, self.mix_t, None) + separable_mix(v, self.grid, None, self.mix_hw)
        return mixed + self.gate_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = F.gelu(self.fc1(self.norm(x))).chunk(2, dim=-1)
        return x + self.drop_path(self.fc2(u * self.gate(self.gate_norm(v))))
