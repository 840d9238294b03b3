"""report.html: one self-contained page (inline PNG figures, inline CSS, no script, no external
request) built section by section; a section that cannot be drawn says why and the rest renders.

Every number is formatted by ``pipeline.fmt`` and tagged ``<span class="num" data-fmt=KIND>``;
numbers read from an input also carry ``data-source`` (metrics | floor | details | store) and
``data-metric`` (their dotted path there; list items by index), so a test can check the page
against the source files (source ``store``: the feature store's meta.json).
"""

from __future__ import annotations

import datetime as _dt
import math

from ..fmt import fmt_int, fmt_num
from . import plots
from .markup import CSS, esc, facts_table, figure, note, num, table
from .summary import Fact, cost_facts, headline_facts, promotion_decision, target_rows
from .trainlog import TrainLog

# ---------------------------------------------------------------- sections


def summary_section(m: dict, ctx: dict) -> str:
    cards = "".join(
        f'<div class="card"><div class="v">{num(f)}</div><div class="l">{esc(f.label)}</div></div>'
        for f in headline_facts(m)
    )
    verdict, reason = promotion_decision(
        m, ctx["export_result"], ctx["metric"], ctx["higher_is_better"]
    )
    out = [
        f'<div class="cards">{cards}</div>',
        f'<p class="verdict"><b>Promotion: {esc(verdict)}</b><br><small>{esc(reason)}</small></p>',
    ]
    rows = target_rows(m)
    if rows:
        out.append(
            table(
                ["target", *(f.label for f in rows[0][1])],
                [[esc(t), *(num(f) for f in cols)] for t, cols in rows],
            )
        )
    facts, notes = cost_facts(
        m,
        ctx["backbone_latency_ms"],
        ctx["backbone_gflops"],
        ctx["backbone_device"],
        ctx["backbone_batch"],
    )
    out.append("<h3>Cost against the teachers it replaces</h3>" + facts_table(facts))
    out += [note(n) for n in notes]
    return "".join(out)


def curves_section(m: dict, ctx: dict) -> str:
    log: TrainLog | None = ctx["train_log"]
    if log is None:
        return note(
            "no training log: the training run recorded no metrics log "
            '(train.json has no "metrics_log")'
        )
    if log.error:
        return note(f"the training log {log.source} could not be read: {log.error}")
    out = [
        (
            f"<p><small>{esc(log.source or 'training log')}: {len(log.steps):,} step records, "
            f"{len(log.val):,} validation records</small></p>"
        )
    ]
    if log.bad_lines:
        out.append(note(f"{log.bad_lines:,} malformed lines of the log were skipped"))
    if not log.steps and not log.val:
        return "".join(out) + note("the training log has no step or validation records")

    def s(keys, kind="step", x="step", strip=""):
        return {k.removeprefix(strip) or k: log.series(k, kind, x) for k in keys}

    step_panels = [
        ("loss (total and per target)", s(["loss", *log.keys("loss.")]), "step", True),
        ("regularisers (unweighted)", s(log.keys("reg."), strip="reg."), "step", True),
        ("regulariser weights", s(log.keys("w."), strip="w."), "step", False),
        ("learning rate", s(["lr"]), "step", False),
        ("gradient norm", s(["grad_norm"]), "step", True),
        ("throughput (clips/s)", s(["clips_per_s"]), "step", False),
        ("data wait (fraction of step time)", s(["data_wait_frac"]), "step", False),
    ]
    vk = log.keys("val.", kind="val")
    val_panels = [
        (
            f"validation {what} per epoch",
            s([k for k in vk if k.endswith(suffix)], "val", "epoch", strip="val."),
            "epoch",
            False,
        )
        for what, suffix in (("cosine", "cosine"), ("R^2", ".r2"), ("accuracy", ("top1", "top5")))
    ]
    if log.steps:
        out.append(figure(plots.line_panels, step_panels, alt="training curves"))
    if log.val:
        out.append(figure(plots.line_panels, val_panels, alt="validation per epoch"))
    last = (log.steps or [{}])[-1] | (log.val or [{}])[-1]
    shown = [k for k in last if k not in ("step", "epoch", "time")]
    if shown:
        out.append(
            f"<details><summary>last logged values (step {fmt_int(last.get('step'))})</summary>"
            + table(None, [[esc(k), num(Fact(k, last[k]))] for k in shown])
            + "</details>"
        )
    return "".join(out)


SIDE_KEYS = [
    ("mean cosine", "mean_cosine", "num"),
    ("mean R^2", "mean_r2", "num"),
    ("mean MSE", "mean_mse", "num"),
    ("head top-1", "top1", "pct"),
    ("head top-5", "top5", "pct"),
]
COST_KEYS = [
    ("converter parameters", "converter.params", "int"),
    ("GFLOP per clip", "converter.gflops_per_clip", "gflop"),
    ("latency per clip", "converter.latency_ms_per_clip", "ms"),
]


