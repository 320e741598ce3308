"""Aggregate a sweep folder into ``<sweep dir>/summary/``: results.csv, results.md, PNG plots and report.html.

    python -m prefix_lightning.sweeps.aggregate multirun/<sweep name> [--metric test/bleu]

Also runs at the end of every multirun (a Hydra callback). Reads the result records at any depth below the folder;
job folders without a complete record are reported as unfinished. Plots: the metric against prefix length (a line
per data size and other swept values) and against training-data size (a line per method or other swept values),
each drawn when that value was swept. A sweep of two methods over data subsets or seeds also gets their paired
comparison (``paired.py``): paired.md, paired.csv and, over training sizes, paired_<metric>_vs_training_examples.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from prefix_lightning.cli import report_errors
from prefix_lightning.sweeps import paired
from prefix_lightning.sweeps.paired_plot import plot_paired
from prefix_lightning.sweeps.plots import plot_metric
from prefix_lightning.sweeps.report import write_report
from prefix_lightning.sweeps.table import Table, summarize, write_csv, write_markdown
from prefix_lightning.training.record import RECORD_FILE, read_record
from prefix_lightning.training.resume import not_computed, run_config

log = logging.getLogger(__name__)

SUMMARY_DIR = "summary"
PAIRED_MARKDOWN = "paired.md"
# What Hydra writes into each sweep's folder.
SWEEP_CONFIG = "multirun.yaml"
# (swept key, axis label, logarithmic axis): the paper's two sweep figures.
PLOTS = (("prefix.length", "prefix length", False), ("data.train_size", "training examples", True))


def load_records(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Complete records, and the job folders (relative to ``sweep_dir``) that have none yet."""
    job_dirs = {path.parent for path in sweep_dir.rglob(".hydra")} | {
        path.parent for path in sweep_dir.rglob(RECORD_FILE)
    }
    finished, unfinished = [], []
    for job_dir in sorted(job_dirs):
        record = read_record(job_dir)
        if record is None:
            unfinished.append(str(job_dir.relative_to(sweep_dir)))
        else:
            finished.append((job_dir, record))
    names = [str(job_dir.relative_to(sweep_dir)) for job_dir, _ in finished]
    return once_each(names, comparable(finished)), unfinished


