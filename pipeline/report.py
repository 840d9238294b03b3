"""A small self-contained HTML report for evaluation metrics (plots need matplotlib, optional)."""
from __future__ import annotations

import base64
import html
import io
import json
from typing import Any


def _bar_png(title: str, labels: list[str], values: list[float], ylim=None) -> str | None:
    """One bar chart as a base64 PNG; None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    ax.bar(labels, values, color="#4477aa")
    ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def write_report(metrics: dict[str, Any]) -> str:
    """HTML page: per-target fidelity plots (when matplotlib is there) + a metrics table + raw JSON."""
    targets = metrics.get("targets", {})
    names = list(targets)
    imgs = []
    for key, title, ylim in (("cosine", "mean cosine", (min(0.0, *[targets[n]["cosine"] for n in names]), 1.0)),
                             ("r2", "R^2 (standardised)", None), ("mse", "MSE (standardised)", None)):
        if not names:
            break
        png = _bar_png(title, names, [float(targets[n][key]) for n in names], ylim)
        if png is not None:
            imgs.append(f'<img alt="{html.escape(title)}" src="data:image/png;base64,{png}">')
    rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{v['cosine']:.4f}</td><td>{v['mse']:.4f}</td>"
                   f"<td>{v['r2']:.4f}</td></tr>" for n, v in targets.items())
    conv = metrics.get("converter", {})
    facts = {"clips": metrics.get("clips"), "top1": metrics.get("top1"), "top5": metrics.get("top5"),
             "converter": conv.get("name"), "params": conv.get("params"),
             "GFLOP/clip": conv.get("gflops_per_clip"), "latency ms/clip": conv.get("latency_ms_per_clip")}
    fact_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    plots = "".join(imgs) or "<p><i>plots skipped: matplotlib is not installed</i></p>"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>tokconv evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px}}</style></head><body>
<h1>tokconv evaluation ({html.escape(str(metrics.get('split', '')))} split)</h1>
<table>{fact_rows}</table>
<h2>Fidelity per target</h2>
<table><tr><th>target</th><th>cosine</th><th>MSE</th><th>R^2</th></tr>{rows}</table>
<div>{plots}</div>
<h2>metrics.json</h2><pre>{html.escape(json.dumps(metrics, indent=2, default=str))}</pre>
</body></html>"""
