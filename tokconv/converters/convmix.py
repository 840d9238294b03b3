"""Design B: 1x1 projection + gMLP blocks with separable spatial gating + grid resampling.

    x (B, Ns, Ds) -> LayerNorm -> in_proj (Ds -> d, low rank with ``rank``)
      -> depth_in x SpatialGatingBlock on the student grid               (B, Ns, d)
         (GELU FFN whose gate mixes tokens: a (T x T) matrix over frames + a (HW x HW) matrix over
          each frame's tokens, channel-shared; tokconv.layers.mixing)
      -> trilinear resample to the target grid (mean pool for a global target)
         + coordinate embedding of the target grid + target embedding    (B, Nt, d)
      -> depth_out x GLU MLP per token (shared by all targets)
      -> per-target output affine                                         (B, Nt, Dt)

All mixing is matmuls on the token layout (token mixing, channel mixing, the resampling
matrices): no convolution or interpolation kernel. The heavy blocks run on the student grid
once for all targets; the target grids only see per-token work.
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers import CoordQueries, ResidualMlp, SpatialGatingBlock, make_projection
from ..registry import register_converter
from ..targets import STUDENT, TargetSpec
from .base import Converter, build_preset, param_budget, target_embeddings, target_outputs


class ConvMixConverter(Converter):
    def __init__(self, *, student: TargetSpec, targets: dict[str, TargetSpec],
                 rank: int | None = None, mask_ratio: float = 0.0, dim: int = 384,
                 depth_in: int = 2, depth_out: int = 1, hidden: int = 768, out_hidden: int = 768,
                 query_hidden: int = 128, drop_path: float = 0.0):
        super().__init__(student=student, targets=targets, rank=rank, mask_ratio=mask_ratio)
        self.in_norm = nn.LayerNorm(student.dim)
        self.in_proj = make_projection(student.dim, dim, rank=rank)
        self.blocks_in = nn.ModuleList([
            SpatialGatingBlock(dim=dim, hidden=hidden, grid=student.grid, drop_path=drop_path)
            for _ in range(depth_in)])
        self.pos = CoordQueries(dim=dim, hidden=query_hidden,
                                global_query=any(s.grid is None for s in self.targets.values()))
        self.target_embed = target_embeddings(dim, self.targets)
        self.blocks_out = nn.ModuleList([ResidualMlp(dim=dim, hidden=out_hidden, glu=True, drop_path=drop_path)
                                         for _ in range(depth_out)])
        self.out = target_outputs(dim, self.targets)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.in_proj(self.in_norm(x))                                   # (B, Ns, d)
        for blk in self.blocks_in:
            h = blk(h)
        return h

    def decode(self, h: torch.Tensor, name: str) -> torch.Tensor:
        grid = self.targets[name].grid
        h = self.resample[name](h) + self.pos(grid) + self.target_embed[name]
        for blk in self.blocks_out:
            h = blk(h)
        return self.out[name](h)                                            # (B, Nt, Dt)


@register_converter
@param_budget(3.3e6, 4.2e6)
def convmix_base(*, student: TargetSpec = STUDENT, targets=None, **kwargs) -> Converter:
    """~3.7M params: width 384, 2 spatial-gating blocks (hidden 768) + 1 GLU block on the targets."""
    return build_preset(ConvMixConverter, "convmix_base", student=student, targets=targets,
                        defaults={"dim": 384, "depth_in": 2, "depth_out": 1, "hidden": 768,
                                  "out_hidden": 768}, overrides=kwargs)


@register_converter
@param_budget(1.5e6, 2.5e6)
def convmix_small(*, student: TargetSpec = STUDENT, targets=None, **kwargs) -> Converter:
    """~2.0M params: width 256, 2 spatial-gating blocks (hidden 512) + 1 GLU block on the targets."""
    return build_preset(ConvMixConverter, "convmix_small", student=student, targets=targets,
                        defaults={"dim": 256, "depth_in": 2, "depth_out": 1, "hidden": 512,
                                  "out_hidden": 512}, overrides=kwargs)
