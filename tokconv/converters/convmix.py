"""Design B: 1x1 projection + grid resampling + depthwise-separable 3D convs + GLU (gMLP style).

    x (B, Ns, Ds) -> LayerNorm -> in_proj (Ds -> d, low rank with ``rank``)
      -> depth_in x DSConv3dBlock on the student grid                    (B, Ns, d)
      -> trilinear resample to the target grid (mean pool for a global target)
         + coordinate embedding of the target grid + target embedding    (B, Nt, d)
      -> depth_out x DSConv3dBlock on the target grid (shared by all targets)
      -> per-target output affine                                         (B, Nt, Dt)

All mixing is convolutional/linear: cheap and fast. The coordinate embedding tells the shared
refinement blocks where (and for which target) each resampled token sits.
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers import CoordQueries, DSConv3dBlock, make_projection, resample_tokens
from ..registry import register_converter
from ..targets import STUDENT, TargetSpec
from .base import Converter, build_preset, param_budget, target_embeddings, target_outputs


class ConvMixConverter(Converter):
    def __init__(self, *, student: TargetSpec, targets: dict[str, TargetSpec],
                 rank: int | None = None, mask_ratio: float = 0.0, dim: int = 384,
                 depth_in: int = 2, depth_out: int = 2, kernel_size=3, mlp_hidden: int = 1024,
                 query_hidden: int = 128, drop_path: float = 0.0):
        super().__init__(student=student, targets=targets, rank=rank, mask_ratio=mask_ratio)
        self.in_norm = nn.LayerNorm(student.dim)
        self.in_proj = make_projection(student.dim, dim, rank=rank)
        blk = {"dim": dim, "kernel_size": kernel_size, "mlp_hidden": mlp_hidden, "drop_path": drop_path}
        self.blocks_in = nn.ModuleList([DSConv3dBlock(**blk) for _ in range(depth_in)])
        self.pos = CoordQueries(dim=dim, hidden=query_hidden)
        self.target_embed = target_embeddings(dim, self.targets)
        self.blocks_out = nn.ModuleList([DSConv3dBlock(**blk) for _ in range(depth_out)])
        self.out = target_outputs(dim, self.targets)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.in_proj(self.in_norm(x))                                   # (B, Ns, d)
        for blk in self.blocks_in:
            h = blk(h, self.student.grid)
        return h

    def decode(self, h: torch.Tensor, name: str) -> torch.Tensor:
        grid = self.targets[name].grid
        h = resample_tokens(h, self.student.grid, grid)                      # (B, Nt, d)
        h = h + self.pos(grid) + self.target_embed[name]
        for blk in self.blocks_out:
            h = blk(h, grid or (1, 1, 1))
        return self.out[name](h)                                            # (B, Nt, Dt)


@register_converter
@param_budget(3.3e6, 4.2e6)
def convmix_base(*, student: TargetSpec = STUDENT, targets=None, **kwargs) -> Converter:
    """~3.75M params: width 384, 2 + 2 DS-conv/GLU blocks (3x3x3 depthwise, GLU hidden 1024)."""
    return build_preset(ConvMixConverter, "convmix_base", student=student, targets=targets,
                        defaults={"dim": 384, "depth_in": 2, "depth_out": 2, "mlp_hidden": 1024},
                        overrides=kwargs)


@register_converter
@param_budget(1.5e6, 2.5e6)
def convmix_small(*, student: TargetSpec = STUDENT, targets=None, **kwargs) -> Converter:
    """~2.0M params: width 256, 2 + 1 DS-conv/GLU blocks."""
    return build_preset(ConvMixConverter, "convmix_small", student=student, targets=targets,
                        defaults={"dim": 256, "depth_in": 2, "depth_out": 1, "mlp_hidden": 768},
                        overrides=kwargs)
