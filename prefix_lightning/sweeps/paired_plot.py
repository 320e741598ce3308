"""The paired comparison against training-data size, in the form of the paper's Figure 3: the metric per method
with error bars (std over the pairs' subsets and seeds), and beside it the per-pair difference with its interval."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from prefix_lightning.numbers import is_number
from prefix_lightning.sweeps.paired import CONFIDENCE, Paired
from prefix_lightning.sweeps.table import show

SIZE_KEY = "data.train_size"


def plot_paired(paired: Paired, path: Path) -> bool:
    """Write the PNG; False (and no file) unless the settings are training sizes, at least two of them."""
    rows = [row for row in paired.rows if is_number(row.setting.get(SIZE_KEY))]
    if paired.keys != [SIZE_KEY] or len(rows) < 2:
        return False
    sizes = [row.setting[SIZE_KEY] for row in rows]

    # A Figure without pyplot: no global backend or state, safe in any process.
    figure = Figure(figsize=(10, 4.2), layout="constrained")
    scores, differences = figure.subplots(1, 2, sharex=True)
    for method, stats in (
        (paired.treatment, [row.treatment for row in rows]),
        (paired.baseline, [row.baseline for row in rows]),
    ):
        scores.errorbar(
            sizes,
            [stat.mean for stat in stats],
            yerr=[stat.std or 0.0 for stat in stats],
            marker="o",
            capsize=3,
            label=method,
        )
    scores.set_ylabel(f"{paired.metric} (mean ± std)")
    scores.set_title(f"{paired.metric} vs training examples")
    scores.legend(title="method", fontsize="small")

    intervals = [row.difference for row in rows]
    half_widths = [0.0 if interval.high is None else interval.high - interval.mean for interval in intervals]
    differences.errorbar(
        sizes, [interval.mean for interval in intervals], yerr=half_widths, marker="o", capsize=3, color="black"
    )
    differences.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    differences.set_ylabel(f"{paired.treatment} − {paired.baseline} ({paired.metric})")
    differences.set_title(f"paired difference, mean and {CONFIDENCE:.0%} interval")

    for axes in (scores, differences):
        axes.set_xscale("log")
        axes.xaxis.set_minor_locator(NullLocator())
        axes.set_xticks(sizes, [show(size) for size in sizes])
        axes.set_xlabel("training examples")
        axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)
    return True
