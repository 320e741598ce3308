"""One self-contained HTML page per sweep: the table and the plots (inlined), readable offline and easy to send."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from html import escape
from pathlib import Path

from prefix_lightning.sweeps.table import Table, cells, show

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; }
code { background: #f3f3f3; padding: 0 0.2em; }
img { max-width: 100%; margin: 1em 0; }
"""


def _html_table(table: Table) -> str:
    header, rows = cells(table)
    head = "".join(f"<th>{escape(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>"


def write_report(
    table: Table, title: str, plots: Sequence[Path], path: Path, runs: int, unfinished: Sequence[str] = ()
) -> None:
    parts = [
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{escape(title)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f"<p>{runs} finished runs in {len(table.rows)} settings; metrics are mean ± std over repeats.</p>",
    ]
    if table.shared:
        shared = ", ".join(f"<code>{escape(key)}={escape(show(value))}</code>" for key, value in table.shared.items())
        parts.append(f"<p>Shared by all runs: {shared}</p>")
    parts.append(_html_table(table))
    for plot in plots:
        data = base64.b64encode(plot.read_bytes()).decode("ascii")
        parts.append(f"<div><img alt='{escape(plot.stem)}' src='data:image/png;base64,{data}'></div>")
    if unfinished:
        items = "".join(f"<li><code>{escape(name)}</code></li>" for name in unfinished)
        parts.append(f"<h2>Unfinished runs ({len(unfinished)})</h2><ul>{items}</ul>")
    parts.append("</body></html>\n")
    path.write_text("\n".join(parts))
