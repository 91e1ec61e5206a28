"""Plain-text tables for the records that users print."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_count", "format_table"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns, a rule under the header.

    Example:
        >>> print(format_table(["a", "bb"], [[1, 2], [30, 4]]))
        a   bb
        --  --
        1   2
        30  4
    """
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def format_count(n: int) -> str:
    """A parameter count with thousands separators: ``7,077,888``."""
    return f"{n:,}"
