"""Benchmark instrumentation the product does not need: GPU sampling, call-time sums, and the
committed-rate figures of a pipeline run computed from its store's commit records.

* :class:`GpuSampler`: ``nvidia-smi`` utilisation every ``period`` s in a thread.
* :class:`CallTimes`: where a model actor's calls spend their time, summed over calls.
* :func:`commit_times`: (seconds, cumulative clips) per committed shard, read from the commit
  records of a local store; :func:`rates` turns such a series (or a loop's per-batch one) into
  the first-output time, the rate after the first output and the window rate.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import Poller


class GpuSampler(Poller):
    """Samples ``nvidia-smi`` utilisation (%) of every GPU every ``period`` s in a thread."""

    def __init__(self, period: float = 0.5):
        enabled = shutil.which("nvidia-smi") is not None and torch.cuda.is_available()
        super().__init__(period, enabled=enabled)
        self.samples = []

    def tick(self):
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        try:
            out = subprocess.run(query, capture_output=True, text=True, timeout=5,
                                 check=False).stdout
            self.samples.append([float(v) for v in out.split()])
        except (OSError, subprocess.SubprocessError, ValueError):
            self.missed = getattr(self, "missed", 0) + 1  # a missed sample is fine

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        a = np.asarray(self.samples)  # (samples, gpus)
        return {"mean_pct": round(float(a.mean()), 1),
                "per_gpu_mean_pct": a.mean(0).round(1).tolist(), "samples": len(a)}


class CallTimes:
    """Where a model actor's calls spend their time, summed over calls (thread-safe); with
    ``every`` > 0 one line is printed every ``every`` calls. ``busy`` = summed call time / (wall
    time x concurrency): near 1, the calls themselves are the limit; well below, they wait on
    input. ``stages``: the named parts of a call reported per call (``add`` takes their seconds)."""

    STAGES = ("stage", "gpu", "table", "write")

    def __init__(self, every: int = 0, concurrency: int = 1, stages: tuple[str, ...] = STAGES):
        self.every, self.concurrency, self.lock = every, concurrency, threading.Lock()
        self.stages = tuple(stages)
        self.calls = self.clips = 0
        self.first: float | None = None
        self.sums = dict.fromkeys((*self.stages, "call"), 0.0)

    def add(self, clips: int, start: float, **stages: float) -> None:
        now = time.perf_counter()
        with self.lock:
            self.first = start if self.first is None else self.first
            self.calls, self.clips = self.calls + 1, self.clips + clips
            for k, v in {**stages, "call": now - start}.items():
                self.sums[k] += v
            line = self.summary(now) if self.every and self.calls % self.every == 0 else None
        if line:
            print(f"[model actor] {line}", flush=True)

    def summary(self, now: float | None = None) -> str:
        wall = max((now or time.perf_counter()) - (self.first or 0.0), 1e-9)
        per = ", ".join(f"{k} {1e3 * self.sums[k] / max(self.calls, 1):.0f}"
                        for k in (*self.stages, "call"))
        busy = self.sums["call"] / (wall * self.concurrency)
        return (f"{self.calls} calls, {self.clips} clips in {wall:.1f} s "
                f"({self.clips / wall:.1f} clips/s); ms per call: {per}; busy {busy:.2f}")


def window_rate(times: list[tuple[float, int]], lo: float = 0.2,
                hi: float = 0.9) -> float | None:
    """Clips/s between the points that pass ``lo`` and ``hi`` of the run's clips: neither
    start-up nor the burst of shards flushed at the end of the stream moves it. ``times``:
    (seconds, cumulative clips) in order. None when the window spans no time."""
    if not times:
        return None
    total = times[-1][1]
    t_lo, c_lo = next(p for p in times if p[1] >= lo * total)
    t_hi, c_hi = next(p for p in times if p[1] >= hi * total)
    return round((c_hi - c_lo) / (t_hi - t_lo), 3) if t_hi > t_lo else None


def commit_times(store_dir: Path, t0: float) -> list[tuple[float, int]]:
    """(seconds since the wall-clock time ``t0``, cumulative clips) per committed shard of the
    local store at ``store_dir``, in commit order. The time is the commit record's modification
    time (its ``committed`` field has whole seconds only); rows come from the record."""
    records = sorted((p.stat().st_mtime, json.loads(p.read_text())["rows"])
                     for p in (Path(store_dir) / "commits").glob("*.json"))
    out, clips = [], 0
    for t, rows in records:
        clips += rows
        out.append((round(t - t0, 3), clips))
    return out


def rates(times: list[tuple[float, int]], *, min_points: int = 4) -> dict:
    """A run's (seconds, cumulative clips) series -> ``first_s`` (the first output), ``steady``
    (clips after the first output over the time since it; None below ``min_points`` outputs) and
    ``window`` (:func:`window_rate`)."""
    if not times:
        return {"first_s": None, "steady": None, "window": None}
    (t1, c1), (tn, cn) = times[0], times[-1]
    steady = (cn - c1) / (tn - t1) if len(times) >= min_points and tn > t1 else None
    return {"first_s": round(t1, 2), "steady": round(steady, 3) if steady else None,
            "window": window_rate(times)}
