"""A sweep's metric against one swept value (e.g. prefix length), one line per combination of the other swept values
(e.g. data size, method), with the standard deviation over repeats as error bars."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from prefix_lightning.numbers import is_number
from prefix_lightning.sweeps.table import Row, Table, show


def plot_metric(table: Table, x_key: str, metric: str, path: Path, x_label: str, log_x: bool = False) -> bool:
    """Write the PNG; False (and no file) unless ``x_key`` was swept over at least two numbers."""
    if x_key not in table.keys:
        return False
    points = [row for row in table.rows if is_number(row.setting[x_key]) and metric in row.stats]
    xs = sorted({row.setting[x_key] for row in points})
    if len(xs) < 2:
        return False
    line_keys = [key for key in table.keys if key != x_key]
    lines: dict[str, list[Row]] = {}
    for row in points:
        lines.setdefault(", ".join(show(row.setting[key]) for key in line_keys), []).append(row)

    # A Figure without pyplot: no global backend or state, safe in any process.
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axes = figure.add_subplot()
    for label, rows in lines.items():
        rows.sort(key=lambda row: row.setting[x_key])
        stats = [row.stats[metric] for row in rows]
        axes.errorbar(
            [row.setting[x_key] for row in rows],
            [stat.mean for stat in stats],
            yerr=[stat.std or 0.0 for stat in stats],
            marker="o",
            capsize=3,
            label=label or None,
        )
    if log_x:
        axes.set_xscale("log")
        axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xticks(xs, [show(x) for x in xs])
    axes.set_xlabel(x_label)
    repeated = any(row.runs > 1 for row in points)
    axes.set_ylabel(f"{metric} (mean ± std)" if repeated else metric)
    axes.set_title(f"{metric} vs {x_label}")
    axes.grid(alpha=0.3)
    if line_keys:
        axes.legend(title=", ".join(line_keys), fontsize="small")
    figure.savefig(path, dpi=120)
    return True
