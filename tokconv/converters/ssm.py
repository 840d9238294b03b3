"""Design C: bidirectional selective-SSM (Mamba-style) resampler.

    x (B, Ns, Ds) -> LayerNorm -> in_proj (Ds -> d, low rank with ``rank``)
      + coordinate embedding of the student grid                         (B, Ns, d)
      -> depth x BiMambaBlock over the tokens in (T, H, W) raster order  (B, Ns, d)
         (in_proj -> causal depthwise conv1d -> x_proj -> dt/B/C -> selective scan, run on the
          sequence and on its reverse, each gated by silu(z), averaged -> out_proj, residual)
      -> decode per target:
         grid target:   trilinear resample to the target grid (3D, not over the flat sequence)
                        + coordinate embedding + target embedding -> depthwise 3D conv refine
         global target: attention pooling over the tokens + global query + target embedding
      -> per-target output affine (LayerNorm + Linear to spec.dim)       (B, Nt, Dt)

The scan is ``tokconv.ops.selective_scan_fn``: mamba_ssm's fused kernel on CUDA when it imports,
the chunked pure-torch reference otherwise. Linear in sequence length, unlike attention.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import (
    CoordQueries,
    make_projection,
    resample_tokens,
    tokens_to_volume,
    volume_to_tokens,
)
from ..ops import selective_scan_fn
from ..registry import register_converter
from ..targets import STUDENT, TargetSpec
from .base import Converter, build_preset, param_budget, target_embeddings, target_outputs


class SelectiveSSM(nn.Module):
    """Parameters and input path of one scan direction of a Mamba mixer (Gu & Dao 2023,
    ``mamba_simple.Mamba`` layout): causal depthwise conv1d, x_proj -> (dt, B, C), dt_proj,
    A (S4D-real init), D. ``scan_inputs(x)`` returns what ``selective_scan_fn`` takes."""

    def __init__(self, *, dim: int, d_state: int = 16, d_conv: int = 4, dt_rank: int | None = None,
                 dt_min: float = 1e-3, dt_max: float = 0.1):
        super().__init__()
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.d_state = d_state
        self.conv1d = nn.Conv1d(dim, dim, d_conv, groups=dim, padding=d_conv - 1)
        self.x_proj = nn.Linear(dim, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, dim, bias=True)
        # mamba's init: dt log-uniform in [dt_min, dt_max] through softplus^-1 in the bias
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(dim) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real init: A = -(1..N) per channel, kept as log for positivity
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(dim, 1))
        self.D = nn.Parameter(torch.ones(dim))

    def scan_inputs(self, x: torch.Tensor):
        """x (B, E, L) -> u, delta (B, E, L); A (E, N) fp32; B, C (B, N, L); D, delta_bias (E,) fp32."""
        length = x.shape[-1]
        u = F.silu(self.conv1d(x)[..., :length])                            # causal: drop the tail
        dbc = self.x_proj(u.transpose(1, 2))                                # (B, L, R + 2N)
        dt, Bm, Cm = torch.split(dbc, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight).transpose(1, 2)          # (B, E, L); bias in scan
        return (u, delta, -torch.exp(self.A_log.float()), Bm.transpose(1, 2), Cm.transpose(1, 2),
                self.D.float(), self.dt_proj.bias.float())


class BiMambaBlock(nn.Module):
    """Pre-norm residual bidirectional Mamba block (Vision-Mamba style: shared in/out projections,
    one conv/x_proj/dt/A/D set per direction). (B, L, dim) -> (B, L, dim).

    Both directions run as ONE selective scan over 2E channels with two B/C groups (the
    reversed sequence is just other channels), halving kernel launches and Python steps."""

    def __init__(self, *, dim: int, expand: int = 1, d_state: int = 16, d_conv: int = 4,
                 dt_rank: int | None = None):
        super().__init__()
        inner = expand * dim
        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        ssm = {"dim": inner, "d_state": d_state, "d_conv": d_conv, "dt_rank": dt_rank}
        self.fwd, self.bwd = SelectiveSSM(**ssm), SelectiveSSM(**ssm)
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(self.norm(x)).transpose(1, 2)                    # (B, 2E, L)
        u, z = xz.chunk(2, dim=1)
        f = self.fwd.scan_inputs(u)
        b = self.bwd.scan_inputs(u.flip(-1))                                # the reversed sequence
        cat = lambda i, d=1: torch.cat([f[i], b[i]], dim=d).contiguous()
        y = selective_scan_fn(cat(0), cat(1), cat(2, 0), torch.stack([f[3], b[3]], 1).contiguous(),
                              torch.stack([f[4], b[4]], 1).contiguous(), cat(5, 0),
                              z=torch.cat([z, z.flip(-1)], 1).contiguous(), delta_bias=cat(6, 0),
                              delta_softplus=True)                          # (B, 2E, L)
        y_f, y_b = y.chunk(2, dim=1)
        return x + self.out_proj((0.5 * (y_f + y_b.flip(-1))).transpose(1, 2))


class GridRefine(nn.Module):
    """x + depthwise 3D conv(norm(x)) on a token grid: local smoothing after resampling.
    (B, T*H*W, dim) -> same."""

    def __init__(self, *, dim: int, kernel_size: int = 3):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv3d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        return x + volume_to_tokens(self.conv(tokens_to_volume(self.norm(x), grid)))


class SSMConverter(Converter):
    def __init__(self, *, student: TargetSpec, targets: dict[str, TargetSpec],
                 rank: int | None = None, mask_ratio: float = 0.0, dim: int = 384,
                 depth: int = 2, d_state: int = 16, expand: int = 1, d_conv: int = 4,
                 query_hidden: int = 128):
        super().__init__(student=student, targets=targets, rank=rank, mask_ratio=mask_ratio)
        has_global = any(s.grid is None for s in self.targets.values())
        has_grid = any(s.grid is not None for s in self.targets.values())
        self.in_norm = nn.LayerNorm(student.dim)
        self.in_proj = make_projection(student.dim, dim, rank=rank)
        # one coordinate embedding for the student and every target grid: same normalised space
        self.pos = CoordQueries(dim=dim, hidden=query_hidden, global_query=has_global)
        self.blocks = nn.ModuleList([BiMambaBlock(dim=dim, expand=expand, d_state=d_state, d_conv=d_conv)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.target_embed = target_embeddings(dim, self.targets)
        self.refine = GridRefine(dim=dim) if has_grid else None
        self.pool_score = nn.Linear(dim, 1) if has_global else None  # attention pooling
        self.out = target_outputs(dim, self.targets)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.in_proj(self.in_norm(x)) + self.pos(self.student.grid)     # (B, Ns, d)
        for blk in self.blocks:
            h = blk(h)
        return self.norm(h)

    def decode(self, h: torch.Tensor, name: str) -> torch.Tensor:
        grid = self.targets[name].grid
        if grid is None:
            w = self.pool_score(h).softmax(dim=1)                            # (B, Ns, 1)
            t = (w * h).sum(dim=1, keepdim=True)                             # (B, 1, d)
        else:
            t = resample_tokens(h, self.student.grid, grid)                  # (B, Nt, d)
        t = t + self.pos(grid) + self.target_embed[name]
        if grid is not None:
            t = self.refine(t, grid)
        return self.out[name](t)                                             # (B, Nt, Dt)


@register_converter
@param_budget(2.1e6, 2.5e6)
def ssm_base(*, student: TargetSpec = STUDENT, targets=None, **kwargs) -> Converter:
    """~2.4M params: width 384, 2 bidirectional Mamba blocks (d_state 16, expand 1)."""
    return build_preset(SSMConverter, "ssm_base", student=student, targets=targets,
                        defaults={"dim": 384, "depth": 2, "d_state": 16, "expand": 1, "query_hidden": 96},
                       overrides=kwargs)


@register_converter
@param_budget(1.0e6, 1.8e6)
def ssm_small(*, student: TargetSpec = STUDENT, targets=None, **kwargs) -> Converter:
    """~1.4M params: width 256, 2 bidirectional Mamba blocks (d_state 8)."""
    return build_preset(SSMConverter, "ssm_small", student=student, targets=targets,
                        defaults={"dim": 256, "depth": 2, "d_state": 8, "expand": 1}, overrides=kwargs)
