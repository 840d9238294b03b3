"""The HTML pieces of the report pages (report.html, leaderboard.html): the inline CSS, escaped
text, tagged numbers (``<span class="num" data-fmt data-source data-metric>``), tables and inline
PNG figures (or a note saying why there is none)."""

from __future__ import annotations

import html
from collections.abc import Callable

from . import plots
from .summary import Fact

CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;
max-width:1250px;color:#222;padding:0 1em}h1{font-size:1.5em}
h2{border-bottom:2px solid #4477aa;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 9px}
th{background:#f2f4f8;text-align:left}td.n,th.n{text-align:right}
.num{font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:.7em}
.card{border:1px solid #ccd;border-radius:6px;padding:.5em .9em;min-width:9em;background:#fafbfd}
.card .v{font-size:1.35em;font-weight:600}.card .l{font-size:.8em;color:#555}
.note{color:#8a4b00;background:#fff7e6;border-left:3px solid #e0a030;padding:.3em .7em;
margin:.5em 0}
.verdict{font-size:1.1em;padding:.5em .8em;border-radius:6px;background:#eef4ee;
border:1px solid #9c9}
img{max-width:100%;display:block;margin:.6em 0}small{color:#666}"""


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def num(f: Fact, source: str = "metrics") -> str:
    """A figure as a tagged span (text as is when ``f.kind`` is None)."""
    if f.kind is None:
        return esc(f.value)
    attrs = f' data-fmt="{f.kind}"'
    if f.key is not None:
        attrs += f' data-source="{source}" data-metric="{esc(f.key)}"'
    return f'<span class="num"{attrs}>{esc(f.text)}</span>'


def table(header: list[str] | None, rows: list[list[str]], numeric_from: int = 1) -> str:
    """Cells are HTML (escape text with ``esc``); columns from ``numeric_from`` align right."""
    th = "".join(
        f"<th{' class=n' if i >= numeric_from else ''}>{esc(h)}</th>"
        for i, h in enumerate(header or [])
    )
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=n' if i >= numeric_from else ''}>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table>{f'<tr>{th}</tr>' if header else ''}{body}</table>"


def facts_table(facts: list[Fact], source: str = "metrics") -> str:
    return table(None, [[esc(f.label), num(f, source)] for f in facts])


def figure(draw: Callable[..., str | None], *args, alt: str) -> str:
    """An inline PNG, or a note saying why there is none."""
    try:
        uri = draw(*args)
    except plots.PlotsUnavailable as e:
        return note(str(e))
    except Exception as e:  # noqa: BLE001  (a figure that fails costs that figure only)
        return note(f"figure '{alt}' could not be drawn: {type(e).__name__}: {e}")
    return (
        f'<img alt="{esc(alt)}" src="{uri}">' if uri else note(f"figure '{alt}': nothing to draw")
    )
