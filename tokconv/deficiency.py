"""Representation-deficiency regularisers (controlled information loss in the converter).

* low-rank bottleneck: ``LowRankLinear`` (W = U V^T, rank r) + ``nuclear_norm`` penalty;
* token masking of the student input: ``mask_tokens``; sparsity of selection/attention
  weights: ``selection_penalty`` (entropy or L1);
* Jacobian contraction: ``jacobian_penalty`` (Hutchinson estimate of E_v ||J v||^2);
* ``WarmupSchedule``: every weight ramps from small to large over a number of steps.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .layers.projection import LowRankLinear, make_projection

__all__ = [
    "LowRankLinear",
    "WarmupSchedule",
    "jacobian_penalty",
    "make_projection",
    "mask_tokens",
    "nuclear_norm",
    "selection_penalty",
]


def nuclear_norm(w: torch.Tensor | nn.Module) -> torch.Tensor:
    """Sum of singular values of a weight (out, in), an ``nn.Linear`` or a ``LowRankLinear``.

    For ``LowRankLinear`` (W = U V^T) it is computed from the r x r core of the QR factors
    (||U V^T||_* = ||R_U R_V^T||_*), never forming or decomposing the dense matrix. Always in
    float32 or wider, autocast off: QR/SVD have no bfloat16 kernels (an H200 run under bf16
    autocast failed in svd_cuda_gesvdj)."""
    if isinstance(w, nn.Linear):
        w = w.weight
    if not isinstance(w, LowRankLinear | torch.Tensor) or (isinstance(w, torch.Tensor) and w.dim() != 2):
        raise TypeError(f"nuclear_norm: expected a 2D weight, nn.Linear or LowRankLinear, got {type(w)}")
    ref = w.up.weight if isinstance(w, LowRankLinear) else w
    wide = lambda t: t.to(torch.promote_types(t.dtype, torch.float32))
    with torch.autocast(ref.device.type, enabled=False):
        if isinstance(w, LowRankLinear):
            _, ru = torch.linalg.qr(wide(w.up.weight))           # U: (out, r)
            _, rv = torch.linalg.qr(wide(w.down.weight).t())     # V: (in, r)
            return torch.linalg.svdvals(ru @ rv.t()).sum()
        return torch.linalg.svdvals(wide(w)).sum()


def mask_tokens(x: torch.Tensor, ratio: float, generator: torch.Generator | None = None):
    """Zero a random ``round(ratio * N)`` tokens of each sample.

    x: (B, N, D) -> (x_masked (B, N, D), mask (B, N) bool, True = masked). The grid layout is
    kept (tokens are zeroed, not dropped) so grid-aware converters still see a full volume."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask_tokens: ratio must be in [0, 1), got {ratio}")
    b, n, _ = x.shape
    n_mask = round(ratio * n)
    mask = torch.zeros(b, n, dtype=torch.bool, device=x.device)
    if n_mask == 0:
        return x, mask
    noise = torch.rand(b, n, generator=generator, device=x.device if generator is None else generator.device)
    idx = noise.to(x.device).argsort(dim=1)[:, :n_mask]
    mask.scatter_(1, idx, True)
    return x.masked_fill(mask.unsqueeze(-1), 0.0), mask


def selection_penalty(weights: torch.Tensor, kind: str = "entropy", dim: int = -1) -> torch.Tensor:
    """Sparsity penalty on selection/attention weights (any shape; ``dim`` is the normalised axis).

    ``entropy``: mean Shannon entropy along ``dim`` divided by log(size), in [0, 1] (0 = one-hot)
    -- the right choice for softmax weights. ``l1``: mean |w| -- for unnormalised (e.g. sigmoid)
    gates; it is constant for weights that sum to one."""
    if kind == "entropy":
        n = weights.shape[dim]
        if n < 2:
            return weights.new_zeros(())
        p = weights.clamp_min(0)
        ent = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=dim)
        return ent.mean() / math.log(n)
    if kind == "l1":
        return weights.abs().mean()
    raise ValueError(f"selection_penalty: kind must be 'entropy' or 'l1', got {kind!r}")


def _flat(y) -> torch.Tensor:
    """A tensor or a dict/list of (B, ...) tensors -> (B, total)."""
    if isinstance(y, torch.Tensor):
        return y.flatten(1)
    leaves = y.values() if isinstance(y, dict) else y
    return torch.cat([t.flatten(1) for t in leaves], dim=1)


def jacobian_penalty(fn: Callable, x: torch.Tensor, n_probes: int = 1, *, method: str = "jvp",
                     normalize: bool = True) -> torch.Tensor:
    """Hutchinson estimate of E_v ||J v||^2 = ||J||_F^2 of ``fn`` at ``x`` (v ~ N(0, I)).

    fn: (B, ...) -> tensor or dict of (B, ...) tensors (per-sample Jacobians; samples must not
    interact, i.e. eval-style batch statistics). Returns a scalar, averaged over the batch and
    probes and, with ``normalize``, divided by the output size per sample. Differentiable w.r.t.
    the parameters of ``fn``.
    method: ``jvp`` (forward-mode, ``torch.func.jvp``) or ``vjp`` (E_u ||J^T u||^2, the same
    expectation, via double backward) for ops without forward-mode support. Attention runs on
    SDPA's math backend here: the fused kernels support neither forward AD nor double backward."""
    if n_probes < 1:
        raise ValueError(f"jacobian_penalty: n_probes must be >= 1, got {n_probes}")
    with sdpa_kernel([SDPBackend.MATH]):
        return _jacobian_penalty(fn, x, n_probes, method, normalize)


def _jacobian_penalty(fn, x, n_probes, method, normalize):
    total, n_out = x.new_zeros(()), None
    for _ in range(n_probes):
        if method == "jvp":
            v = torch.randn_like(x)
            y, jv = torch.func.jvp(fn, (x.detach(),), (v,))
            d = _flat(jv)
            n_out = _flat(y).shape[1]
        elif method == "vjp":
            xg = x.detach().requires_grad_(True)
            y = _flat(fn(xg))
            u = torch.randn_like(y)
            (d,) = torch.autograd.grad(y, xg, u, create_graph=True)
            d, n_out = d.flatten(1), y.shape[1]
        else:
            raise ValueError(f"jacobian_penalty: method must be 'jvp' or 'vjp', got {method!r}")
        total = total + d.pow(2).sum(dim=1).mean()
    total = total / n_probes
    return total / n_out if normalize else total


class WarmupSchedule:
    """Regulariser weight ramp: ``weight * (start + (1 - start) * min(1, step / warmup_steps))``.

    Starts at ``start * weight`` (default 0: small), reaches ``weight`` at ``warmup_steps`` and
    stays there; ``warmup_steps=0`` gives ``weight`` at once."""

    def __init__(self, weight: float, warmup_steps: int = 0, *, start: float = 0.0):
        if weight < 0 or warmup_steps < 0 or not 0.0 <= start <= 1.0:
            raise ValueError(f"WarmupSchedule: bad weight={weight}, warmup_steps={warmup_steps}, start={start}")
        self.weight, self.warmup_steps, self.start = float(weight), int(warmup_steps), float(start)

    def __call__(self, step: int) -> float:
        if self.warmup_steps == 0:
            return self.weight
        frac = min(1.0, max(0, step) / self.warmup_steps)
        return self.weight * (self.start + (1.0 - self.start) * frac)

    def __repr__(self) -> str:
        return f"WarmupSchedule(weight={self.weight}, warmup_steps={self.warmup_steps}, start={self.start})"
