"""Residual classification head.

logits = main(pooled converted features) + residual(pooled student features)

* main: per target mean-pool over tokens and LayerNorm, concatenate (sum of target widths) in
  sorted target-name order, MLP -> num_classes;
* residual: mean-pooled student tokens, LayerNorm, MLP -> num_classes. It sees what the
  converters' representation deficiency (low rank, masking, contraction) removed and
  compensates for it.
Shapes: student (B, Ns, Ds), converted {name: (B, Nt, Dt)} -> logits (B, num_classes).

The concatenation order is the sorted names, not ``target_dims``' dict order: the head is a
function of its set of targets, so a config saved as JSON with sorted keys (tokconv.io) or
compared order-insensitively (a warm start) rebuilds the same head.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import Mlp


class ResidualHead(nn.Module):
    def __init__(self, *, student_dim: int, target_dims: dict[str, int], num_classes: int,
                 hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        if not target_dims:
            raise ValueError("ResidualHead: target_dims is empty")
        if num_classes < 1:
            raise ValueError(f"ResidualHead: num_classes must be >= 1, got {num_classes}")
        self.target_names = sorted(target_dims)
        self.config = {"student_dim": int(student_dim),
                       "target_dims": {k: int(v) for k, v in target_dims.items()},
                       "num_classes": int(num_classes), "hidden": int(hidden),
                       "dropout": float(dropout)}
        self.target_norms = nn.ModuleDict({n: nn.LayerNorm(target_dims[n])
                                           for n in self.target_names})
        self.main = Mlp(sum(target_dims.values()), hidden, num_classes, drop=dropout)
        self.student_norm = nn.LayerNorm(student_dim)
        self.residual = Mlp(student_dim, hidden, num_classes, drop=dropout)

    def pooled(self, converted: dict[str, torch.Tensor]) -> torch.Tensor:
        """{name: (B, Nt, Dt)} -> (B, sum Dt): token-mean, per-target LayerNorm, concatenated."""
        missing = [n for n in self.target_names if n not in converted]
        if missing:
            raise KeyError(f"ResidualHead: converted features lack targets {missing}")
        return torch.cat([self.target_norms[n](converted[n].mean(dim=1))
                          for n in self.target_names], dim=-1)

    def forward(self, student: torch.Tensor, converted: dict[str, torch.Tensor]) -> torch.Tensor:
        if student.dim() != 3 or student.shape[-1] != self.config["student_dim"]:
            raise ValueError(f"ResidualHead: student must be (B, N, {self.config['student_dim']}), "
                             f"got {tuple(student.shape)}")
        main = self.main(self.pooled(converted))
        return main + self.residual(self.student_norm(student.mean(dim=1)))
