"""Streaming evaluation meters: fidelity (cosine / MSE / R^2 and their per-clip and per-token
detail) of converted tokens against teacher tokens, the head's confusion matrix, top-k hits.
``pipeline.evaluate`` runs them over a split; ``bench/converters.py`` over its own pairs.
"""
from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.nn.functional as F


class FidelityMeter:
    """Streaming cosine / MSE / R^2 of predictions vs. targets for one token layout.

    update(pred (B, N, D), target (B, N, D)); compute() -> {"cosine", "cosine_p05", "mse", "r2"}
    (cosine_p05: 5th percentile of the per-clip mean cosine); details() -> {"per_clip_cosine":
    [clips], "per_token_cosine": [N] (token cosine averaged over clips)}.
    Accumulates in float64 so the result does not depend on batch boundaries beyond rounding.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.clips = 0
        self.cos_sum = 0.0
        self.sse = 0.0
        self.n = 0  # token count (per channel)
        self.sum_y = torch.zeros(dim, dtype=torch.float64)
        self.sum_y2 = torch.zeros(dim, dtype=torch.float64)
        self.per_clip: list[float] = []
        self.token_cos_sum: torch.Tensor | None = None  # (N,) float64

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape or pred.shape[-1] != self.dim:
            raise ValueError(f"FidelityMeter: pred {tuple(pred.shape)} vs target "
                             f"{tuple(target.shape)} (dim {self.dim})")
        if self.token_cos_sum is not None and pred.shape[1] != self.token_cos_sum.shape[0]:
            raise ValueError(f"FidelityMeter: {pred.shape[1]} tokens after "
                             f"{self.token_cos_sum.shape[0]}")
        p, t = pred.detach().double().cpu(), target.detach().double().cpu()
        cos = F.cosine_similarity(p, t, dim=-1)  # (B, N)
        clip_cos = cos.mean(dim=1)
        self.cos_sum += clip_cos.sum().item()
        self.per_clip.extend(clip_cos.tolist())
        tok = cos.sum(dim=0)
        self.token_cos_sum = tok if self.token_cos_sum is None else self.token_cos_sum + tok
        self.clips += p.shape[0]
        self.sse += (p - t).pow(2).sum().item()
        flat = t.reshape(-1, self.dim)
        self.n += flat.shape[0]
        self.sum_y += flat.sum(0)
        self.sum_y2 += flat.pow(2).sum(0)

    def compute(self) -> dict[str, float]:
        if self.clips == 0:
            raise ValueError("FidelityMeter.compute: no clips seen")
        sst = (self.sum_y2 - self.sum_y.pow(2) / self.n).sum().item()
        return {"cosine": self.cos_sum / self.clips,
                "cosine_p05": (torch.tensor(self.per_clip, dtype=torch.float64)
                               .quantile(0.05).item()),
                "mse": self.sse / (self.n * self.dim),
                "r2": 1.0 - self.sse / sst if sst > 0 else float("nan")}

    def details(self) -> dict[str, list[float]]:
        if self.clips == 0:
            raise ValueError("FidelityMeter.details: no clips seen")
        return {"per_clip_cosine": list(self.per_clip),
                "per_token_cosine": (self.token_cos_sum / self.clips).tolist()}


class ConfusionMeter:
    """Streaming confusion matrix of top-1 predictions over ``num_classes`` classes.

    update(logits (B, K), labels (B,); label -1 = unlabelled, ignored); compute() ->
    {"confusion": [K][K] (row: true, column: predicted), "support": [K], "per_class_accuracy":
    [K] (None for a class without clips), "mean_class_accuracy": mean over classes with clips}.
    """

    def __init__(self, num_classes: int):
        if num_classes < 1:
            raise ValueError(f"ConfusionMeter: num_classes must be >= 1, got {num_classes}")
        self.k = num_classes
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if logits.ndim != 2 or logits.shape[1] != self.k or logits.shape[0] != labels.shape[0]:
            raise ValueError(f"ConfusionMeter: logits {tuple(logits.shape)} "
                             f"vs labels {tuple(labels.shape)} ({self.k} classes)")
        ok = labels >= 0
        if bool((labels[ok] >= self.k).any()):
            raise ValueError(f"ConfusionMeter: label {int(labels.max())} outside {self.k} classes")
        idx = labels[ok].long().cpu() * self.k + logits[ok].argmax(dim=1).cpu()
        self.counts += torch.bincount(idx, minlength=self.k * self.k).view(self.k, self.k)

    def compute(self) -> dict[str, Any]:
        support = self.counts.sum(dim=1)
        acc = [int(self.counts[i, i]) / int(n) if n > 0 else None
               for i, n in enumerate(support.tolist())]
        seen = [a for a in acc if a is not None]
        return {"confusion": self.counts.tolist(), "support": support.tolist(),
                "per_class_accuracy": acc,
                "mean_class_accuracy": statistics.fmean(seen) if seen else None}


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """Number of labelled rows (label >= 0) whose label is among the top-k logits, per k
    (k is capped at the number of classes)."""
    ok = labels >= 0
    logits, labels = logits[ok], labels[ok]
    out = {}
    for k in ks:
        kk = min(k, logits.shape[1])
        top = logits.topk(kk, dim=1).indices
        out[k] = int((top == labels[:, None]).any(dim=1).sum().item())
    return out
