"""State-space duality scan (Mamba-2 SSD): fused Triton kernel when available, pure torch otherwise.

Same calling convention as ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined``::

    x:   (B, L, H, P)   input, H heads of width P
    dt:  (B, L, H)      step size (before ``dt_bias`` / softplus)
    A:   (H,)           one real decay rate per head (negative for a stable scan)
    B,C: (B, L, G, N)   input-dependent state projections, G groups (G | H)
    D:   (H,) or (H, P) skip connection, optional;  z: (B, L, H, P) gate, optional: out *= silu(z)
    returns out (B, L, H, P) in x's dtype, plus the last state (B, H, P, N) when asked.

Recurrence per (batch, head h, channel p, state n), with the group g of head h::

    s_t = exp(dt_t A) s_{t-1} + dt_t x_t B_t ;   y_t = <C_t, s_t> + D x_t

A scalar decay per head (Mamba-2) instead of one per (channel, state) (Mamba-1, ``selective_scan``)
makes the scan a masked matrix product inside chunks of ``chunk_size`` positions plus a small
recurrence over chunk states: matmuls instead of a (B, D, N, L) state tensor, so the pure-torch
path runs at matmul speed on a GPU, and FlopCounterMode counts its arithmetic (its matmuls).

``ssd_scan_fn`` dispatches (the backend switch of ``selective_scan``: ``TOKCONV_FUSED``,
``use_backend``); ``ssd_scan_ref`` is the chunked pure-torch scan; ``ssd_scan_naive`` the literal
sequential recurrence the tests compare both against.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .selective_scan import backend

__all__ = ["HAS_FUSED_SSD", "ssd_scan_fn", "ssd_scan_naive", "ssd_scan_ref"]

CHUNK = 64


def _load_fused():
    if not torch.cuda.is_available():
        return None
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as fn
    except Exception:  # noqa: BLE001 -- missing package / Triton / ABI mismatch: fall back
        return None
    return fn


_fused_fn = _load_fused()
HAS_FUSED_SSD = _fused_fn is not None


def ssd_scan_fn(x, dt, A, B, C, chunk_size: int = CHUNK, D=None, z=None, dt_bias=None,
                dt_softplus: bool = False, return_final_states: bool = False):
    """SSD scan; shapes in the module docstring. The fused kernel on CUDA when selected."""
    if _fused_fn is not None and backend() == "fused" and x.is_cuda:
        return _fused_fn(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                         return_final_states=return_final_states)
    return ssd_scan_ref(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                        return_final_states=return_final_states)


def _check(x, dt, A, B, C):
    if x.dim() != 4:
        raise ValueError(f"ssd scan: x must be (B, L, H, P), got {tuple(x.shape)}")
    b, length, h, _ = x.shape
    if dt.shape != (b, length, h):
        raise ValueError(f"ssd scan: dt must be (B={b}, L={length}, H={h}), got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"ssd scan: A must be (H={h},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, length) or C.shape != B.shape or h % B.shape[2]:
        raise ValueError(f"ssd scan: B and C must be (B={b}, L={length}, G, N) with G | {h}; "
                         f"got {tuple(B.shape)}, {tuple(C.shape)}")
    return b, length, h, x.shape[3], B.shape[2], B.shape[3]


def _dt(dt, dt_bias, dt_softplus):
    """dt in float32 math (float64 stays float64, for tests), biased and softplus'd as asked."""
    dt = dt.to(torch.promote_types(dt.dtype, torch.float32))
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    return F.softplus(dt) if dt_softplus else dt


def _finish(y, x, D, z):
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D).to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(x.dtype)


