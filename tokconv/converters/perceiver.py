"""Design A: latent cross-attention resampler (Perceiver-IO style).

    x (B, Ns, Ds) -> LayerNorm -> in_proj (Ds -> d_lat, low rank with ``rank``)
      + student coord embedding                                            (B, Ns, d_lat)
      -> encode: n_lat learned latents cross-attend to the tokens        (B, n_lat, d_lat)
      -> depth x latent self-attention                                     (B, n_lat, d_lat)
      -> decode: queries = coordinate queries of the target grid + target embedding
         + local (Linear d_lat -> d_dec of the student tokens, resampled to the target grid)
         cross-attend to the latents                                       (B, Nt, d_dec)
      -> per-target output affine (+ skip: resampled Linear Ds -> Dt of x)  (B, Nt, Dt)

The output length is set by the number of queries only, so one trunk serves 1568, 3136 and 1
tokens. The latents carry global context; the local term of each query carries what the
student says at that place (Perceiver IO builds its optical-flow queries from the input features
the same way): with position-only queries every output token had to be rebuilt from 256
latents, and held-out fidelity fell far below the floor (issue 18).
With ``skip`` (the presets) a shared full-width linear map of the normalised student
(Ds -> Dt, per target width) is resampled to each target grid and added to the output;
``skip_rank`` and ``shared_decode`` make the decode cheaper (query_decode.py).
In training the encode attention weights (latents over student tokens) of the first
``SELECTION_CLIPS`` clips are computed explicitly and their normalised entropy is recorded as the
"selection" regulariser (an estimate of the batch mean; the outputs always use SDPA's kernels).
"""
from __future__ import annotations

import torch
from torch import nn

from ..deficiency import selection_penalty
from ..layers import AttentionBlock, CoordQueries, make_projection
from ..registry import register_converter
from ..targets import STUDENT, TargetSpec
from .base import Converter, build_preset, param_budget
from .query_decode import QueryDecodeMixin

SELECTION_CLIPS = 2  # clips whose encode attention weights estimate the selection regulariser


class PerceiverConverter(QueryDecodeMixin, Converter):
    def __init__(self, *, student: TargetSpec, targets: dict[str, TargetSpec],
                 rank: int | None = None, mask_ratio: float = 0.0, n_lat: int = 256,
                 d_lat: int = 384, d_dec: int = 256, depth: int = 1, heads: int = 6,
                 dec_heads: int = 4, mlp_ratio: float = 2.0, query_hidden: int = 256,
                 pos_hidden: int = 128, drop_path: float = 0.0, track_attention: bool = True,
                 skip: bool = False, skip_rank: int | None = None,
                 shared_decode: bool = False):
        super().__init__(student=student, targets=targets, rank=rank, mask_ratio=mask_ratio)
        self.track_attention = track_attention
        self.in_norm = nn.LayerNorm(student.dim)
        self.in_proj = make_projection(student.dim, d_lat, rank=rank)
        self.in_pos = CoordQueries(dim=d_lat, hidden=pos_hidden, global_query=False)
        self.latents = nn.Parameter(torch.randn(n_lat, d_lat) * 0.02)
        self.encoder = AttentionBlock(dim=d_lat, kv_dim=d_lat, num_heads=heads, mlp_ratio=mlp_ratio)
        self.blocks = nn.ModuleList([
            AttentionBlock(dim=d_lat, num_heads=heads, mlp_ratio=mlp_ratio, drop_path=drop_path)
            for _ in range(depth)])
        self.local = nn.Linear(d_lat, d_dec)
        self.queries = CoordQueries(dim=d_dec, hidden=query_hidden)
        self.decoder = AttentionBlock(dim=d_dec, kv_dim=d_lat, num_heads=dec_heads,
                                      mlp_ratio=mlp_ratio)
        self.init_decode(d_dec=d_dec, rank=rank, skip=skip, skip_rank=skip_rank,
                         shared_decode=shared_decode)

    def encode(self, x: torch.Tensor):
        """-> decode_state(latents (B, n_lat, d_lat), local (B, Ns, d_dec), xn (B, Ns, Ds))."""
        xn = self.in_norm(x)
        h = self.in_proj(xn) + self.in_pos(self.student.grid)              # (B, Ns, d_lat)
        lat = self.encoder(self.latents, h)
        if self.training and self.track_attention:
            w = self.encoder.attention_weights(self.latents, h[:SELECTION_CLIPS])  # (k, n_lat, Ns)
            self.add_regulariser("selection", selection_penalty(w, "entropy"))
        for blk in self.blocks:
            lat = blk(lat)
        return self.decode_state(lat, self.local(h), xn)


@register_converter
@param_budget(3.6e6, 4.5e6)
def perceiver_base(*, student: TargetSpec = STUDENT, targets=None, **kwargs) -> Converter:
    """~4.0M params: 256 latents x 384, one latent self-attention block (MLP ratio 1), decode
    width 192, the output skip."""
    return build_preset(PerceiverConverter, "perceiver_base", student=student, targets=targets,
                        defaults={"n_lat": 256, "d_lat": 384, "d_dec": 192, "depth": 1,
                                  "mlp_ratio": 1.0, "skip": True}, overrides=kwargs)


@register_converter
@param_budget(1.8e6, 3.0e6)
def perceiver_small(*, student: TargetSpec = STUDENT, targets=None, **kwargs) -> Converter:
    """~2.7M params: 128 latents x 256, one latent self-attention block, decode width 128, the
    output skip."""
    return build_preset(PerceiverConverter, "perceiver_small", student=student, targets=targets,
                        defaults={"n_lat": 128, "d_lat": 256, "d_dec": 128, "depth": 1, "heads": 4,
                                  "dec_heads": 4, "skip": True}, overrides=kwargs)
