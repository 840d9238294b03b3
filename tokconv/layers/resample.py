"""Grid-aware (3D) resampling of token sequences.

A sequence (B, N, D) laid out on a (T, H, W) grid is resampled in 3D, so neighbouring rows and
frames never mix the way a 1D interpolation over the flattened sequence would. Token order is
(t, h, w) everywhere (``N = T*H*W``, index ``t*H*W + h*W + w``).

Two implementations with the same signature (mamba's ``_fn`` / ``_ref`` habit):

* ``resample_tokens_ref``: ``F.interpolate(trilinear, align_corners=False)`` on the (B, D, T, H, W)
  volume. On an H200 its ``upsample_trilinear3d`` kernel was 99.7% of the floor's CUDA time.
* ``resample_tokens_fn`` (what ``resample_tokens`` is): the same linear map as two small matmuls
  on the token layout itself, no transposes: a (H'W' x HW) matrix over each frame's tokens, then
  a (T' x T) matrix over frames. The matrices are F.interpolate's own 1D weights (it is run once
  on an identity matrix), Kronecker-combined for (H, W), and cached per grid pair / device /
  dtype. Trilinear interpolation is separable, so the result equals the reference up to rounding.

``separable_mix`` applies any such (T) and (HW) matrices; learned token mixing (convmix's spatial
gating) uses it too. ``GridResample`` is the module form converters hold: its matrices are
buffers, so they follow ``.to(device / dtype)`` and are constants to ``torch.jit.trace`` (the
export's TorchScript), with no cache lookup inside the graph.
"""
from __future__ import annotations

from math import prod

import torch
import torch.nn.functional as F
from torch import nn

_MATRICES: dict[tuple, tuple[torch.Tensor | None, torch.Tensor | None]] = {}


def tokens_to_volume(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """(B, T*H*W, D) -> (B, D, T, H, W)."""
    b, n, d = x.shape
    if grid is None or prod(grid) != n:
        raise ValueError(f"tokens_to_volume: {n} tokens do not fill grid {grid!r}")
    return x.transpose(1, 2).reshape(b, d, *grid)


def volume_to_tokens(v: torch.Tensor) -> torch.Tensor:
    """(B, D, T, H, W) -> (B, T*H*W, D)."""
    return v.flatten(2).transpose(1, 2)


def axis_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float64 weights of 1D linear interpolation, align_corners=False: exactly
    F.interpolate's (it is applied to the identity)."""
    eye = torch.eye(n_in, dtype=torch.float64).unsqueeze(1)                   # (n_in, 1, n_in)
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0].T.contiguous()


def interp_matrices(src_grid, dst_grid, *, device=None, dtype=torch.float32):
    """(M_t (T' x T) or None, M_hw (H'W' x HW) or None) for src -> dst; None where an axis (pair)
    keeps its size. Cached (as normal tensors even when first asked for under inference_mode, so
    a later autograd pass can use them)."""
    key = (tuple(src_grid), tuple(dst_grid), str(device), dtype)
    if key not in _MATRICES:
        with torch.inference_mode(False):
            _MATRICES[key] = _build_matrices(src_grid, dst_grid, device, dtype)
    return _MATRICES[key]


def _build_matrices(src_grid, dst_grid, device, dtype):
    (t, h, w), (t2, h2, w2) = src_grid, dst_grid
    m_t = axis_matrix(t, t2) if t != t2 else None
    m_hw = torch.kron(axis_matrix(h, h2), axis_matrix(w, w2)) if (h, w) != (h2, w2) else None
    return tuple(None if m is None else m.to(device=device, dtype=dtype) for m in (m_t, m_hw))


