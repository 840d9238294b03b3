"""The summary figures of an evaluation, shared by the report's summary card and the model card
(so both state the same numbers, formatted by ``pipeline.fmt``).

A ``Fact`` is one labelled figure; ``key`` is its dotted path in ``metrics`` (metrics.json) when it
is read from there, None when it is derived (a saving, a sum of given latencies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..fmt import fmt, fmt_num


@dataclass
class Fact:
    label: str
    value: Any
    kind: str | None = "num"  # a pipeline.fmt kind; None: text shown as is
    key: str | None = None

    @property
    def text(self) -> str:
        return fmt(self.value, self.kind) if self.kind else str(self.value)


def teacher_names(metrics: dict) -> list[str]:
    return list(metrics.get("targets") or {})


def target_rows(metrics: dict) -> list[tuple[str, list[Fact]]]:
    """Per target: cosine, 5th-percentile clip cosine, R^2, MSE (those present)."""
    rows = []
    for t, m in (metrics.get("targets") or {}).items():
        cols = [
            Fact("cosine", m.get("cosine"), "num", f"targets.{t}.cosine"),
            Fact(
                "cosine, worst 5% of clips", m.get("cosine_p05"), "num", f"targets.{t}.cosine_p05"
            ),
            Fact("R^2", m.get("r2"), "num", f"targets.{t}.r2"),
            Fact("MSE", m.get("mse"), "num", f"targets.{t}.mse"),
        ]
        rows.append((t, cols))
    return rows


def converter_timing(metrics: dict, backbone_device: str | None) -> tuple[float | None, str, int]:
    """(ms per clip, device, batch) of the converter timed as comparably as metrics.json allows
    with backbones timed on ``backbone_device``: "like_backbones" (their batch, their device),
    else batch 1 on CPU (backbones on CPU) or on the evaluation device."""
    conv = metrics.get("converter") or {}
    like = conv.get("like_backbones") or {}
    if backbone_device and like.get("device") == backbone_device:
        return like.get("latency_ms_per_clip"), backbone_device, int(like.get("batch") or 1)
    if backbone_device == "cpu":
        return conv.get("latency_ms_per_clip_cpu", conv.get("latency_ms_per_clip")), "cpu", 1
    return conv.get("latency_ms_per_clip"), conv.get("latency_device") or "device?", 1


def latency_saving(
    metrics: dict, backbone_latency_ms: dict | None, backbone_device: str | None = None
) -> tuple[dict | None, str | None]:
    """From measured backbone latencies: ({"full": student + teachers, "mine": student +
    converter, "converter", "teachers", "saving", "share", "vs_teachers", "device", "batch"}, None)
    in ms per clip, or (None, why not)."""
    if not backbone_latency_ms:
        return None, (
            "no measured student/teacher latency given: the saving in latency is not computed"
        )
    teachers = teacher_names(metrics)
    missing = [n for n in ("student", *teachers) if backbone_latency_ms.get(n) is None]
    mine, dev, batch = converter_timing(metrics, backbone_device)
    if missing or mine is None:
        what = ", ".join(missing or ["the converter"])
        return None, f"latency saving left out: no figure for {what}"
    if backbone_device is not None and backbone_device != dev:
        return None, (
            f"latency saving left out: the converter was timed on {dev}, the student and "
            f"teachers on {backbone_device}"
        )
    teach = sum(float(backbone_latency_ms[t]) for t in teachers)
    student = float(backbone_latency_ms["student"])
    full, total = student + teach, student + float(mine)
    return {
        "full": full,
        "mine": total,
        "converter": float(mine),
        "teachers": teach,
        "saving": full - total,
        "share": (full - total) / full,
        "vs_teachers": float(mine) / teach,
        "device": dev,
        "batch": batch,
    }, None


def cost_facts(
    metrics: dict,
    backbone_latency_ms: dict | None = None,
    backbone_gflops: dict | None = None,
    backbone_device: str | None = None,
    backbone_batch: int | None = None,
) -> tuple[list[Fact], list[str]]:
    """The converter's cost, and (from measured backbone figures, when given) the saving of
    student + converter against student + the teachers it replaces. Returns (facts, notes)."""
    conv = metrics.get("converter") or {}
    dev = conv.get("latency_device")
    facts = [
        Fact(
            f"converter latency per clip ({dev or 'device?'}, batch 1)",
            conv.get("latency_ms_per_clip"),
            "ms",
            "converter.latency_ms_per_clip",
        )
    ]
    if dev != "cpu":
        facts.append(
            Fact(
                "converter latency per clip (CPU, batch 1)",
                conv.get("latency_ms_per_clip_cpu"),
                "ms",
                "converter.latency_ms_per_clip_cpu",
            )
        )
    like = conv.get("like_backbones") or {}
    if like:
        facts.append(
            Fact(
                f"converter latency per clip ({like.get('device')}, batch {like.get('batch')}: "
                f"as the backbones were timed)",
                like.get("latency_ms_per_clip"),
                "ms",
                "converter.like_backbones.latency_ms_per_clip",
            )
        )
    facts.append(
        Fact(
            "converter GFLOP per clip",
            conv.get("gflops_per_clip"),
            "gflop",
            "converter.gflops_per_clip",
        )
    )
    notes = []
    teachers = teacher_names(metrics)
    n = len(teachers)
    lat, why = latency_saving(metrics, backbone_latency_ms, backbone_device)
    if lat is None:
        notes.append(why)
    else:
        facts += [
            Fact(f"student + {n} teachers (latency)", lat["full"], "ms"),
            Fact("student + converter (latency)", lat["mine"], "ms"),
            Fact("saving per clip (latency)", lat["saving"], "ms"),
            Fact("saving (latency, share of student + teachers)", lat["share"], "pct"),
            Fact("converter / the teachers it replaces (latency)", lat["vs_teachers"], "pct"),
        ]
        notes.append(
            f"converter timed at batch {lat['batch']} on {lat['device']}; student and teachers "
            f"measured by the extract stage's model actor on "
            f"{backbone_device or 'a device not stated'}"
            + (f" at batch {backbone_batch}" if backbone_batch else "")
        )
    if not backbone_gflops:
        notes.append("no measured student/teacher GFLOP given: the saving in GFLOP is not computed")
    else:
        missing = [m for m in ("student", *teachers) if backbone_gflops.get(m) is None]
        mine = conv.get("gflops_per_clip")
        if missing or mine is None:
            notes.append(
                f"GFLOP saving left out: no figure for {', '.join(missing or ['the converter'])}"
            )
        else:
            teach = sum(float(backbone_gflops[t]) for t in teachers)
            full, total = float(backbone_gflops["student"]) + teach, float(
                backbone_gflops["student"]
            ) + float(mine)
            facts += [
                Fact(f"student + {n} teachers (GFLOP)", full, "gflop"),
                Fact("student + converter (GFLOP)", total, "gflop"),
                Fact("saving per clip (GFLOP)", full - total, "gflop"),
                Fact("saving (GFLOP, share of student + teachers)", (full - total) / full, "pct"),
                Fact("converter / the teachers it replaces (GFLOP)", float(mine) / teach, "pct"),
            ]
    return facts, notes


def promotion_decision(
    metrics: dict,
    export_result: dict | None = None,
    metric: str = "mean_cosine",
    higher_is_better: bool = True,
) -> tuple[str, str]:
    """(verdict, reason): export's decision when ``export_result`` (run_export's return) is given,
    else what the comparison with ``metrics["latest"]`` (the current latest, evaluated on this
    split) predicts."""
    from ..export import is_better, metric_value

    if export_result:
        m, v, ver = (
            export_result.get("metric", metric),
            export_result.get("value"),
            export_result.get("version"),
        )
        prev = export_result.get("previous") or {}
        pv, on = export_result.get("previous_value"), export_result.get("compared_on")
        if export_result.get("promoted"):
            if not prev:
                return (
                    f"promoted: {ver} is latest",
                    f"first version of the model ({m} {fmt_num(v)})",
                )
            return (
                f"promoted: {ver} is latest",
                (
                    f"{m} {fmt_num(v)} beats {fmt_num(pv)} of the previous latest "
                    f"{prev.get('version')} ({on})"
                ),
            )
        return (
            f"not promoted: {ver} published, latest stays {prev.get('version')}",
            f"{m} {fmt_num(v)} does not beat {fmt_num(pv)} ({on})",
        )
    better_word = "higher" if higher_is_better else "lower"
    try:
        value = metric_value(metrics, metric)
    except (KeyError, TypeError) as e:
        return "not exported yet", f"the promotion metric is not available: {e}"
    latest = metrics.get("latest")
    if not latest:
        return (
            "not exported yet: it would become latest",
            f"no model is exported yet ({metric} {fmt_num(value)})",
        )
    ver = latest.get("version")
    if "skipped" in latest:
        return "not exported yet", f"the current latest {ver} was not compared: {latest['skipped']}"
    try:
        old = metric_value(latest, metric)
    except (KeyError, TypeError):
        return "not exported yet", f"the current latest {ver} has no {metric} on this split"
    verdict = (
        "would be promoted" if is_better(value, old, higher_is_better) else "would NOT be promoted"
    )
    return (
        f"not exported yet: {verdict}",
        (
            f"{metric} {fmt_num(value)} against {fmt_num(old)} for the current latest {ver} "
            f"on this split ({better_word} is better; a tie keeps latest)"
        ),
    )


def headline_facts(metrics: dict) -> list[Fact]:
    conv = metrics.get("converter") or {}
    return [
        Fact("converter", conv.get("name", "?"), None),
        Fact("clips evaluated", metrics.get("clips"), "int", "clips"),
        Fact("mean cosine", metrics.get("mean_cosine"), "num", "mean_cosine"),
        Fact("mean R^2", metrics.get("mean_r2"), "num", "mean_r2"),
        Fact("head top-1", metrics.get("top1"), "pct", "top1"),
        Fact("head top-5", metrics.get("top5"), "pct", "top5"),
        Fact("converter parameters", conv.get("params"), "int", "converter.params"),
    ]


def model_card_summary(
    metrics: dict,
    *,
    report_url: str | None = None,
    backbone_latency_ms=None,
    backbone_gflops=None,
    backbone_device: str | None = None,
    backbone_batch: int | None = None,
    export_result: dict | None = None,
    metric: str = "mean_cosine",
    higher_is_better: bool = True,
) -> str:
    """Markdown for the exported model card: the report's summary card, same figures and format.
    Without ``export_result`` (the card is written before export decides) the promotion line says
    where the decision is recorded and what the evaluation's comparison predicted."""
    lines = [f"## Evaluation summary ({metrics.get('split', '?')} split)", "", "| | |", "|---|---|"]
    lines += [f"| {f.label} | {f.text} |" for f in headline_facts(metrics)]
    rows = target_rows(metrics)
    if rows:
        lines += [
            "",
            "| target | " + " | ".join(f.label for f in rows[0][1]) + " |",
            "|---|" + "---|" * len(rows[0][1]),
        ]
        lines += [f"| {t} | " + " | ".join(f.text for f in cols) + " |" for t, cols in rows]
    facts, notes = cost_facts(
        metrics, backbone_latency_ms, backbone_gflops, backbone_device, backbone_batch
    )
    lines += ["", "| cost | |", "|---|---|"] + [f"| {f.label} | {f.text} |" for f in facts]
    lines += [""] + [f"_{n}._" for n in notes]
    verdict, reason = promotion_decision(metrics, export_result, metric, higher_is_better)
    if export_result:
        lines += ["", f"**Promotion:** {verdict}: {reason}."]
    else:
        predicted = verdict.removeprefix("not exported yet").lstrip(": ") or "no prediction"
        lines += [
            "",
            (
                f"**Promotion:** decided by the export stage once this version is published "
                f"(`latest.json` and the report record it); the evaluation predicted: "
                f"{predicted}: {reason}."
            ),
        ]
    if report_url:
        lines += [
            "",
            (
                f"Full evaluation report (curves, floor and latest side by side, per-token "
                f"maps, confusion matrix): [report.html]({report_url})"
            ),
        ]
    return "\n".join(lines) + "\n"


__all__ = [
    "Fact",
    "converter_timing",
    "cost_facts",
    "headline_facts",
    "latency_saving",
    "model_card_summary",
    "promotion_decision",
    "target_rows",
]
