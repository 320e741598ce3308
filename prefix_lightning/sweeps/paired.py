"""The paired comparison of the two methods of a sweep: the paper's low-data question, "does prefix-tuning beat
fine-tuning on the same data?", answered with an interval.

Two runs form a pair when they differ only in the method: same training size, same data subset, same seed (all
their overrides but ``method`` are equal). Per setting of the other swept values (e.g. per training size), over its
pairs: each method's mean ± std, and the per-pair difference (one method minus the other) with its mean, std and
95% t-interval. With several settings, a last row takes all pairs together (the paper's "on average over sizes").

It applies to a sweep whose ``method`` axis has exactly two values and which repeats settings (``data.subset_seed``
or ``seed`` swept). The difference is the other method minus ``full`` (the paper's baseline) when ``full`` is one of
the two, else the alphabetically second minus the first.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefix_lightning.evaluation import higher_is_better
from prefix_lightning.sweeps.intervals import Interval, mean_interval
from prefix_lightning.sweeps.table import (
    REPEAT_KEYS,
    Stat,
    Table,
    format_number,
    format_stat,
    markdown_lines,
    record_metrics,
    scale_decimals,
    show,
    sort_key,
)

METHOD_KEY = "method"
BASELINE = "full"
CONFIDENCE = 0.95
ALL_SETTINGS = "all"


@dataclass(frozen=True)
class PairedRow:
    setting: dict[str, Any]  # the other swept values these pairs share; {} for the row over all settings
    treatment: Stat
    baseline: Stat
    difference: Interval  # of treatment minus baseline, per pair
    ahead: int  # pairs in which the treatment scores better (higher, or lower for TER and a loss)


@dataclass(frozen=True)
class Paired:
    metric: str
    treatment: str
    baseline: str
    keys: list[str]  # the swept keys that tell settings apart (method and the repeat keys aside)
    rows: list[PairedRow]
    overall: PairedRow | None  # all pairs together, when there are several settings

    @property
    def table_rows(self) -> list[PairedRow]:
        """The rows as tables show them: one per setting, then the overall one."""
        return [*self.rows, *([self.overall] if self.overall else [])]


def compared_methods(records: Sequence[dict[str, Any]]) -> tuple[str, str] | None:
    """(treatment, baseline) when the sweep compares two methods over repeats, else None."""
    methods = {record["overrides"].get(METHOD_KEY) for record in records}
    repeated = any(len({json.dumps(record["overrides"].get(key)) for record in records}) > 1 for key in REPEAT_KEYS)
    if len(methods) != 2 or None in methods or not repeated:
        return None
    first, second = sorted(methods)
    return (first, second) if second == BASELINE else (second, first)


def _pairs(records: Sequence[dict[str, Any]], treatment: str, baseline: str) -> list[tuple[dict, dict]]:
    """(treatment record, baseline record) of every pair; a run whose partner has not finished is left out."""
    by_rest: dict[str, dict[str, dict[str, Any]]] = {}
    for record in records:
        rest = {key: value for key, value in record["overrides"].items() if key != METHOD_KEY}
        by_rest.setdefault(json.dumps(rest, sort_keys=True), {})[record["overrides"][METHOD_KEY]] = record
    return [(runs[treatment], runs[baseline]) for runs in by_rest.values() if treatment in runs and baseline in runs]


def _row(setting: dict[str, Any], scores: Sequence[tuple[float, float]], higher_better: bool) -> PairedRow:
    differences = [treatment - baseline for treatment, baseline in scores]
    better = (difference > 0 if higher_better else difference < 0 for difference in differences)
    return PairedRow(
        setting,
        Stat.of([treatment for treatment, _ in scores]),
        Stat.of([baseline for _, baseline in scores]),
        mean_interval(differences, CONFIDENCE),
        sum(better),
    )


def compare_methods(records: Sequence[dict[str, Any]], table: Table, metric: str) -> list[Paired]:
    """One comparison per metric (``metric`` first, then the other test metrics); [] unless the sweep compares
    two methods over repeats."""
    methods = compared_methods(records)
    if methods is None:
        return []
    pairs = _pairs(records, *methods)
    keys = [key for key in table.keys if key != METHOD_KEY]
    metrics = [metric, *(name for name in table.metrics if name.startswith("test/") and name != metric)]
    comparisons = []
    for name in metrics:
        higher_better = higher_is_better(name.removesuffix("_best"))  # the table's "val/loss_best"
        groups: dict[str, tuple[dict[str, Any], list[tuple[float, float]]]] = {}
        for treatment, baseline in pairs:
            treated, base = record_metrics(treatment).get(name), record_metrics(baseline).get(name)
            if treated is not None and base is not None:
                setting = {key: treatment["overrides"].get(key) for key in keys}
                groups.setdefault(json.dumps(setting), (setting, []))[1].append((treated, base))
        if not groups:
            continue
        rows = sorted(
            (_row(*group, higher_better) for group in groups.values()),
            key=lambda row: [sort_key(row.setting[key]) for key in keys],
        )
        everything = [scores for _, group in groups.values() for scores in group]
        overall = _row({}, everything, higher_better) if len(rows) > 1 else None
        comparisons.append(Paired(name, *methods, keys, rows, overall))
    return comparisons


def _setting_cells(paired: Paired, row: PairedRow) -> list[str]:
    if row is paired.overall:
        return [ALL_SETTINGS] * len(paired.keys)
    return [show(row.setting[key]) for key in paired.keys]


def _interval_text(interval: Interval, places: int) -> str:
    if interval.low is None or interval.high is None:
        return ""
    return f"{format_number(interval.low, places)} to {format_number(interval.high, places)}"  # not "[1,234, 2,345]"


def cells(paired: Paired) -> tuple[list[str], list[list[str]]]:
    """Header and rows as text: shared by the Markdown file and the HTML report."""
    header = [
        *paired.keys,
        "pairs",
        paired.treatment,
        paired.baseline,
        f"{paired.treatment} − {paired.baseline}",
        f"{CONFIDENCE:.0%} interval",
        f"{paired.treatment} ahead",
    ]
    places = scale_decimals(mean for row in paired.table_rows for mean in (row.treatment.mean, row.baseline.mean))
    rows = []
    for row in paired.table_rows:
        difference = row.difference
        rows.append(
            [
                *_setting_cells(paired, row),
                str(difference.n),
                format_stat(row.treatment.mean, row.treatment.std, places),
                format_stat(row.baseline.mean, row.baseline.std, places),
                format_stat(difference.mean, difference.std, places),
                _interval_text(difference, places),
                f"{row.ahead} of {difference.n}",
            ]
        )
    return header, rows


def title(paired: Paired) -> str:
    return f"{paired.metric}: {paired.treatment} − {paired.baseline}"


def explanation(paired: Paired) -> str:
    """What the columns mean, in one paragraph (Markdown and HTML)."""
    treatment, baseline = paired.treatment, paired.baseline
    return (
        f"Pairs: a {treatment} run and a {baseline} run with the same swept values but the method (same training "
        f"data subset, same seed). {treatment}, {baseline}: mean ± std over the pairs. {treatment} − {baseline}: "
        f"mean ± std of the per-pair differences. {CONFIDENCE:.0%} interval: Student's t interval of the mean "
        f"difference (none for a single pair); an interval that excludes 0 is a difference these pairs can tell "
        f"apart from noise. {treatment} ahead: pairs in which {treatment} scores better (higher; lower for TER "
        "and a loss)." + (" Row all: every pair of every setting together." if paired.overall else "")
    )


def write_markdown(comparisons: Sequence[Paired], path: Path) -> None:
    lines = [explanation(comparisons[0]), ""]
    for paired in comparisons:
        lines += [f"### {title(paired)}", "", *markdown_lines(*cells(paired)), ""]
    path.write_text("\n".join(lines))


def write_csv(comparisons: Sequence[Paired], path: Path) -> None:
    """Full precision, one row per (metric, setting); the row over all settings has "all" in the key columns."""
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        first = comparisons[0]
        writer.writerow(
            [
                "metric",
                *first.keys,
                "pairs",
                f"{first.treatment}_mean",
                f"{first.treatment}_std",
                f"{first.baseline}_mean",
                f"{first.baseline}_std",
                "difference_mean",
                "difference_std",
                "interval_low",
                "interval_high",
                f"{first.treatment}_ahead",
            ]
        )
        for paired in comparisons:
            for row in paired.table_rows:
                difference = row.difference
                writer.writerow(
                    [
                        paired.metric,
                        *_setting_cells(paired, row),
                        difference.n,
                        row.treatment.mean,
                        _blank(row.treatment.std),
                        row.baseline.mean,
                        _blank(row.baseline.std),
                        difference.mean,
                        _blank(difference.std),
                        _blank(difference.low),
                        _blank(difference.high),
                        row.ahead,
                    ]
                )


def _blank(value: float | None) -> float | str:
    return "" if value is None else value
