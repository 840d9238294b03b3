"""Input projections, full rank or factorised low rank (``W = U V^T``).

The low-rank form is the representation-deficiency bottleneck: the map from student width to
converter width has matrix rank <= ``rank`` by construction."""
from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """y = x V U^T + b with V: (in, rank), U: (out, rank); (..., in) -> (..., out).

    ``weight`` gives the dense (out, in) product for inspection and the nuclear-norm penalty;
    ``deficiency=False`` marks a factorisation kept for cost only (converters leave it out of
    the nuclear-norm term)."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, bias: bool = True,
                 deficiency: bool = True):
        super().__init__()
        self.deficiency = deficiency
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"LowRankLinear: rank {rank} must be in "
                             f"[1, min({in_features}, {out_features})]")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)   # V^T
        self.up = nn.Linear(rank, out_features, bias=bias)     # U
        # Keep the product's scale close to a dense nn.Linear of the same shape.
        nn.init.orthogonal_(self.down.weight)
        nn.init.normal_(self.up.weight, std=(1.0 / (3 * rank)) ** 0.5)

    @property
    def weight(self) -> torch.Tensor:
        return self.up.weight @ self.down.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def make_projection(in_features: int, out_features: int, *, rank: int | None = None,
                    bias: bool = True) -> nn.Module:
    """nn.Linear, or LowRankLinear when ``rank`` is given."""
    if rank is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return LowRankLinear(in_features, out_features, rank=rank, bias=bias)
