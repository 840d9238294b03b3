"""The training metrics log the report draws its curves from: JSON Lines, one object per line.

The train stage (rank 0) appends to ``runs/<job>/train/<job>-NNN/metrics.jsonl`` (its run
directory) and records that path, relative to the storage root, as ``"metrics_log"`` in
``runs/<job>/train.json``.

Step records (one per optimizer step)::

    {"kind": "step",            # optional: a record without "kind" is a step record
     "step": 120,               # global optimizer step, counted from 1 (required)
     "epoch": 3,                # epoch the step belongs to, from 0
     "time": 1764652800.5,      # unix seconds
     "loss": 0.41,              # total objective of the step
     "loss.<target>": 0.12,     # distillation loss of one teacher target (videomae, ...)
     "loss.head": 1.05,         # head cross-entropy
     "reg.<name>": 0.003,       # a regulariser's value, unweighted (nuclear, jacobian, ...)
     "w.<name>": 0.01,          # that regulariser's current weight (warm-up schedule)
     "lr": 0.0003, "grad_norm": 1.7,     # learning rate; gradient norm before clipping
     "clips_per_s": 812.0,      # global training throughput over the step
     "data_wait_frac": 0.04}    # fraction of that step spent waiting for data, in [0, 1]

Validation records (at each epoch end and every ``train.val_every_steps``, on the validation
split)::

    {"kind": "val", "step": 120, "epoch": 3,
     "val.<target>.cosine": 0.71, "val.<target>.r2": 0.43, "val.<target>.mse": 0.55,
     "val.mean_cosine": 0.69, "val.top1": 0.52, "val.top5": 0.91, "val.loss": 0.44}

Readers are tolerant: keys may be missing, unknown keys are ignored, non-finite or non-numeric
values are dropped, malformed lines are skipped and counted. A run resumed from a checkpoint
re-logs the steps after that checkpoint; the last record of a (kind, step) wins.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

LOG_NAME = "metrics.jsonl"


@dataclass
class TrainLog:
    steps: list[dict[str, float]] = field(default_factory=list)  # sorted by step
    val: list[dict[str, float]] = field(default_factory=list)  # sorted by step
    bad_lines: int = 0
    source: str | None = None
    error: str | None = None  # why the log could not be read (then steps/val are empty)

    def keys(self, prefix: str = "", kind: str = "step") -> list[str]:
        """Numeric keys in any record of ``kind`` starting with ``prefix``, in first-seen order."""
        seen: dict[str, None] = {}
        for r in self.steps if kind == "step" else self.val:
            for k in r:
                if k.startswith(prefix) and k not in ("step", "epoch", "time"):
                    seen.setdefault(k)
        return list(seen)

    def series(
        self, key: str, kind: str = "step", x: str = "step"
    ) -> tuple[list[float], list[float]]:
        """(xs, ys) of the records of ``kind`` that have both ``x`` and ``key``."""
        rows = self.steps if kind == "step" else self.val
        pts = [(r[x], r[key]) for r in rows if x in r and key in r]
        return [p[0] for p in pts], [p[1] for p in pts]


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def parse_train_log(lines: str | bytes | Iterable[str], source: str | None = None) -> TrainLog:
    """JSONL text (or its lines) -> TrainLog of numeric records (see the module docstring)."""
    if isinstance(lines, bytes):
        lines = lines.decode("utf-8", errors="replace")
    if isinstance(lines, str):
        lines = lines.splitlines()
    by_key: dict[tuple[str, float], dict[str, float]] = {}
    bad = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if not isinstance(rec, dict):
            bad += 1
            continue
        kind = rec.get("kind", "step")
        step = _number(rec.get("step"))
        if kind not in ("step", "val") or step is None:
            bad += 1
            continue
        nums = {
            k: n for k, v in rec.items() if isinstance(k, str) and (n := _number(v)) is not None
        }
        by_key[(kind, step)] = nums  # later lines (a resumed run) replace earlier ones
    out = TrainLog(bad_lines=bad, source=source)
    for (kind, _), rec in sorted(by_key.items(), key=lambda kv: kv[0][1]):
        (out.steps if kind == "step" else out.val).append(rec)
    return out


def load_train_log(storage, train_info: dict | None) -> TrainLog | None:
    """The log named by train.json's ``"metrics_log"`` (relative to the storage root); None when
    the training run recorded none. Never raises: a log that cannot be read comes back with
    ``error`` set, so the report can say why it has no curves."""
    rel = (train_info or {}).get("metrics_log")
    if not rel:
        return None
    try:
        return parse_train_log(storage.read_bytes(rel), source=storage.url(rel))
    except Exception as e:  # noqa: BLE001  (a missing/unreadable log costs the curves, never the job)
        return TrainLog(source=rel, error=f"{type(e).__name__}: {e}")