def once_each(names: Sequence[str], records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per computation, in their order: jobs whose settings differ only in ones that change nothing
    (a sweep run again with ``trainer.log_every_n_steps=5`` added names new job folders) computed the same run, and
    counted twice they would pass for two repeats. The one finished last is kept; a warning names the others."""
    latest: dict[str, int] = {}
    for index in sorted(range(len(records)), key=lambda index: str(records[index]["finished"])):
        setting = json.dumps(records[index]["overrides"], sort_keys=True)
        if setting in latest:
            log.warning(
                "%s and %s ran the same setting (they differ only in settings that change nothing): counted once, "
                "as %s, which finished last",
                names[latest[setting]],
                names[index],
                names[index],
            )
        latest[setting] = index
    kept = set(latest.values())
    return [record for index, record in enumerate(records) if index in kept]


def comparable(finished: Sequence[tuple[Path, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The records, each with ``overrides`` holding its value of every setting any run of the sweep overrode and
    that changes what a run computes (not ``data.num_workers``, ``logger``, ..., which a re-run may add): its own
    override, else its config group choice, else its composed config's value. A run that left
    ``data.train_size`` at its default trained on that default, not on "null"; one that left ``method`` alone
    trained ``prefix``."""
    keys = sorted({key for _, record in finished for key in record["overrides"] if not not_computed(key)})
    records = []
    for job_dir, record in finished:
        config = None
        values = {}
        for key in keys:
            if key in record["overrides"]:
                values[key] = record["overrides"][key]
            elif key in record.get("choices", {}):
                values[key] = record["choices"][key]
            else:
                config = config if config is not None else _composed(job_dir)
                found = OmegaConf.select(config, key, throw_on_resolution_failure=False)
                values[key] = OmegaConf.to_container(found) if OmegaConf.is_config(found) else found
        records.append({**record, "overrides": values})
    return records


def _composed(job_dir: Path) -> DictConfig:
    """The config the job's run started with (an empty one where the folder holds none)."""
    try:
        return run_config(job_dir)
    except (FileNotFoundError, ValueError):
        return OmegaConf.create({})


def headline_metric(table: Table) -> str:
    """The first test metric (what the paper reports), else the best validation value."""
    return next((name for name in table.metrics if name.startswith("test/")), table.metrics[0])


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def aggregate(sweep_dir: str | Path, metric: str | None = None) -> Path | None:
    """Write the summary of ``sweep_dir``; return its folder, or None when no run has finished."""
    sweep_dir = Path(sweep_dir)
    _refuse_a_single_run(sweep_dir)
    _refuse_several_sweeps(sweep_dir)
    records, unfinished = load_records(sweep_dir)
    if not records:
        log.warning("no finished runs (no complete %s) below %s: nothing to aggregate", RECORD_FILE, sweep_dir)
        return None
    table = summarize(records)
    metric = metric or headline_metric(table)
    if metric not in table.metrics:
        raise ValueError(f"metric {metric!r} is not in the records of {sweep_dir}; they have {table.metrics}")

    out = sweep_dir / SUMMARY_DIR
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.png"), *out.glob("paired.*")]:
        stale.unlink()
    write_csv(table, out / "results.csv")
    write_markdown(table, out / "results.md")
    plots = []
    for key, label, log_x in PLOTS:
        path = out / f"{_slug(metric)}_vs_{_slug(label)}.png"
        if plot_metric(table, key, metric, path, label, log_x):
            plots.append(path)
    comparisons = paired.compare_methods(records, table, metric)
    paired_plots = []
    if comparisons:
        paired.write_markdown(comparisons, out / PAIRED_MARKDOWN)
        paired.write_csv(comparisons, out / "paired.csv")
        path = out / f"paired_{_slug(metric)}_vs_training_examples.png"
        if plot_paired(comparisons[0], path):
            paired_plots.append(path)
    write_report(
        table, sweep_dir.resolve().name, plots, out / "report.html", len(records), unfinished, comparisons, paired_plots
    )
    log.info(
        "sweep %s: %d finished runs in %d settings%s; table,%s %d plots and report.html in %s",
        sweep_dir,
        len(records),
        len(table.rows),
        f", {len(unfinished)} unfinished" if unfinished else "",
        " paired comparison," if comparisons else "",
        len(plots) + len(paired_plots),
        out,
    )
    return out


def _refuse_a_single_run(folder: Path) -> None:
    """A run's own folder would get a one-row summary among its files (a sweep's folder holds its runs' folders,
    and Hydra's multirun.yaml even where its only job wrote into it)."""
    held = [name for name in (".hydra", RECORD_FILE) if (folder / name).exists()]
    if held and not (folder / SWEEP_CONFIG).is_file():
        raise ValueError(
            f"{folder} is a single run's folder (it holds {' and '.join(held)}), not a sweep's: its scores are in its "
            f"{RECORD_FILE}; aggregate the folder of the sweep that ran it (multirun/<sweep name>)"
        )


def _refuse_several_sweeps(folder: Path) -> None:
    """A folder above several sweeps (``multirun/``) would merge them into one table."""
    sweeps = sorted(str(path.parent.relative_to(folder)) for path in folder.glob(f"*/**/{SWEEP_CONFIG}"))
    if not (folder / SWEEP_CONFIG).is_file() and len(sweeps) > 1:
        raise ValueError(f"{folder} holds {len(sweeps)} sweeps ({', '.join(sweeps)}): aggregate each of them")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m prefix_lightning.sweeps.aggregate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder, e.g. multirun/<sweep name>")
    parser.add_argument("--metric", help="the metric to plot (default: the first test metric)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a folder")
    out = report_errors(lambda: aggregate(args.sweep_dir, args.metric))
    if out is None:
        raise SystemExit(1)
    print((out / "results.md").read_text(), end="")
    if (out / PAIRED_MARKDOWN).is_file():
        print("\n" + (out / PAIRED_MARKDOWN).read_text(), end="")
    print(f"report: {out / 'report.html'}")


if __name__ == "__main__":
    main()
