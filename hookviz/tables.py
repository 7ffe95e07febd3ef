"""Aligned text tables and number formatting for what commands print (layers, stats, trace)."""

from __future__ import annotations

import math
from collections.abc import Sequence

SEPARATOR = "  "


def format_table(
    rows: Sequence[Sequence[str]], *, right: Sequence[int] = (), min_widths: dict[int, int] | None = None
) -> str:
    """Rows of cells (the first row is the header) as aligned lines.

    Columns listed in ``right`` are right-aligned, the others left-aligned;
    ``min_widths`` maps a column to its narrowest width. Lines carry no
    trailing spaces, so the last column needs no padding.
    """
    if not rows:
        return ""
    columns = max(len(row) for row in rows)
    cells = [list(row) + [""] * (columns - len(row)) for row in rows]
    minimum = min_widths or {}
    widths = [max([len(row[i]) for row in cells] + [minimum.get(i, 0)]) for i in range(columns)]
    aligned_right = set(right)
    lines = []
    for row in cells:
        parts = [
            cell.rjust(width) if i in aligned_right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append(SEPARATOR.join(parts).rstrip())
    return "\n".join(lines)


def json_float(value: float) -> float | None:
    """``value`` for JSON: NaN and infinities become None (strict JSON has no such numbers)."""
    return value if math.isfinite(value) else None


def short_number(value: float | None, empty: str = "") -> str:
    """Four significant digits; ``nan`` for NaN; ``empty`` for None."""
    if value is None:
        return empty
    return "nan" if math.isnan(value) else f"{value:.4g}"
