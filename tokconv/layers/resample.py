"""Grid-aware (3D) resampling of token sequences.

A sequence (B, N, D) laid out on a (T, H, W) grid is reshaped to a volume (B, D, T, H, W),
resampled with trilinear interpolation and flattened back, so neighbouring rows and frames
never mix the way a 1D interpolation over the flattened sequence would. Token order is
(t, h, w) everywhere (``N = T*H*W``, index ``t*H*W + h*W + w``).
"""
from __future__ import annotations

from math import prod

import torch
import torch.nn.functional as F


def tokens_to_volume(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """(B, T*H*W, D) -> (B, D, T, H, W)."""
    b, n, d = x.shape
    if grid is None or prod(grid) != n:
        raise ValueError(f"tokens_to_volume: {n} tokens do not fill grid {grid!r}")
    return x.transpose(1, 2).reshape(b, d, *grid)


def volume_to_tokens(v: torch.Tensor) -> torch.Tensor:
    """(B, D, T, H, W) -> (B, T*H*W, D)."""
    return v.flatten(2).transpose(1, 2)


def resample_tokens(x: torch.Tensor, src_grid: tuple[int, int, int],
                    dst_grid: tuple[int, int, int] | None, *, mode: str = "trilinear") -> torch.Tensor:
    """Resample (B, prod(src_grid), D) onto ``dst_grid`` -> (B, prod(dst_grid), D).

    ``dst_grid=None`` (a global target) mean-pools to (B, 1, D). Identical grids (and global to
    global) return ``x``.
    Both grids span the same normalised space (``align_corners=False``)."""
    if src_grid is None:
        if dst_grid is None and x.shape[1] == 1:   # global -> global
            return x
        raise ValueError(f"resample_tokens: a global source (grid=None) cannot be resampled to {dst_grid!r}")
    if dst_grid is None:
        if x.shape[1] != prod(src_grid):
            raise ValueError(f"resample_tokens: {x.shape[1]} tokens do not fill grid {src_grid!r}")
        return x.mean(dim=1, keepdim=True)
    if tuple(dst_grid) == tuple(src_grid):
        return x
    v = tokens_to_volume(x, src_grid)
    kw = {"align_corners": False} if mode in ("trilinear",) else {}
    return volume_to_tokens(F.interpolate(v, size=tuple(dst_grid), mode=mode, **kw))
