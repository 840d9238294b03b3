"""leaderboard.html: presets trained on one store with one budget, one row each, best first, and
Pareto plots of cost against fidelity. Self-contained like report.html (inline PNG and CSS).

Numbers go through ``pipeline.fmt`` and are tagged as in the report; a figure copied from a
preset's metrics.json carries ``data-source="metrics:<preset>"`` and ``data-metric`` (its dotted
path there), so a test can check the page against each preset's own file.
"""

from __future__ import annotations

import html
import traceback

from . import plots
from .markup import CSS, esc, figure, note, num, table
from .summary import Fact

# (column, row key, metrics.json key, fmt kind)
COLUMNS = [
    ("mean cosine", "mean_cosine", "mean_cosine", "num"),
    ("mean R^2", "mean_r2", "mean_r2", "num"),
    ("head top-1", "top1", "top1", "pct"),
    ("params", "params", "converter.params", "int"),
    ("GFLOP / clip", "gflops_per_clip", "converter.gflops_per_clip", "gflop"),
    ("latency / clip (batch 1)", "latency_ms_per_clip", "converter.latency_ms_per_clip", "ms"),
    ("CPU latency / clip", "latency_ms_per_clip_cpu", "converter.latency_ms_per_clip_cpu", "ms"),
]


def _cells(r: dict, targets: list[str], metric: str) -> list[str]:
    src = f"metrics:{r['preset']}"
    cost = r.get("cost") or {}
    cells = [
        num(Fact("", r["rank"], "int")),
        esc(r["preset"]) + (" ★" if r.get("pareto") else ""),
        num(Fact(metric, r["value"], "pct" if metric in ("top1", "top5") else "num", metric), src),
    ]
    cells += [num(Fact(c, r.get(k), kind, key), src) for c, k, key, kind in COLUMNS]
    cells += [
        num(Fact(t, (r["targets"].get(t) or {}).get(m), "num", f"targets.{t}.{m}"), src)
        for t in targets
        for m in ("cosine", "r2")
    ]
    cells += [
        num(Fact("", r.get("cost_ms_per_clip"), "ms")),
        num(Fact("", cost.get("mine"), "ms")),
        num(Fact("", cost.get("share"), "pct")),
        num(Fact("", cost.get("vs_teachers"), "pct")),
    ]
    return cells


def leaderboard_page(board: dict) -> str:
    """The HTML of ``board`` (``pipeline.leaderboard.run_leaderboard``'s leaderboard.json). Never
    raises: a board that cannot be drawn gives a bare page saying why (the JSON and CSV stand)."""
    try:
        return _page(board)
    except Exception:  # noqa: BLE001  (the page never fails the leaderboard)
        return (
            '<!doctype html><html><head><meta charset="utf-8"><title>tokconv leaderboard</title>'
            "</head><body><h1>tokconv leaderboard</h1><p>the page could not be drawn "
            "(leaderboard.json and leaderboard.csv hold the figures):</p>"
            f"<pre>{html.escape(traceback.format_exc())}</pre></body></html>"
        )


def _page(board: dict) -> str:
    rows, metric = board["rows"], board["metric"]
    targets = list(dict.fromkeys(t for r in rows for t in r["targets"]))
    better = "higher" if board["higher_is_better"] else "lower"
    dev, batch = board.get("backbone_device"), board.get("backbone_latency_batch")
    lat = board.get("backbone_latency_ms") or {}
    header = [
        "rank",
        "preset (★ Pareto-optimal)",
        f"{metric} ({better} is better)",
        *(c for c, *_ in COLUMNS),
        *(f"{t} {w}" for t in targets for w in ("cosine", "R^2")),
        "converter / clip, timed as the backbones",
        "student + converter / clip",
        "saving vs student + teachers",
        "converter / teachers",
    ]
    out = [table(header, [_cells(r, targets, metric) for r in rows], numeric_from=2)]
    if lat:
        total = sum(v for k, v in lat.items() if k != "student")
        out.append(
            "<p>Student and teachers as measured by the extract stage on "
            f"{esc(dev or 'a device not stated')}{f', batch {batch}' if batch else ''}: "
            + ", ".join(f"{esc(k)} {num(Fact(k, v, 'ms'))}" for k, v in lat.items())
            + f" per clip (teachers together {num(Fact('', total, 'ms'))}).</p>"
        )
    else:
        out.append(note("the feature store records no backbone latencies: no cost vs the teachers"))
    for r in rows:
        if r.get("cost_note") and lat:
            out.append(note(f"{r['preset']}: {r['cost_note']}"))
    names = [r["preset"] for r in rows]
    ys, front = [r["value"] for r in rows], [bool(r.get("pareto")) for r in rows]
    for xs, xlabel, alt in (
        ([r.get("cost_ms_per_clip") for r in rows], "converter ms per clip", "latency"),
        ([r.get("gflops_per_clip") for r in rows], "converter GFLOP per clip", "GFLOP"),
    ):
        title = f"{metric} against {alt}"
        out.append(
            figure(plots.pareto, xs, ys, names, front, xlabel, metric, title, alt=f"pareto {alt}")
        )
    b = board.get("budget") or {}
    links = "".join(
        f"<li>{esc(r['preset'])}: <a href=\"{esc(r['metrics_url'])}\">metrics.json</a>"
        + (f' · <a href="{esc(r["report_url"])}">report</a>' if r.get("report_url") else "")
        + "</li>"
        for r in rows
    )
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<title>tokconv leaderboard: {esc(board["job"])}</title><style>{CSS}</style></head><body>
<h1>tokconv leaderboard: {len(rows)} presets on store {esc(board["store"])}</h1>
<p><small>ranked by {esc(metric)} on the {esc(board["split"])} split · one budget:
{esc(b.get("epochs"))} epochs, batch {esc(b.get("batch_size"))} x {esc(b.get("num_workers"))}
workers, lr {esc((b.get("optim") or {}).get("lr"))}, seed {esc(b.get("seed"))}, no warm start ·
generated {esc(board.get("generated", "?"))} · <a href="leaderboard.json">leaderboard.json</a> ·
<a href="leaderboard.csv">leaderboard.csv</a></small></p>
{"".join(out)}<h2>Per preset</h2><ul>{links}</ul></body></html>"""
