"""The report's figures: matplotlib (Agg, no pyplot state) rendered to inline PNG data URIs.

Every function returns a ``data:image/png;base64,...`` string, or None when it has nothing to
draw; ``PlotsUnavailable`` says matplotlib is not installed (the report then shows its tables
and says what is missing).
"""

from __future__ import annotations

import base64
import io
import math

from ..fmt import fmt_num

MISSING_MPL = "plots need matplotlib: pip install tokconv-pipeline[report]"
COLORS = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb"]
DPI = 100


class PlotsUnavailable(RuntimeError):
    pass


def _figure(w: float, h: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PlotsUnavailable(MISSING_MPL) from e
    return Figure(figsize=(w, h), dpi=DPI, layout="constrained")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def line_panels(panels: list[tuple[str, dict[str, tuple[list, list]], str, bool]]) -> str | None:
    """Small multiples of line plots. panels: [(title, {label: (xs, ys)}, xlabel, log_y)]."""
    panels = [p for p in panels if any(len(xs) for xs, _ in p[1].values())]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(4.2 * cols, 3.0 * rows)
    from matplotlib.ticker import MaxNLocator  # importable: _figure found matplotlib

    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (title, series, xlabel, log_y) in zip(axes.flat, panels, strict=False):
        for i, (label, (xs, ys)) in enumerate(series.items()):
            marker = "o" if len(xs) <= 30 else None
            ax.plot(xs, ys, label=label, color=COLORS[i % len(COLORS)], marker=marker, ms=3, lw=1.2)
        if log_y and all(y > 0 for _, ys in series.values() for y in ys):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and epochs are whole
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    return _png(fig)


def grouped_bars(
    groups: list[str], models: dict[str, list[float | None]], title: str, ylabel: str
) -> str | None:
    """One bar per model in each group (e.g. one group per target). None values leave a gap."""
    if not groups or not models:
        return None
    fig = _figure(max(5.0, 1.3 * len(groups) * max(1, len(models)) / 2 + 2), 3.4)
    ax = fig.subplots()
    width = 0.8 / len(models)
    for i, (label, values) in enumerate(models.items()):
        xs = [g + (i - (len(models) - 1) / 2) * width for g in range(len(groups))]
        pts = [
            (x, v) for x, v in zip(xs, values, strict=True) if v is not None and math.isfinite(v)
        ]
        if not pts:
            continue
        bars = ax.bar(
            [p[0] for p in pts],
            [p[1] for p in pts],
            width=width * 0.95,
            label=label,
            color=COLORS[i % len(COLORS)],
        )
        ax.bar_label(bars, labels=[fmt_num(p[1], 3) for p in pts], fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.axhline(0, color="#444", lw=0.6)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=8)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.margins(y=0.15)
    return _png(fig)


def histograms(per_clip: dict[str, list[float]], marks: dict[str, dict[str, float]]) -> str | None:
    """One histogram of per-clip cosine per target; ``marks[target][label]`` draws a vertical line
    (this model's mean, the floor's, the latest's)."""
    per_clip = {t: v for t, v in per_clip.items() if v}
    if not per_clip:
        return None
    fig = _figure(4.0 * len(per_clip), 3.0)
    axes = fig.subplots(1, len(per_clip), squeeze=False)[0]
    for ax, (t, vals) in zip(axes, per_clip.items(), strict=True):
        ax.hist(vals, bins=min(40, max(5, len(vals) // 2)), color=COLORS[0], alpha=0.85)
        for i, (label, v) in enumerate(marks.get(t, {}).items()):
            if v is not None and math.isfinite(v):
                ax.axvline(
                    v,
                    color=COLORS[(i + 1) % len(COLORS)],
                    lw=1.5,
                    ls="--",
                    label=f"{label} {fmt_num(v)}",
                )
        ax.set_title(f"{t}: per-clip cosine ({len(vals)} clips)", fontsize=10)
        ax.set_xlabel("mean token cosine of a clip", fontsize=8)
        ax.set_ylabel("clips", fontsize=8)
        ax.tick_params(labelsize=7)
        if marks.get(t):
            ax.legend(fontsize=7)
    return _png(fig)


def token_heatmaps(
    values: list[float], grid: tuple[int, int, int], title: str, max_panels: int = 16
) -> str | None:
    """Per-token values (T*H*W, row-major) as one H x W heat map per temporal slice; more than
    ``max_panels`` slices are averaged in consecutive groups. One colour scale for all panels."""
    import numpy as np

    t, h, w = grid
    vol = np.asarray(values, dtype=np.float64).reshape(t, h, w)
    group = math.ceil(t / max_panels)
    starts = list(range(0, t, group))
    maps = [vol[s : s + group].mean(0) for s in starts]
    cols = min(8, len(maps))
    rows = math.ceil(len(maps) / cols)
    fig = _figure(max(5.5, 1.6 * cols + 1.0), 1.75 * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False)
    lo, hi = float(np.nanmin(vol)), float(np.nanmax(vol))
    im = None
    for ax, s, m in zip(axes.flat, starts, maps, strict=False):
        im = ax.imshow(m, vmin=lo, vmax=hi, cmap="viridis", interpolation="nearest")
        label = f"t={s}" if group == 1 else f"t={s}-{min(s + group, t) - 1}"
        ax.set_title(f"{label}: {fmt_num(float(m.mean()), 3)}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(maps) :]:
        ax.set_visible(False)
    fig.colorbar(im, ax=axes, shrink=0.8, label="token cosine")
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def confusion_matrix(counts: list[list[int]], names: list[str]) -> str | None:
    """Row-normalised confusion matrix (rows: true class); counts in cells up to 30 classes."""
    import numpy as np

    c = np.asarray(counts, dtype=np.float64)
    k = c.shape[0]
    if k == 0:
        return None
    rows = c.sum(1, keepdims=True)
    frac = np.divide(c, rows, out=np.zeros_like(c), where=rows > 0)
    size = min(12.0, max(3.5, 0.35 * k + 2))
    fig = _figure(size + 1.2, size)
    ax = fig.subplots()
    im = ax.imshow(frac, vmin=0, vmax=1, cmap="Blues", interpolation="nearest")
    if k <= 60:
        ax.set_xticks(range(k), names, rotation=90, fontsize=7)
        ax.set_yticks(range(k), names, fontsize=7)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if c[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{int(c[i, j]):,}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if frac[i, j] > 0.5 else "black",
                    )
    ax.set_xlabel("predicted (top-1)", fontsize=8)
    ax.set_ylabel("true class", fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")
    return _png(fig)


def class_accuracy_bars(names: list[str], acc: list[float | None]) -> str | None:
    """Per-class accuracy, worst first (classes without clips left out); up to 60 classes."""
    pts = sorted(((a, n) for n, a in zip(names, acc, strict=True) if a is not None))
    if not pts or len(pts) > 60:
        return None
    fig = _figure(max(4.0, 0.3 * len(pts) + 1.5), 3.0)
    ax = fig.subplots()
    ax.bar(range(len(pts)), [100 * a for a, _ in pts], color=COLORS[0])
    ax.set_xticks(range(len(pts)), [n for _, n in pts], rotation=90, fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_ylabel("top-1 accuracy (%)", fontsize=8)
    ax.set_title("per-class accuracy, worst first", fontsize=10)
    return _png(fig)


def pareto(
    xs: list[float | None],
    ys: list[float | None],
    labels: list[str],
    front: list[bool],
    xlabel: str,
    ylabel: str,
    title: str,
) -> str | None:
    """Cost (x) against fidelity (y), one labelled point per preset; the Pareto-optimal ones
    (``front``) filled and joined in cost order. Points without both values are left out."""
    pts = [
        (x, y, n, f)
        for x, y, n, f in zip(xs, ys, labels, front, strict=True)
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
    ]
    if not pts:
        return None
    fig = _figure(6.0, 4.0)
    ax = fig.subplots()
    on = sorted((p for p in pts if p[3]), key=lambda p: p[0])
    if len(on) > 1:
        ax.plot([p[0] for p in on], [p[1] for p in on], color=COLORS[0], lw=1, ls="--", zorder=1)
    for x, y, name, f in pts:
        ax.scatter(
            [x],
            [y],
            s=40,
            zorder=2,
            color=COLORS[0] if f else "white",
            edgecolors=COLORS[0] if f else COLORS[1],
            linewidths=1.5,
        )
        ax.annotate(name, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    return _png(fig)
