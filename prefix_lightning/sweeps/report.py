"""One self-contained HTML page per sweep: the table and the plots (inlined), readable offline and easy to send."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from html import escape
from pathlib import Path

from prefix_lightning.sweeps import paired
from prefix_lightning.sweeps.paired import Paired
from prefix_lightning.sweeps.table import Table, cells, show

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; }
code { background: #f3f3f3; padding: 0 0.2em; }
img { max-width: 100%; margin: 1em 0; }
"""


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{escape(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>"


def _html_image(plot: Path) -> str:
    data = base64.b64encode(plot.read_bytes()).decode("ascii")
    return f"<div><img alt='{escape(plot.stem)}' src='data:image/png;base64,{data}'></div>"


def _paired_section(comparisons: Sequence[Paired], plots: Sequence[Path]) -> list[str]:
    first = comparisons[0]
    parts = [
        f"<h2>Paired comparison: {escape(first.treatment)} − {escape(first.baseline)}</h2>",
        f"<p>{escape(paired.explanation(first))}</p>",
    ]
    parts += [_html_image(plot) for plot in plots]
    for comparison in comparisons:
        parts += [f"<h3>{escape(paired.title(comparison))}</h3>", _html_table(*paired.cells(comparison))]
    return [*parts, "<h2>All settings</h2>"]


def write_report(
    table: Table,
    title: str,
    plots: Sequence[Path],
    path: Path,
    runs: int,
    unfinished: Sequence[str] = (),
    comparisons: Sequence[Paired] = (),
    paired_plots: Sequence[Path] = (),
) -> None:
    """The page: the paired comparison first when there is one (it answers the sweep's question), then the table
    of every setting and the plots."""
    parts = [
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{escape(title)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f"<p>{runs} finished runs in {len(table.rows)} settings; metrics are mean ± std over repeats.</p>",
    ]
    if comparisons:
        parts += _paired_section(comparisons, paired_plots)
    if table.shared:
        shared = ", ".join(f"<code>{escape(key)}={escape(show(value))}</code>" for key, value in table.shared.items())
        parts.append(f"<p>Shared by all runs: {shared}</p>")
    parts.append(_html_table(*cells(table)))
    parts += [_html_image(plot) for plot in plots]
    if unfinished:
        items = "".join(f"<li><code>{escape(name)}</code></li>" for name in unfinished)
        parts.append(f"<h2>Unfinished runs ({len(unfinished)})</h2><ul>{items}</ul>")
    parts.append("</body></html>\n")
    path.write_text("\n".join(parts))
