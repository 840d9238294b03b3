"""Helpers the benchmarks share: device sync, median call time, token agreement, a polling thread.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import torch
import torch.nn.functional as F


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device: torch.device, iters: int, warmup: int = 2) -> float:
    """Median seconds of ``iters`` calls of ``fn`` after ``warmup`` calls, each synchronised on
    ``device``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def cosine(a: torch.Tensor, b: torch.Tensor, digits: int = 6) -> tuple[float, float]:
    """Mean and min cosine between matching vectors (last dim) of two outputs."""
    c = F.cosine_similarity(a.float().flatten(0, -2), b.float().flatten(0, -2), dim=-1)
    return round(float(c.mean()), digits), round(float(c.min()), digits)


class Poller:
    """A context manager calling ``tick()`` on a daemon thread every ``period`` s while ``enabled``
    (first call at once); ``__exit__`` stops and joins it."""

    def __init__(self, period: float, enabled: bool):
        self.period, self.enabled, self._stop = period, enabled, threading.Event()

    def tick(self) -> None:
        raise NotImplementedError

    def _run(self):
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.period)

    def __enter__(self):
        if self.enabled:
            self._t = threading.Thread(target=self._run, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._stop.set()
            self._t.join()