def ssd_scan_ref(x, dt, A, B, C, chunk_size: int = CHUNK, D=None, z=None, dt_bias=None,
                 dt_softplus: bool = False, return_final_states: bool = False):
    """Chunked pure-torch SSD; same signature and result as the fused kernel.

    In the chunk layout (B, G, H/G, n_chunks, Q, .) with Q = chunk_size: (1) inside each chunk
    y = (C B^T * exp(segment sums of dt A), lower triangle) @ (dt x); (2) each chunk's end state
    B^T @ (decay-to-end * dt x); (3) the states entering each chunk, one (n_chunks x n_chunks)
    lower-triangular decay matrix times the end states; (4) their read-out C @ state * decay.
    Decays are computed in float32 from cumulative sums (all exponents <= 0: no overflow);
    products run in x's dtype (bf16 under autocast or bf16 weights).
    """
    b, length, h, p, g, n = _check(x, dt, A, B, C)
    r, dtype = h // g, x.dtype
    dt = _dt(dt, dt_bias, dt_softplus)                                   # (b, L, h) fp32
    q = max(1, min(chunk_size, length))
    c = math.ceil(length / q)
    pad = c * q - length
    xs, Bs, Cs = x, B, C
    if pad:  # dt = 0 on the padding: no decay and no input, nothing changes before it
        xs, Bs, Cs = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    cum = (dt * A.to(dt.dtype)).view(b, c, q, g, r).permute(0, 3, 4, 1, 2).cumsum(-1)   # (b, g, r, c, q)
    xdt = (xs * dt[..., None].to(dtype)).view(b, c, q, g, r, p).permute(0, 3, 4, 1, 2, 5)
    Bc = Bs.view(b, c, q, g, n).permute(0, 3, 1, 2, 4).unsqueeze(2)     # (b, g, 1, c, q, n)
    Cc = Cs.view(b, c, q, g, n).permute(0, 3, 1, 2, 4).unsqueeze(2)
    tri = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    # (1) within chunks
    seg = (cum[..., :, None] - cum[..., None, :]).masked_fill(~tri, float("-inf"))
    y = ((Cc @ Bc.transpose(-1, -2)) * torch.exp(seg)).to(dtype) @ xdt   # (b, g, r, c, q, p)
    # (2) end state of each chunk from its own inputs
    to_end = torch.exp(cum[..., -1:] - cum).to(dtype)                   # (b, g, r, c, q)
    S = Bc.transpose(-1, -2) @ (xdt * to_end[..., None])                 # (b, g, r, c, n, p)
    # (3) state entering chunk k: sum_{j<k} exp(sum_{j<m<k} end_m) S_j
    end = cum[..., -1]                                                   # (b, g, r, c)
    ce = end.cumsum(-1)
    tri_c = torch.ones(c, c, dtype=torch.bool, device=x.device).tril(-1)
    seg_c = ((ce - end)[..., :, None] - ce[..., None, :]).masked_fill(~tri_c, float("-inf"))
    E = (torch.exp(seg_c).to(dtype) @ S.flatten(-2)).view(S.shape)      # (b, g, r, c, n, p)
    # (4) read-out of the entering states
    y = y + (Cc @ E) * torch.exp(cum).to(dtype)[..., None]
    y = y.permute(0, 3, 4, 1, 2, 5).reshape(b, c * q, h, p)[:, :length]
    out = _finish(y, x, D, z)
    if not return_final_states:
        return out
    last = S[..., -1, :, :] + torch.exp(end[..., -1]).to(dtype)[..., None, None] * E[..., -1, :, :]
    return out, last.reshape(b, h, n, p).transpose(-1, -2)               # (b, h, p, n)


def ssd_scan_naive(x, dt, A, B, C, chunk_size: int = CHUNK, D=None, z=None, dt_bias=None,
                   dt_softplus: bool = False, return_final_states: bool = False):
    """The literal sequential recurrence (a Python loop over L). Slow; for tests only."""
    b, length, h, p, g, n = _check(x, dt, A, B, C)
    dt = _dt(dt, dt_bias, dt_softplus).to(x.dtype)
    Bh, Ch = (M.repeat_interleave(h // g, dim=2) for M in (B, C))      # (b, L, h, n)
    s = x.new_zeros(b, h, p, n)
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A.to(x.dtype))[..., None, None]    # (b, h, 1, 1)
        s = decay * s + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((s * Ch[:, t, :, None, :]).sum(-1))
    out = _finish(torch.stack(ys, dim=1), x, D, z)
    return (out, s) if return_final_states else out
