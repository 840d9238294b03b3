"""The evaluation report (report.html) and the model card's summary.

``write_report(metrics, ...)`` -> the HTML text of one self-contained page (inline PNG, no
external request): a summary card, training curves, this model beside the floor and the current
``latest``, per-clip cosine histograms, per-token cosine on the target grids, the head's confusion
matrix and per-class accuracy, and the converter's cost. Inputs other than ``metrics`` are
optional; a section without its input, or that fails, says why and the rest renders. It never
raises. Plots need matplotlib (``pip install tokconv-pipeline[report]``); without it the page
keeps its tables and says so.

``write_run_report(storage, run_dir, metrics, ...)`` draws the report of the evaluation under
``run_dir`` from what the stages wrote (details.json, the training log named by train.json, the
floor in metrics.json, the store's measured backbone latencies) and writes
``<run_dir>/eval/report.html``; the evaluate stage calls it, and export again with its decision.

``model_card_summary(metrics, ...)`` -> markdown stating the same summary figures, for the
exported model card. The training-log schema is in ``pipeline.report.trainlog``; the details
file layout in ``pipeline.evaluate``.
"""

from __future__ import annotations

import html
import json
import posixpath
import sys
import traceback

from .page import render
from .summary import model_card_summary, promotion_decision
from .trainlog import TrainLog, load_train_log, parse_train_log


def write_report(
    metrics: dict,
    *,
    details: dict | None = None,
    train_log: TrainLog | None = None,
    floor_metrics: dict | None = None,
    backbone_latency_ms: dict | None = None,
    backbone_gflops: dict | None = None,
    backbone_device: str | None = None,
    backbone_batch: int | None = None,
    export_result: dict | None = None,
    metric: str = "mean_cosine",
    higher_is_better: bool = True,
) -> str:
    """metrics: metrics.json of the evaluate stage (``metrics["latest"]``: the current latest on
    the same split); details: details.json (``evaluate_model(..., return_details=True)``);
    train_log: ``parse_train_log`` / ``load_train_log``; floor_metrics: the metrics of
    baseline_interp_linear trained on the same store (or {"skipped": why}); backbone_latency_ms /
    backbone_gflops: measured per-clip figures {"student": x, <teacher>: x, ...} (measured on
    ``backbone_device``, at batch ``backbone_batch``);
    export_result: run_export's return (else the decision is predicted from metrics["latest"]
    with ``metric`` / ``higher_is_better``, export's settings)."""
    skipped = floor_metrics.get("skipped") if isinstance(floor_metrics, dict) else None
    ctx = {
        "details": details,
        "train_log": train_log,
        "floor_metrics": None if skipped else floor_metrics,
        "floor_skipped": skipped,
        "backbone_latency_ms": backbone_latency_ms,
        "backbone_gflops": backbone_gflops,
        "backbone_device": backbone_device,
        "backbone_batch": backbone_batch,
        "export_result": export_result,
        "metric": metric,
        "higher_is_better": higher_is_better,
    }
    try:
        return render(metrics if isinstance(metrics, dict) else {}, ctx)
    except Exception:  # noqa: BLE001  (the report never fails the job: a bare page says why)
        return (
            '<!doctype html><html><head><meta charset="utf-8">'
            "<title>tokconv evaluation</title></head>"
            f"<body><h1>tokconv evaluation</h1><p>the report could not be drawn:</p>"
            f"<pre>{html.escape(traceback.format_exc())}</pre></body></html>"
        )


def write_run_report(
    storage,
    run_dir: str,
    metrics: dict,
    *,
    details: dict | None = None,
    train_info: dict | None = None,
    store_meta: dict | None = None,
    export_result: dict | None = None,
    metric: str = "mean_cosine",
    higher_is_better: bool = True,
) -> str | None:
    """Write ``<run_dir>/eval/report.html`` for ``metrics`` (that run's metrics.json) and return
    its URL. ``details`` / ``train_info`` (train.json) are read from ``run_dir`` when not given;
    ``store_meta``: the feature store's meta.json (its measured backbone latencies). An input
    that cannot be read costs its section; a failed write is printed and returns None: the
    report never fails the stage."""
    rel = posixpath.join(run_dir, "eval", "report.html")
    try:
        if details is None:
            details = _read(storage, posixpath.join(run_dir, "eval", "details.json"))
        if train_info is None:
            train_info = _read(storage, posixpath.join(run_dir, "train.json"))
        meta = store_meta or {}
        page = write_report(
            metrics,
            details=details,
            train_log=load_train_log(storage, train_info),
            floor_metrics=metrics.get("floor"),
            backbone_latency_ms=meta.get("backbone_latency_ms"),
            backbone_device=meta.get("backbone_device"),
            backbone_batch=meta.get("backbone_latency_batch"),
            export_result=export_result,
            metric=metric,
            higher_is_better=higher_is_better,
        )
        storage.write_bytes(rel, page.encode())
        return storage.url(rel)
    except Exception as e:  # noqa: BLE001  (the report never fails the stage; say why it is absent)
        print(f"[report] {rel} not written: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return None


def _read(storage, rel: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(rel))
    except Exception:  # noqa: BLE001  (missing or unreadable: the section that needs it says so)
        return None


__all__ = [
    "TrainLog",
    "load_train_log",
    "model_card_summary",
    "parse_train_log",
    "promotion_decision",
    "write_report",
    "write_run_report",
]