def left_matmul(m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(P, Q) @ (N, Q, F) -> (N, P, F) as one batched GEMM whose first operand has batch stride 0.
    ``torch.matmul`` would copy: ``m`` expanded to (N, P, Q), or ``y`` transposed when ``m``
    requires grad (its fold-for-backward rule)."""
    return torch.bmm(m.expand(y.shape[0], *m.shape), y)


def separable_mix(x: torch.Tensor, grid: tuple[int, int, int], m_t: torch.Tensor | None,
                  m_hw: torch.Tensor | None) -> torch.Tensor:
    """Apply a (T' x T) matrix over frames and a (H'W' x HW) matrix over each frame's tokens
    (None: leave that axis alone), (B, T*H*W, D) -> (B, T'*H'*W', D). The cheaper order is used
    (the order does not change the result: the two maps act on different axes)."""
    b, n, d = x.shape
    t, h, w = grid
    if t * h * w != n:
        raise ValueError(f"separable_mix: {n} tokens do not fill grid {grid!r}")
    hw2 = m_hw.shape[0] if m_hw is not None else h * w
    t2 = m_t.shape[0] if m_t is not None else t

    def space(y, frames):
        return y if m_hw is None else left_matmul(m_hw, y.reshape(b * frames, h * w, d))

    def time(y, per_frame):
        return y if m_t is None else left_matmul(m_t, y.reshape(b, t, per_frame * d))

    if t2 * h * w <= t * hw2:   # time first makes the smaller intermediate
        y = space(time(x, h * w).reshape(b * t2, h * w, d), t2)
    else:
        y = time(space(x, t).reshape(b, t, hw2 * d), hw2)
    return y.reshape(b, t2 * hw2, d)


def _trivial(x, src_grid, dst_grid):
    """The cases both implementations share: global pooling / identity (or None)."""
    if src_grid is None:
        if dst_grid is None and x.shape[1] == 1:   # global -> global
            return x
        raise ValueError("resample_tokens: a global source (grid=None) cannot be resampled "
                         f"to {dst_grid!r}")
    if x.shape[1] != prod(src_grid):
        raise ValueError(f"resample_tokens: {x.shape[1]} tokens do not fill grid {src_grid!r}")
    if dst_grid is None:
        return x.mean(dim=1, keepdim=True)
    if tuple(dst_grid) == tuple(src_grid):
        return x
    return None


def resample_tokens_fn(x: torch.Tensor, src_grid: tuple[int, int, int] | None,
                       dst_grid: tuple[int, int, int] | None) -> torch.Tensor:
    """Resample (B, prod(src_grid), D) onto ``dst_grid`` -> (B, prod(dst_grid), D): trilinear,
    align_corners=False, as two matmuls. ``dst_grid=None`` (a global target) mean-pools to
    (B, 1, D); identical grids (and global to global) return ``x``."""
    out = _trivial(x, src_grid, dst_grid)
    if out is not None:
        return out
    m_t, m_hw = interp_matrices(src_grid, dst_grid, device=x.device, dtype=x.dtype)
    return separable_mix(x, src_grid, m_t, m_hw)


def resample_tokens_ref(x: torch.Tensor, src_grid: tuple[int, int, int] | None,
                        dst_grid: tuple[int, int, int] | None) -> torch.Tensor:
    """``resample_tokens_fn`` through F.interpolate on the 5D volume (the reference)."""
    out = _trivial(x, src_grid, dst_grid)
    if out is not None:
        return out
    v = F.interpolate(tokens_to_volume(x, src_grid), size=tuple(dst_grid), mode="trilinear",
                      align_corners=False)
    return volume_to_tokens(v)


resample_tokens = resample_tokens_fn


class GridResample(nn.Module):
    """``resample_tokens_fn(x, src, dst)`` with the matrices as non-persistent buffers (not in the
    state dict). (B, prod(src), D) -> (B, prod(dst) or 1, D)."""

    def __init__(self, src: tuple[int, int, int], dst: tuple[int, int, int] | None):
        super().__init__()
        self.src, self.dst = tuple(src), (None if dst is None else tuple(dst))
        same = self.dst is None or self.dst == self.src
        # device None: where tensors are made now (CPU, or meta for a shapes-only build)
        m_t, m_hw = ((None, None) if same
                     else _build_matrices(self.src, self.dst, None, torch.float32))
        self.register_buffer("m_t", m_t, persistent=False)
        self.register_buffer("m_hw", m_hw, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _trivial(x, self.src, self.dst)
        if out is not None:
            return out
        cast = lambda m: None if m is None else m.to(x.dtype)
        return separable_mix(x, self.src, cast(self.m_t), cast(self.m_hw))

    def extra_repr(self) -> str:
        return f"{self.src} -> {self.dst}"
