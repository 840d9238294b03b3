"""Baseline: grid interpolation + per-target linear map (the floor every design must beat).

Per target: Linear(student.dim -> spec.dim) (low rank with ``rank``) and trilinear resampling
from the student grid to the target grid (mean pool for a global target). The two commute
(interpolation weights sum to one), so the map runs on the shorter side: resample first when
the target has fewer tokens (VideoMAE, ViViT), project first when it has more (TimeSformer).
(B, 2048, 1024) -> (B, 1568, 768) / (B, 3136, 768) / (B, 1, 768); 3 x 0.79M parameters.
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers import make_projection
from ..registry import register_converter
from ..targets import STUDENT, TargetSpec
from .base import Converter, build_preset, param_budget


class InterpLinearConverter(Converter):
    def __init__(self, *, student: TargetSpec, targets: dict[str, TargetSpec],
                 rank: int | None = None, mask_ratio: float = 0.0):
        super().__init__(student=student, targets=targets, rank=rank, mask_ratio=mask_ratio)
        self.proj = nn.ModuleDict({n: make_projection(student.dim, s.dim, rank=rank)
                                   for n, s in self.targets.items()})

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, x: torch.Tensor, name: str) -> torch.Tensor:
        spec, proj = self.targets[name], self.proj[name]
        if spec.tokens <= self.student.tokens:
            return proj(self.resample[name](x))
        return self.resample[name](proj(x))


@register_converter
@param_budget(2.0e6, 2.6e6)
def baseline_interp_linear(*, student: TargetSpec = STUDENT, targets=None, **kwargs) -> Converter:
    """~2.36M params: three Linear(1024 -> 768) + trilinear resampling."""
    return build_preset(InterpLinearConverter, "baseline_interp_linear", student=student,
                        targets=targets, defaults={}, overrides=kwargs)
