"""Markdown tables and number formatting shared by the bench and parity reports."""

from __future__ import annotations

from typing import Any, Sequence


def fmt(x: Any, digits: int = 3) -> str:
    """Compact human form: None -> '-', floats with ``digits`` significant digits."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if x != x:
            return "nan"
        if x == 0:
            return "0"
        if abs(x) < 1e-3 or abs(x) >= 1e7:
            return f"{x:.{max(digits - 1, 1)}e}"
        if abs(x) >= 10 ** digits:
            return f"{x:.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(str(v).ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)
