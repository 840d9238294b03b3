"""Coordinate-generated queries.

Every grid (student or target) is mapped into the same normalised 3D space: cell centres of a
(T, H, W) grid at ``(i + 0.5) / n * 2 - 1`` per axis (the ``align_corners=False`` convention of
``F.interpolate``), so a target token and the student tokens it overlaps get nearby
coordinates whatever the grid sizes. Queries are generated from these coordinates (Fourier
features -> small MLP), never learned one per token; a single learned query stands for a global
(``grid=None``) target.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .mlp import Mlp


def grid_coords(grid: tuple[int, int, int], *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised cell-centre coordinates of ``grid`` -> (T*H*W, 3) in (-1, 1), ordered (t, h, w)
    like a token sequence flattened from (T, H, W)."""
    if grid is None or len(grid) != 3:
        raise ValueError(f"grid must be (T, H, W), got {grid!r}")
    axes = [(torch.arange(n, device=device, dtype=dtype) + 0.5) / n * 2 - 1 for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


class FourierFeatures(nn.Module):
    """Fixed (non-learned) Fourier features of 3D coordinates.

    (N, 3) -> (N, 3 + 6 * num_bands): the raw coordinates plus sin/cos at ``num_bands``
    frequencies spaced linearly from 1 to ``max_freq / 2`` cycles over the [-1, 1] span
    (Perceiver-style; ``max_freq`` should cover the finest grid, e.g. 2 * 16)."""

    def __init__(self, *, num_bands: int = 16, max_freq: float = 32.0):
        super().__init__()
        self.num_bands = num_bands
        freqs = torch.linspace(1.0, max_freq / 2, num_bands) * math.pi
        self.register_buffer("freqs", freqs, persistent=False)

    @property
    def out_dim(self) -> int:
        return 3 + 6 * self.num_bands

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        ang = coords.unsqueeze(-1) * self.freqs.to(coords.dtype)      # (N, 3, bands)
        feats = torch.cat([ang.sin(), ang.cos()], dim=-1).flatten(-2)  # (N, 6 * bands)
        return torch.cat([coords, feats], dim=-1)


class CoordQueries(nn.Module):
    """Queries for a token layout generated from its coordinates.

    ``forward(grid)`` -> (T*H*W, dim) for a grid, or (1, dim) (one learned global query) for
    ``grid=None``. Shared by all targets: the queries of two targets differ only through their
    grids (a caller adds a per-target embedding when it needs target identity).
    """

    def __init__(self, *, dim: int, hidden: int = 256, num_bands: int = 16, max_freq: float = 32.0,
                 global_query: bool = True):
        super().__init__()
        self.fourier = FourierFeatures(num_bands=num_bands, max_freq=max_freq)
        self.mlp = Mlp(self.fourier.out_dim, hidden, dim)
        # Off for grids that are never global (e.g. the student's), so no parameter goes unused.
        self.global_query = nn.Parameter(torch.randn(1, dim) * 0.02) if global_query else None

    def forward(self, grid: tuple[int, int, int] | None) -> torch.Tensor:
        if grid is None:
            if self.global_query is None:
                raise ValueError("CoordQueries was built without a global query "
                                 "(global_query=False)")
            return self.global_query
        w = self.mlp.fc1.weight
        return self.mlp(self.fourier(grid_coords(grid, device=w.device, dtype=w.dtype)))
