"""Query decoding of a memory (latents, token summaries) for designs A and D.

Each target token's query is the coordinate query of its place on the decode grid (+ a target
embedding) + the student's local features resampled to that place, and it cross-attends to the
trunk's memory (Perceiver IO's content-carrying output queries). Then the per-target output
affine, plus (``skip``) a full-width linear map of the normalised student, resampled (added
because A and D lost TimeSformer to the floor's full-rank map, issue 18; whether it helps:
bench/RESULTS.md).

* decode grid: the target's own grid, or with ``shared_decode`` (T', H, W) with
  T' = min(T, student T): targets that differ only in frame count (VideoMAE (8,14,14),
  TimeSformer (16,14,14)) then share one decoder pass and one output affine's input, and only
  the output is resampled in time. The student has 8 token frames, so TimeSformer's 16 are
  interpolated either way; this decodes 1569 queries per clip instead of 4705.
* ``skip_rank``: the skip as Ds -> r -> Dt (not a deficiency term: no nuclear norm).

Two output paths with the same values (mamba's ``_fn`` / ``_ref`` habit; ``fused`` picks):
``output_ref``: affine(decoder) + resample(skip(x)), each a GEMM and an add over (B, Nt, Dt);
``output_fn``: one GEMM over [LayerNorm(decoder), resample(s)] with the weights concatenated,
where s is the skip's rank-r factor of x, or x itself when no decode grid of that width has more
tokens than the student (resampling commutes with a linear map: interpolation weights sum to
one); otherwise the full map at the student grid is computed once and shared.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import GridResample, LowRankLinear, make_projection
from ..targets import TargetSpec


def decode_grid(student_grid, grid, shared: bool):
    """The grid a target is decoded on: its own, or (shared) with at most the student's frames."""
    if grid is None or not shared:
        return grid
    return (min(grid[0], student_grid[0]), *grid[1:])


def skip_projections(student_dim: int, targets: dict[str, TargetSpec], rank: int | None,
                     enabled: bool, skip_rank: int | None = None) -> nn.ModuleDict | None:
    """The output skip: Ds -> Dt per distinct target width; low rank with the deficiency
    ``rank`` (penalised) or ``skip_rank`` (a cheaper map, not penalised), the smaller of both."""
    if not enabled:
        return None
    if skip_rank is not None and skip_rank < 1:
        raise ValueError(f"skip_rank must be >= 1 or None, got {skip_rank}")
    maps = {}
    for d in sorted({s.dim for s in targets.values()}):
        if skip_rank is not None and (rank is None or skip_rank < rank):
            maps[str(d)] = LowRankLinear(student_dim, d, rank=min(skip_rank, student_dim, d),
                                         deficiency=False)
        else:
            maps[str(d)] = make_projection(student_dim, d, rank=rank)
    return nn.ModuleDict(maps)


def _mm_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``t`` runs in (autocast's, when it is on)."""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


class QueryDecodeMixin:
    """``decode`` for A and D. Subclasses call ``init_decode`` and return ``decode_state(memory,
    local, xn)`` from ``encode``: memory (B, M, d_mem), local (B, Ns, d_dec), xn the normalised
    student (B, Ns, Ds). Needs ``queries`` (CoordQueries) and ``decoder`` (cross-attention)."""

    fused = True   # output_fn (True) or output_ref: same values, tests compare them

    def init_decode(self, *, d_dec: int, rank: int | None, skip: bool, skip_rank: int | None,
                    shared_decode: bool) -> None:
        from .base import target_embeddings, target_outputs
        sgrid = self.student.grid
        self.shared_decode = shared_decode
        self.decode_grids = {n: decode_grid(sgrid, s.grid, shared_decode)
                             for n, s in self.targets.items()}
        # shared passes have no target identity before the output affine
        self.target_embed = None if shared_decode else target_embeddings(d_dec, self.targets)
        self.to_decode = (nn.ModuleDict({n: GridResample(sgrid, g)
                                         for n, g in self.decode_grids.items()})
                          if shared_decode else self.resample)
        self.from_decode = nn.ModuleDict({n: GridResample(g, self.targets[n].grid)
                                          for n, g in self.decode_grids.items() if g is not None})
        self.out = target_outputs(d_dec, self.targets)
        self.skip = skip_projections(self.student.dim, self.targets, rank, skip, skip_rank)
        # a full-rank skip is fused (x resampled, one GEMM) only where no target of its width
        # decodes more tokens than the student: there the map at the student grid is shared
        ns = self.student.tokens
        self.fuse_full = {str(d): all(g is None or g[0] * g[1] * g[2] <= ns
                                      for n, g in self.decode_grids.items()
                                      if self.targets[n].dim == d)
                          for d in {s.dim for s in self.targets.values()}}

    def decode_state(self, memory: torch.Tensor, local: torch.Tensor, xn: torch.Tensor):
        """The trunk state decode reads; its dict caches what targets share within a forward."""
        return memory, local, (xn if self.skip is not None else None), {}

    def decode(self, state, name: str) -> torch.Tensor:
        memory, local, xn, cache = state
        grid = self.decode_grids[name]
        key = ("dec", grid) if self.shared_decode else ("dec", name)
        if key not in cache:
            q = self.queries(grid)
            if self.target_embed is not None:
                q = q + self.target_embed[name]
            cache[key] = self.decoder(q + self.to_decode[name](local), memory)  # (B, Nd, d_dec)
        output = self.output_fn if self.fused else self.output_ref
        out = output(name, cache[key], xn, cache)                            # (B, Nd, Dt)
        return out if grid is None else self.from_decode[name](out)           # (B, Nt, Dt)

    def output_ref(self, name: str, dec: torch.Tensor, xn, cache) -> torch.Tensor:
        """affine(dec) (+ the skip map of xn, resampled to the decode grid)."""
        out = self.out[name](dec)
        if xn is None:
            return out
        width = str(self.targets[name].dim)
        if ("map", width) not in cache:                                         # (B, Ns, Dt)
            cache[("map", width)] = self.skip[width](xn)
        return out + self.to_decode[name](cache[("map", width)])

    def output_fn(self, name: str, dec: torch.Tensor, xn, cache) -> torch.Tensor:
        """``output_ref`` as one GEMM over [LayerNorm(dec), resampled skip input]."""
        head = self.out[name]
        if xn is None:
            return head(dec)
        width, grid = str(self.targets[name].dim), self.decode_grids[name]
        proj = self.skip[width]
        factored = isinstance(proj, LowRankLinear)
        if not factored and not self.fuse_full[width]:
            return self.output_ref(name, dec, xn, cache)
        key = ("skip", width if factored else "x", grid)
        if key not in cache:
            src = xn
            if factored:
                if ("down", width) not in cache:
                    cache[("down", width)] = proj.down(xn)                     # (B, Ns, r)
                src = cache[("down", width)]
            cache[key] = self.to_decode[name](src)                              # (B, Nd, r or Ds)
        w_skip, b_skip = (proj.up.weight, proj.up.bias) if factored else (proj.weight, proj.bias)
        dt = _mm_dtype(dec)
        h = torch.cat([head.norm(dec).to(dt), cache[key].to(dt)], dim=-1)
        weight = torch.cat([head.proj.weight, w_skip], dim=1)
        bias = head.proj.bias if b_skip is None else head.proj.bias + b_skip
        return F.linear(h, weight, bias)
