"""Design D: TokenLearner selection of K token summaries + query cross-attention decode.

    x (B, Ns, Ds) -> LayerNorm -> in_proj (Ds -> d, low rank with ``rank``)
      + student coord embedding                                         (B, Ns, d)
      -> selection MLP (d -> hidden -> K), softmax over the Ns tokens  w: (B, K, Ns)
      -> summaries z = w^T h                                            (B, K, d)
      -> depth x self-attention over the summaries                      (B, K, d)
      -> decode: queries = coordinate queries of the target grid + target embedding
         + local (Linear of the student tokens, resampled to the target grid) cross-attend
         to the summaries, at width ``d_dec`` (default d)               (B, Nt, d_dec)
      -> per-target output affine                                       (B, Nt, Dt)

With ``skip`` (the presets) a shared full-width linear map of the normalised student is
resampled to each target grid and added to the output (as in perceiver.py); ``skip_rank`` and
``shared_decode`` as there (query_decode.py).
The normalised entropy of each summary's selection weights over the student tokens is recorded
as the "selection" regulariser (low entropy = each summary picks few tokens).
"""
from __future__ import annotations

import torch
from torch import nn

from ..deficiency import selection_penalty
from ..layers import AttentionBlock, CoordQueries, Mlp, make_projection
from ..registry import register_converter
from ..targets import STUDENT, TargetSpec
from .base import Converter, build_preset, param_budget
from .query_decode import QueryDecodeMixin


class TokenLearnerConverter(QueryDecodeMixin, Converter):
    def __init__(self, *, student: TargetSpec, targets: dict[str, TargetSpec],
                 rank: int | None = None, mask_ratio: float = 0.0, dim: int = 384,
                 num_tokens: int = 256, select_hidden: int = 256, depth: int = 1,
                 heads: int = 6, mlp_ratio: float = 2.0, d_dec: int | None = None,
                 dec_heads: int | None = None, dec_mlp_ratio: float = 1.0,
                 query_hidden: int = 256, pos_hidden: int = 128, drop_path: float = 0.0,
                 skip: bool = False, skip_rank: int | None = None,
                 shared_decode: bool = False):
        super().__init__(student=student, targets=targets, rank=rank, mask_ratio=mask_ratio)
        self.in_norm = nn.LayerNorm(student.dim)
        self.in_proj = make_projection(student.dim, dim, rank=rank)
        self.in_pos = CoordQueries(dim=dim, hidden=pos_hidden, global_query=False)
        self.select_norm = nn.LayerNorm(dim)
        self.select = Mlp(dim, select_hidden, num_tokens)
        self.blocks = nn.ModuleList([
            AttentionBlock(dim=dim, num_heads=heads, mlp_ratio=mlp_ratio, drop_path=drop_path)
            for _ in range(depth)])
        d_dec = d_dec or dim
        self.local = nn.Linear(dim, d_dec)
        self.queries = CoordQueries(dim=d_dec, hidden=query_hidden)
        self.decoder = AttentionBlock(dim=d_dec, kv_dim=dim, num_heads=dec_heads or heads,
                                      mlp_ratio=dec_mlp_ratio)
        self.init_decode(d_dec=d_dec, rank=rank, skip=skip, skip_rank=skip_rank,
                         shared_decode=shared_decode)

    def selection_weights(self, h: torch.Tensor) -> torch.Tensor:
        """(B, Ns, d) embedded tokens -> (B, K, Ns) weights, softmax over the tokens."""
        # softmax on the last axis: over axis 1 of (B, Ns, K), CUDA's strided "spatial" softmax
        # kernel was 40% of tokenlearner's forward on an H200
        return self.select(self.select_norm(h)).transpose(1, 2).softmax(dim=-1)

    def encode(self, x: torch.Tensor):
        """-> decode_state(summaries (B, K, d), local (B, Ns, d_dec), xn (B, Ns, Ds))."""
        xn = self.in_norm(x)
        h = self.in_proj(xn) + self.in_pos(self.student.grid)   # (B, Ns, d)
        w = self.selection_weights(h)                                         # (B, K, Ns)
        self.add_regulariser("selection", selection_penalty(w, "entropy", dim=-1))
        z = w @ h                                                             # (B, K, d)
        for blk in self.blocks:
            z = blk(z)
        return self.decode_state(z, self.local(h), xn)


@register_converter
@param_budget(3.0e6, 4.0e6)
def tokenlearner_base(*, student: TargetSpec = STUDENT, targets=None, **kwargs) -> Converter:
    """~3.8M params: K=256 summaries of width 384, one summary self-attention block, decode
    width 256, the output skip."""
    return build_preset(TokenLearnerConverter, "tokenlearner_base", student=student,
                        targets=targets, defaults={"dim": 384, "num_tokens": 256, "depth": 1,
                                                   "d_dec": 256, "dec_heads": 4, "skip": True},
                        overrides=kwargs)


@register_converter
@param_budget(1.5e6, 2.5e6)
def tokenlearner_small(*, student: TargetSpec = STUDENT, targets=None, **kwargs) -> Converter:
    """~2.3M params: K=128 summaries of width 256, one summary self-attention block, decode
    width 160, the output skip."""
    return build_preset(TokenLearnerConverter, "tokenlearner_small", student=student,
                        targets=targets, defaults={"dim": 256, "num_tokens": 128, "depth": 1,
                                                   "heads": 4, "select_hidden": 128, "d_dec": 160,
                                                   "dec_heads": 4, "skip": True},
                        overrides=kwargs)
