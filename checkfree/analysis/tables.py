"""
Tables
======

Markdown tables of the benchmarks through ``tabulate`` (GitHub pipe format), so no script builds one by
hand: headers and rows in, the table's text out.
"""

from __future__ import annotations

from collections.abc import Sequence

from tabulate import tabulate


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; cells are written as given (format numbers before)."""
    return tabulate([list(r) for r in rows], headers=list(headers), tablefmt="github", disable_numparse=True) + "\n"
