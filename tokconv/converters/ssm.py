"""Design C: bidirectional selective-SSM resampler (Mamba-2 SSD mixer by default, Mamba-1 optional).

    x (B, Ns, Ds) -> LayerNorm -> in_proj (Ds -> d, low rank with ``rank``)
      + coordinate embedding of the student grid                         (B, Ns, d)
      -> depth x bidirectional SSM block over the tokens in (T, H, W) raster order   (B, Ns, d)
         mixer "ssd" (default, ``BiSSDBlock``): Mamba-2 -- in_proj -> x, z, dt, B/C per direction
           -> SSD scan (scalar decay per head) of the sequence and of its reverse in ONE scan
           (the reversed sequence is other heads) -> average -> gate silu(z) -> norm -> out_proj
         mixer "s6" (``BiMambaBlock``): Mamba-1 -- causal conv1d, per-(channel, state) decay
      -> decode per target:
         grid target:   trilinear resample to the target grid (3D, not over the flat sequence)
         global target: attention pooling over the tokens
         + coordinate embedding + target embedding -> depth_out x GLU MLP per token
      -> per-target output affine (LayerNorm + Linear to spec.dim)       (B, Nt, Dt)

The SSD scan is ``tokconv.ops.ssd_scan_fn`` (mamba_ssm's Triton kernel when it imports, else the
chunked pure-torch scan: matmuls, so it runs at matmul speed); the S6 scan is
``tokconv.ops.selective_scan_fn`` (mamba_ssm's CUDA kernel, else a reference whose (B, D, N, L)
state made ssm_* cost 40-80% of the student's forward on an H200; issue 18). Both are linear in
sequence length, unlike attention.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import CoordQueries, ResidualMlp, make_projection
from ..ops import selective_scan_fn, ssd_scan_fn
from ..registry import register_converter
from ..targets import STUDENT, TargetSpec
from .base import Converter, build_preset, param_budget, target_embeddings, target_outputs


def _dt_bias(n: int, dt_min: float, dt_max: float) -> torch.Tensor:
    """mamba's init: dt log-uniform in [dt_min, dt_max], stored through softplus^-1."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))


class BiSSDBlock(nn.Module):
    """Pre-norm residual bidirectional Mamba-2 mixer (B, L, dim) -> (B, L, dim).

    One shared input path (x, z), per direction its own B/C (one group each), dt, A, D; both
    directions run as one SSD scan over 2H heads, the backward heads on the reversed sequence.
    No causal conv1d (the scan and the coordinate embedding carry position)."""

    def __init__(self, *, dim: int, expand: int = 1, d_state: int = 16, headdim: int = 64,
                 chunk_size: int = 32, dt_min: float = 1e-3, dt_max: float = 0.1):
        super().__init__()
        inner = expand * dim
        if inner % headdim:
            raise ValueError(f"BiSSDBlock: inner width {inner} is not divisible by headdim {headdim}")
        self.inner, self.d_state, self.heads, self.headdim = inner, d_state, inner // headdim, headdim
        self.chunk_size = chunk_size
        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, 2 * inner + 4 * d_state + 2 * self.heads, bias=False)
        self.dt_bias = nn.Parameter(_dt_bias(2 * self.heads, dt_min, dt_max))
        self.A_log = nn.Parameter(torch.log(torch.empty(2 * self.heads).uniform_(1, 16)))  # mamba-2 init
        self.D = nn.Parameter(torch.ones(2 * self.heads))
        self.out_norm = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        e, n, h, p = self.inner, self.d_state, self.heads, self.headdim
        z, u, bc, dt = torch.split(self.in_proj(self.norm(x)), [e, e, 4 * n, 2 * h], dim=-1)
        u = u.reshape(b, length, h, p)
        rev = lambda t: t.flip(1)
        B_f, C_f, B_b, C_b = bc.chunk(4, dim=-1)
        y = ssd_scan_fn(torch.cat([u, rev(u)], dim=2),                                # (b, L, 2h, p)
                        torch.cat([dt[..., :h], rev(dt[..., h:])], dim=-1),
                        -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32))),
                        torch.stack([B_f, rev(B_b)], dim=2), torch.stack([C_f, rev(C_b)], dim=2),
                        self.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True)
        y = 0.5 * (y[:, :, :h] + rev(y[:, :, h:])).reshape(b, length, e)
        return x + self.out_proj(self.out_norm(y * F.silu(z)))


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
        with torch.no_grad():
            self.dt_proj.bias.copy_(_dt_bias(dim, dt_min, dt_max))
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


class SSMConverter(Converter):
    def __init__(self, *, student: TargetSpec, targets: dict[str, TargetSpec],
                 rank: int | None = None, mask_ratio: float = 0.0, dim: int = 384,
                 depth: int = 2, mixer: str = "ssd", d_state: int = 16, expand: int = 1,
                 headdim: int = 64, d_conv: int = 4, depth_out: int = 0, out_hidden: int = 768,
                 query_hidden: int = 128):
        super().__init__(student=student, targets=targets, rank=rank, mask_ratio=mask_ratio)
        if mixer not in ("ssd", "s6"):
            raise ValueError(f"SSMConverter: mixer must be 'ssd' or 's6', got {mixer!r}")
        has_global = any(s.grid is None for s in self.targets.values())
        self.in_norm = nn.LayerNorm(student.dim)
        self.in_proj = make_projection(student.dim, dim, rank=rank)
        # one coordinate embedding for the student and every target grid: same normalised space
        self.pos = CoordQueries(dim=dim, hidden=query_hidden, global_query=has_global)
        block = (lambda: BiSSDBlock(dim=dim, expand=expand, d_state=d_state, headdim=headdim)) \
            if mixer == "ssd" else (lambda: BiMambaBlock(dim=dim, expand=expand, d_state=d_state, d_conv=d_conv))
        self.blocks = nn.ModuleList([block() for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.target_embed = target_embeddings(dim, self.targets)
        self.pool_score = nn.Linear(dim, 1) if has_global else None  # attention pooling
        self.blocks_out = nn.ModuleList([ResidualMlp(dim=dim, hidden=out_hidden, glu=True)
                                         for _ in range(depth_out)])
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
            t = self.resample[name](h)                                        # (B, Nt, d)
        t = t + self.pos(grid) + self.target_embed[name]
        for blk in self.blocks_out:
            t = blk(t)
        return self.out[name](t)                                             # (B, Nt, Dt)


@register_converter
@param_budget(2.1e6, 2.5e6)
def ssm_base(*, student: TargetSpec = STUDENT, targets=None, **kwargs) -> Converter:
    """~2.3M params: width 384, 2 bidirectional Mamba-2 blocks (6 heads of 64 a direction, d_state 16)."""
    return build_preset(SSMConverter, "ssm_base", student=student, targets=targets,
                        defaults={"dim": 384, "depth": 2, "d_state": 16, "expand": 1, "query_hidden": 128},
                        overrides=kwargs)


@register_converter
@param_budget(1.0e6, 1.8e6)
def ssm_small(*, student: TargetSpec = STUDENT, targets=None, **kwargs) -> Converter:
    """~1.3M params: width 256, 2 bidirectional Mamba-2 blocks (4 heads of 64 a direction, d_state 16)."""
    return build_preset(SSMConverter, "ssm_small", student=student, targets=targets,
                        defaults={"dim": 256, "depth": 2, "d_state": 16, "expand": 1}, overrides=kwargs)