def _get(d: dict | None, key: str):
    node = d
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def side_by_side_section(m: dict, ctx: dict) -> str:
    floor, latest = ctx["floor_metrics"], m.get("latest")
    cols = [("this model", m, "metrics", "")]
    out = []
    if floor:
        cols.append(
            (
                f"floor ({(floor.get('converter') or {}).get('name', 'baseline_interp_linear')})",
                floor,
                "floor",
                "",
            )
        )
    elif ctx.get("floor_skipped"):
        out.append(note(f"no floor column: {ctx['floor_skipped']}"))
    else:
        out.append(
            note(
                "no floor run given (baseline_interp_linear trained on the same store): "
                "its column is left out"
            )
        )
    if latest and "skipped" not in latest:
        cols.append((f"current latest ({latest.get('version')})", m, "metrics", "latest."))
    elif latest:
        out.append(
            note(
                f"the current latest {latest.get('version')} was not evaluated: {latest['skipped']}"
            )
        )
    else:
        out.append(note("no model is exported yet: no latest column"))
    keys = (
        SIDE_KEYS
        + [
            (f"{t} {w}", f"targets.{t}.{k}", "num")
            for t in (m.get("targets") or {})
            for w, k in (("cosine", "cosine"), ("R^2", "r2"))
        ]
        + COST_KEYS
    )
    rows = []
    for label, key, kind in keys:
        cells = [
            num(Fact(label, _get(src, pre + key), kind, pre + key), source)
            for _, src, source, pre in cols
        ]
        rows.append([esc(label), *cells])
    out.insert(0, table(["", *(c[0] for c in cols)], rows))
    targets = list(m.get("targets") or {})
    groups = [*targets, "mean"]
    for what, k, mk in (("cosine", "cosine", "mean_cosine"), ("R^2", "r2", "mean_r2")):
        series = {
            label: [_get(src, f"{pre}targets.{t}.{k}") for t in targets] + [_get(src, pre + mk)]
            for label, src, _, pre in cols
        }
        out.append(
            figure(
                plots.grouped_bars,
                groups,
                series,
                f"{what} per target",
                what,
                alt=f"{what} side by side",
            )
        )
    return "".join(out)


def _require_details(ctx: dict) -> dict:
    d = ctx["details"]
    if not d:
        raise LookupError("no per-clip details were given (runs/<job>/eval/details.json)")
    return d


def histograms_section(m: dict, ctx: dict) -> str:
    d = _require_details(ctx)
    per_clip = {t: v["per_clip_cosine"] for t, v in d["targets"].items()}
    marks = {}
    for t in per_clip:
        marks[t] = {"this model": _get(m, f"targets.{t}.cosine")}
        if ctx["floor_metrics"]:
            marks[t]["floor"] = _get(ctx["floor_metrics"], f"targets.{t}.cosine")
        if _get(m, f"latest.targets.{t}.cosine") is not None:
            marks[t]["latest"] = _get(m, f"latest.targets.{t}.cosine")
    return figure(plots.histograms, per_clip, marks, alt="per-clip cosine histograms")


def failures_section(m: dict, ctx: dict) -> str:
    d = _require_details(ctx)
    out, ids = [], d.get("video_ids")
    for t, v in d["targets"].items():
        grid, tok = v.get("grid"), v["per_token_cosine"]
        out.append(f"<h3>{esc(t)}</h3>")
        if grid:
            if math.prod(grid) != len(tok):
                raise ValueError(f"{t}: {len(tok)} per-token values for grid {grid}")
            tt, h, w = grid
            frames = [sum(tok[i * h * w : (i + 1) * h * w]) / (h * w) for i in range(tt)]
            worst = min(range(len(tok)), key=tok.__getitem__)
            ws, bs = min(range(tt), key=frames.__getitem__), max(range(tt), key=frames.__getitem__)
            worst_num = num(
                Fact("", tok[worst], "num", f"targets.{t}.per_token_cosine.{worst}"), "details"
            )
            out.append(
                f"<p>grid (T,H,W) = {tuple(grid)}; worst temporal slice t={ws} "
                f"(mean {esc(fmt_num(frames[ws]))}), "
                f"best t={bs} (mean {esc(fmt_num(frames[bs]))}); "
                f"worst token (t,h,w) = {(worst // (h * w), worst // w % h, worst % w)} with "
                f"{worst_num}</p>"
            )
            out.append(
                figure(
                    plots.token_heatmaps,
                    tok,
                    tuple(grid),
                    f"{t}: token cosine averaged over {d.get('clips', '?')} clips, per time slice",
                    alt=f"{t} per-token cosine",
                )
            )
        else:
            out.append(
                "<p>a single global token: no grid to lay out (its per-clip cosine is in the "
                "histograms)</p>"
            )
        pc = v["per_clip_cosine"]
        low = sorted(range(len(pc)), key=pc.__getitem__)[:5]
        out.append(
            table(
                ["clip (video_id)", "clip cosine"],
                [
                    [
                        esc(ids[i] if ids and i < len(ids) else f"#{i}"),
                        num(Fact("", pc[i], "num", f"targets.{t}.per_clip_cosine.{i}"), "details"),
                    ]
                    for i in low
                ],
            )
        )
    return "".join(out)


