"""Distillation losses on standardised teacher features.

Per target: ``w_cos * (1 - cos) + w_sl1 * smoothL1`` between the converter output and the
teacher tokens standardised with the per-target per-channel statistics of the feature store;
the converter therefore learns standardised teacher features. The total is the
``target_weights``-weighted sum (default 1.0 each).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _as_tensor(v, like: torch.Tensor) -> torch.Tensor:
    if isinstance(v, np.ndarray):
        v = torch.from_numpy(v)
    return torch.as_tensor(v, device=like.device, dtype=like.dtype)


def standardize(x: torch.Tensor, mean, std, eps: float = 1e-6) -> torch.Tensor:
    """(x - mean) / max(std, eps); mean/std (D,) (tensor, array or scalar) broadcast over
    (..., D)."""
    return (x - _as_tensor(mean, x)) / _as_tensor(std, x).clamp_min(eps)


def destandardize(x: torch.Tensor, mean, std, eps: float = 1e-6) -> torch.Tensor:
    """Inverse of ``standardize``: converter output back to the teacher's feature scale."""
    return x * _as_tensor(std, x).clamp_min(eps) + _as_tensor(mean, x)


def target_loss(pred: torch.Tensor, target: torch.Tensor, *, w_cos: float = 1.0,
                w_sl1: float = 1.0) -> torch.Tensor:
    """(B, N, D) x (B, N, D) -> scalar: w_cos * mean token (1 - cos) + w_sl1 * smoothL1."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and teacher {tuple(target.shape)} "
                         "differ in shape")
    pred, target = pred.float(), target.float()
    cos = 1.0 - F.cosine_similarity(pred, target, dim=-1, eps=1e-6).mean()
    return w_cos * cos + w_sl1 * F.smooth_l1_loss(pred, target)


def distill_loss(pred: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], *,
                 mean: dict | None, std: dict | None, w_cos: float = 1.0, w_sl1: float = 1.0,
                 target_weights: dict[str, float] | None = None):
    """pred {name: (B, N, D)} (standardised space), teacher {name: (B, N, D)} (raw features) ->
    (total scalar, {name: scalar}). Targets are those of ``pred``; ``mean``/``std`` None means
    the teacher features are already standardised."""
    target_weights = dict(target_weights or {})
    unknown = set(target_weights) - set(pred)
    if unknown:
        raise KeyError(f"distill_loss: target_weights name unknown targets {sorted(unknown)}")
    missing = [n for n in pred if n not in teacher]
    if missing:
        raise KeyError(f"distill_loss: teacher features lack targets {missing}")
    per_target, total = {}, None
    for name, p in pred.items():
        t = teacher[name].to(p.device).float()
        if mean is not None and std is not None:
            t = standardize(t, mean[name], std[name])
        loss = target_loss(p, t, w_cos=w_cos, w_sl1=w_sl1)
        per_target[name] = loss
        weighted = target_weights.get(name, 1.0) * loss
        total = weighted if total is None else total + weighted
    if total is None:
        raise ValueError("distill_loss: no targets in pred")
    return total, per_target
