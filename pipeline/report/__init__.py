"""The evaluation report (report.html) and the model card's summary.

``write_report(metrics, ...)`` -> the HTML text of one self-contained page (inline PNG, no
external request): a summary card, training curves, this model beside the floor and the current
``latest``, per-clip cosine histograms, per-token cosine on the target grids, the head's confusion
matrix and per-class accuracy, and the converter's cost. Inputs other than ``metrics`` are
optional; a section without its input, or that fails, says why and the rest renders. It never
raises. Plots need matplotlib (``pip install tokconv-pipeline[report]``); without it the page
keeps its tables and says so.

``model_card_summary(metrics, ...)`` -> markdown stating the same summary figures, for the
exported model card. The training-log schema is in ``pipeline.report.trainlog``; the details
file layout in ``pipeline.evaluate``.
"""

from __future__ import annotations

import html
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
    export_result: dict | None = None,
    metric: str = "mean_cosine",
    higher_is_better: bool = True,
) -> str:
    """metrics: metrics.json of the evaluate stage (``metrics["latest"]``: the current latest on
    the same split); details: details.json (``evaluate_model(..., return_details=True)``);
    train_log: ``parse_train_log`` / ``load_train_log``; floor_metrics: the metrics of
    baseline_interp_linear trained on the same store; backbone_latency_ms / backbone_gflops:
    measured per-clip figures {"student": x, <teacher>: x, ...} (measured on ``backbone_device``);
    export_result: run_export's return (else the decision is predicted from metrics["latest"]
    with ``metric`` / ``higher_is_better``, export's settings)."""
    ctx = {
        "details": details,
        "train_log": train_log,
        "floor_metrics": floor_metrics,
        "backbone_latency_ms": backbone_latency_ms,
        "backbone_gflops": backbone_gflops,
        "backbone_device": backbone_device,
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


__all__ = [
    "TrainLog",
    "load_train_log",
    "model_card_summary",
    "parse_train_log",
    "promotion_decision",
    "write_report",
]
