"""Compact multi-head attention blocks on ``F.scaled_dot_product_attention``.

Shapes: queries (B, Nq, dim), keys/values (B, Nk, kv_dim) -> (B, Nq, dim). Queries may also be
given without batch, (Nq, dim), and are broadcast (coordinate-generated queries are shared by
the batch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mlp import DropPath, Mlp


class CrossAttention(nn.Module):
    """Multi-head attention of ``q`` over ``kv`` (self-attention when they are the same tensor),
    on SDPA's fused kernels; ``weights(q, kv)`` gives the attention weights explicitly."""

    def __init__(self, *, dim: int, kv_dim: int | None = None, num_heads: int = 8,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CrossAttention: dim {dim} is not divisible by num_heads {num_heads}")
        kv_dim = kv_dim or dim
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(kv_dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, q: torch.Tensor, kv: torch.Tensor):
        b, nk, _ = kv.shape
        if q.dim() == 2:
            q = q.unsqueeze(0).expand(b, -1, -1)
        h, hd = self.num_heads, self.head_dim
        qh = self.q(q).reshape(b, q.shape[1], h, hd).transpose(1, 2)          # (B, h, Nq, hd)
        k, v = self.kv(kv).reshape(b, nk, 2, h, hd).permute(2, 0, 3, 1, 4)  # 2 x (B, h, Nk, hd)
        return qh, k, v

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        qh, k, v = self._heads(q, kv)
        out = F.scaled_dot_product_attention(qh, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        b, h, nq, hd = out.shape
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, nq, h * hd)))

    def weights(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Head-averaged attention weights (B, Nq, Nk) of ``q`` over ``kv`` (explicit softmax:
        for selection/entropy regularisers; ``forward`` never materialises them)."""
        qh, k, _ = self._heads(q, kv)
        return ((qh * self.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)


class AttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x), norm_kv(kv)); x + mlp(norm(x)).

    With ``kv_dim=None`` and ``forward(x)`` (no kv) it is a self-attention block.
    (B, Nq, dim), (B, Nk, kv_dim) -> (B, Nq, dim). ``mlp_ratio=0`` drops the MLP."""

    def __init__(self, *, dim: int, kv_dim: int | None = None, num_heads: int = 8,
                 mlp_ratio: float = 2.0, qkv_bias: bool = True, drop: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.is_cross = kv_dim is not None
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(kv_dim) if self.is_cross else None
        self.attn = CrossAttention(dim=dim, kv_dim=kv_dim, num_heads=num_heads, qkv_bias=qkv_bias,
                                   proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        hidden = int(dim * mlp_ratio)
        self.norm_mlp = nn.LayerNorm(dim) if hidden else None
        self.mlp = Mlp(dim, hidden, dim, drop=drop) if hidden else None

    def _normed(self, x: torch.Tensor, kv: torch.Tensor | None):
        if self.is_cross:
            if kv is None:
                raise ValueError("AttentionBlock: a cross-attention block needs kv")
            return self.norm_q(x), self.norm_kv(kv)
        q = self.norm_q(x)
        return q, q

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
        q, kv = self._normed(x, kv)
        res = self.attn(q, kv)
        if x.dim() == 2:  # broadcast batch-less queries to the batch of kv
            x = x.unsqueeze(0).expand(kv.shape[0], -1, -1)
        x = x + self.drop_path(res)
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm_mlp(x)))
        return x

    def attention_weights(self, x: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Nq, Nk) head-averaged weights of this block's attention (see CrossAttention.weights)."""
        return self.attn.weights(*self._normed(x, kv))