def head_section(m: dict, ctx: dict) -> str:
    d = _require_details(ctx)
    h = d.get("head")
    if not h:
        return note("no classification head was evaluated")
    names, acc, sup = h["class_names"], h["per_class_accuracy"], h["support"]
    out = [
        facts_table(
            [
                Fact("top-1", m.get("top1"), "pct", "top1"),
                Fact("top-5", m.get("top5"), "pct", "top5"),
                Fact(
                    "mean per-class accuracy",
                    m.get("mean_class_accuracy"),
                    "pct",
                    "mean_class_accuracy",
                ),
            ]
        ),
        figure(plots.confusion_matrix, h["confusion"], names, alt="confusion matrix"),
        figure(plots.class_accuracy_bars, names, acc, alt="per-class accuracy"),
    ]
    order = sorted(
        range(len(names)), key=lambda i: (acc[i] is None, acc[i] if acc[i] is not None else 0)
    )
    rows = [
        [
            esc(names[i]),
            num(Fact("", sup[i], "int", f"head.support.{i}"), "details"),
            num(Fact("", h["confusion"][i][i], "int", f"head.confusion.{i}.{i}"), "details"),
            num(Fact("", acc[i], "pct", f"head.per_class_accuracy.{i}"), "details"),
        ]
        for i in order
    ]
    out.append(
        "<h3>Per-class accuracy (worst first)</h3>"
        + table(["class", "clips", "correct", "top-1"], rows)
    )
    return "".join(out)


def cost_section(m: dict, ctx: dict) -> str:
    c = m.get("converter") or {}
    facts = [
        Fact("converter parameters", c.get("params"), "int", "converter.params"),
        Fact("head parameters", c.get("head_params"), "int", "converter.head_params"),
    ]
    conv_facts, _ = cost_facts(m)
    out = [facts_table(facts + conv_facts)]
    given = [
        (n, v, "ms", f"backbone_latency_ms.{n}")
        for n, v in (ctx["backbone_latency_ms"] or {}).items()
    ]
    given += [
        (n, v, "gflop", f"backbone_gflops.{n}") for n, v in (ctx["backbone_gflops"] or {}).items()
    ]
    if given:
        batch = ctx["backbone_batch"]
        out.append(
            "<h3>Student and teachers, as measured by the extract stage "
            f"({esc(ctx['backbone_device'] or 'device not stated')}"
            f"{f', batch {batch}' if batch else ''})</h3>"
            + table(
                ["model", "per clip"],
                [[esc(n), num(Fact(n, v, k, key), "store")] for n, v, k, key in given],
            )
        )
    return "".join(out)


SECTIONS = [
    ("summary", "Summary", summary_section),
    ("curves", "Training curves", curves_section),
    ("side-by-side", "This model, the floor and the current latest", side_by_side_section),
    ("histograms", "Per-clip cosine", histograms_section),
    (
        "failures",
        "Where the converter fails: per-token cosine on the target grid",
        failures_section,
    ),
    ("head", "Classification head", head_section),
    ("cost", "Parameters, FLOPs and latency", cost_section),
]


def render(m: dict, ctx: dict) -> str:
    parts = []
    for anchor, title, build in SECTIONS:
        try:
            body = build(m, ctx)
        except Exception as e:  # noqa: BLE001  (a section that fails costs that section only)
            body = note(f"this section could not be drawn: {type(e).__name__}: {e}")
        parts.append(f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>')
    conv = (m.get("converter") or {}).get("name", "converter")
    nav = " · ".join(f'<a href="#{a}">{esc(t.split(":")[0])}</a>' for a, t, _ in SECTIONS)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    ckpt = esc(m.get("checkpoint", "?"))
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<title>tokconv evaluation: {esc(conv)}</title><style>{CSS}</style></head><body>
<h1>tokconv evaluation: {esc(conv)} on the {esc(m.get("split", "?"))} split</h1>
<p><small>checkpoint {ckpt} · generated {stamp} · fidelity in the standardised
teacher space · <a href="metrics.json">metrics.json</a></small></p><nav>{nav}</nav>
{"".join(parts)}</body></html>"""
