"""Numbers for people: the one set of formatters used by the report, the model card and the
leaderboard, so a figure reads the same everywhere.

    fmt_num(0.8333333333333334) -> "0.8333"     fmt_num(2.7434560000187957) -> "2.743"
    fmt_num(12345.6)            -> "12,350"     fmt_num(0.0000123456)       -> "1.235e-05"
    fmt_int(1234567)            -> "1,234,567"  fmt_ms(0.41234)             -> "0.4123 ms"
    fmt_pct(0.8333)             -> "83.3%"      fmt_gflop(3.1416)           -> "3.142 GFLOP"

Significant digits (4 by default, 3 for percentages) with thousands separators; ``None`` ->
"n/a", NaN -> "NaN", infinities -> "inf" / "-inf". ``FORMATTERS`` maps a kind name to its
function (the report tags each number with its kind, so a test can re-format the source value).
"""
from __future__ import annotations

import math
from collections.abc import Callable

SIG = 4
MISSING = "n/a"


def _special(x) -> str | None:
    if x is None:
        return MISSING
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise TypeError(f"expected a number, got {type(x).__name__} {x!r}")
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
    return None


def fmt_num(x: float | None, sig: int = SIG) -> str:
    """``sig`` significant digits; integers parts grouped by thousands; exponent below 1e-4."""
    s = _special(x)
    if s is not None:
        return s
    if x == 0:
        return "0"
    r = float(f"{float(x):.{sig}g}")  # round first: 999.96 -> 1000 must print as "1,000"
    mag = math.floor(math.log10(abs(r)))
    if mag >= sig - 1:
        return f"{r:,.0f}"
    if mag >= -4:
        return f"{r:.{sig - 1 - mag}f}"
    return f"{r:.{sig - 1}e}"


def fmt_int(x: float | None) -> str:
    """A count, rounded to an integer, with thousands separators."""
    s = _special(x)
    return s if s is not None else f"{round(x):,}"


def fmt_ms(x: float | None, sig: int = SIG) -> str:
    """Milliseconds."""
    s = _special(x)
    return s if s is not None else f"{fmt_num(x, sig)} ms"


def fmt_pct(x: float | None, sig: int = 3) -> str:
    """A fraction (0.833) as a percentage ("83.3%")."""
    s = _special(x)
    return s if s is not None else f"{fmt_num(100.0 * x, sig)}%"


def fmt_gflop(x: float | None, sig: int = SIG) -> str:
    """Giga floating-point operations (2 per multiply-add)."""
    s = _special(x)
    return s if s is not None else f"{fmt_num(x, sig)} GFLOP"


FORMATTERS: dict[str, Callable[..., str]] = {
    "num": fmt_num, "int": fmt_int, "ms": fmt_ms, "pct": fmt_pct, "gflop": fmt_gflop}


def fmt(x, kind: str = "num") -> str:
    """Format ``x`` with the formatter named ``kind`` (a key of ``FORMATTERS``)."""
    try:
        f = FORMATTERS[kind]
    except KeyError:
        raise KeyError(f"fmt: unknown kind {kind!r} (known: {', '.join(FORMATTERS)})") from None
    return f(x)


__all__ = ["FORMATTERS", "MISSING", "fmt", "fmt_gflop", "fmt_int", "fmt_ms", "fmt_num", "fmt_pct"]
