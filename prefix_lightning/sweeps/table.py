"""A sweep's results as a table: one row per setting, each metric as mean ± std over that setting's repeats.

A setting is a combination of the swept values (the overrides that differ between runs); runs that differ only in
their seeds (``REPEAT_KEYS``) are repeats of one setting. Written as CSV (full precision) and Markdown.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefix_lightning.numbers import is_number

REPEAT_KEYS = ("seed", "data.subset_seed")


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float | None  # sample standard deviation; None for a single run

    @classmethod
    def of(cls, numbers: Sequence[float]) -> Stat:
        return cls(statistics.fmean(numbers), statistics.stdev(numbers) if len(numbers) > 1 else None)


@dataclass(frozen=True)
class Row:
    setting: dict[str, Any]
    runs: int
    stats: dict[str, Stat]


@dataclass(frozen=True)
class Table:
    keys: list[str]  # the swept keys that tell settings apart
    shared: dict[str, Any]  # overrides common to all runs
    metrics: list[str]
    rows: list[Row]


def record_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A record's numbers, named as in the table: ``<val metric>_best``, the test metrics, cost."""
    values = {
        f"{record['optimized_metric']}_best": record["best_val"],
        **record["test"],
        "trainable_params": record["trainable_params"],
        "tokens_per_s": record["tokens_per_s"],
        "wall_time_s": record["wall_time_s"],
    }
    return {name: float(value) for name, value in values.items() if value is not None}


def sort_key(value: Any) -> tuple[int, Any]:
    """Numbers in numeric order, after a missing value and before text."""
    if value is None:
        return (0, 0)
    if is_number(value):
        return (1, value)
    return (2, json.dumps(value))


def show(value: Any) -> str:
    """A value as it is written on Hydra's command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(show(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{show(item)}" for key, item in value.items()) + "}"
    return str(value)


def summarize(records: Sequence[dict[str, Any]]) -> Table:
    all_keys = sorted({key for record in records for key in record["overrides"]})
    seen = {key: {json.dumps(record["overrides"].get(key)) for record in records} for key in all_keys}
    keys = [key for key in all_keys if len(seen[key]) > 1 and key not in REPEAT_KEYS]
    shared = {key: records[0]["overrides"].get(key) for key in all_keys if len(seen[key]) == 1}

    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        setting = {key: record["overrides"].get(key) for key in keys}
        groups.setdefault(json.dumps(setting), []).append(record)

    metrics: list[str] = []
    for record in records:
        metrics += [name for name in record_metrics(record) if name not in metrics]
    rows = []
    for members in groups.values():
        values = [record_metrics(record) for record in members]
        stats = {}
        for name in metrics:
            numbers = [value[name] for value in values if name in value]
            if numbers:
                stats[name] = Stat.of(numbers)
        rows.append(Row({key: members[0]["overrides"].get(key) for key in keys}, len(members), stats))
    rows.sort(key=lambda row: [sort_key(row.setting[key]) for key in keys])
    return Table(keys, shared, metrics, rows)


def decimals(value: float) -> int:
    """Four significant digits, within 2 to 4 decimals: BLEU 65.61, a loss 1.234, METEOR 0.4423; thousands whole."""
    if abs(value) >= 1000:
        return 0
    if value == 0:
        return 2
    return min(4, max(2, 3 - math.floor(math.log10(abs(value)))))


def format_number(value: float, places: int | None = None) -> str:
    """To the decimals of :func:`decimals`, or to ``places`` decimals where given."""
    return f"{value:,.{decimals(value) if places is None else places}f}"


def format_stat(mean: float, std: float | None, places: int | None = None) -> str:
    """The text "mean ± std" (the std to the mean's decimals, or to ``places``: "2,781 ± 682"), or the mean alone
    for a single run."""
    places = decimals(mean) if places is None else places
    return format_number(mean, places) + ("" if std is None else f" ± {format_number(std, places)}")


def scale_decimals(means: Iterable[float]) -> int:
    """The decimals of a metric's column, set by its largest mean: every number of one metric (its means, spreads,
    differences) to the same decimals, a BLEU difference of 4 written 4.00 as BLEU is."""
    return decimals(max((abs(mean) for mean in means), default=0.0))


def cells(table: Table) -> tuple[list[str], list[list[str]]]:
    """Header and rows as text, "mean ± std" per metric: shared by the Markdown table and the HTML report."""
    header = [*table.keys, "runs", *table.metrics]
    places = {
        name: scale_decimals(row.stats[name].mean for row in table.rows if name in row.stats) for name in table.metrics
    }
    rows = []
    for row in table.rows:
        stats = {name: row.stats.get(name) for name in table.metrics}
        numbers = [
            "" if stat is None else format_stat(stat.mean, stat.std, places[name]) for name, stat in stats.items()
        ]
        rows.append([*(show(row.setting[key]) for key in table.keys), str(row.runs), *numbers])
    return header, rows


def write_csv(table: Table, path: Path) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(
            [*table.keys, "runs", *(f"{name}_{part}" for name in table.metrics for part in ("mean", "std"))]
        )
        for row in table.rows:
            numbers: list[str | float] = []
            for name in table.metrics:
                stat = row.stats.get(name)
                numbers += ["", ""] if stat is None else [stat.mean, "" if stat.std is None else stat.std]
            writer.writerow([*(show(row.setting[key]) for key in table.keys), row.runs, *numbers])


def markdown_lines(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table; a ``|`` inside a cell (a swept text value) is escaped, or it would split the cell."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *(line(row) for row in rows)]


def write_markdown(table: Table, path: Path) -> None:
    lines = markdown_lines(*cells(table))
    if table.shared:
        lines += [
            "",
            "Shared by all runs: " + ", ".join(f"`{key}={show(value)}`" for key, value in table.shared.items()),
        ]
    path.write_text("\n".join(lines) + "\n")
