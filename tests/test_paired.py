"""The paired comparison of two methods (the low-data question): Student's t quantiles and intervals with known
answers, and the aggregation of a made-up sweep folder into the paired table, CSV, plot and report."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import pytest

from prefix_lightning.sweeps.aggregate import aggregate, main
from prefix_lightning.sweeps.intervals import mean_interval, t_quantile
from tests.helpers.sweeps import make_record, write_sweep


def exact_t_two_degrees(confidence: float) -> float:
    """df = 2: P(|T| <= t) = t / sqrt(2 + t^2), solved for t."""
    return confidence * math.sqrt(2) / math.sqrt(1 - confidence**2)


@pytest.mark.parametrize(
    ("confidence", "df", "expected"),
    [
        (0.95, 1, math.tan(0.475 * math.pi)),  # Cauchy: closed form, 12.7062...
        (0.99, 1, math.tan(0.495 * math.pi)),
        (0.95, 2, exact_t_two_degrees(0.95)),  # 4.3027...
        (0.90, 2, exact_t_two_degrees(0.90)),
        # Printed tables (six digits): odd and even df, the two sums of the CDF.
        (0.95, 3, 3.182446),
        (0.95, 4, 2.776445),
        (0.95, 8, 2.306004),
        (0.95, 9, 2.262157),
        (0.95, 30, 2.042272),
        (0.95, 1000, 1.962339),  # -> the normal quantile 1.959964 as df grows
    ],
)
def test_t_quantile_known_values(confidence: float, df: int, expected: float) -> None:
    assert t_quantile(confidence, df) == pytest.approx(expected, abs=2e-6)


@pytest.mark.parametrize(("confidence", "df"), [(0.0, 3), (1.0, 3), (0.95, 0), (0.95, 2.5)])
def test_t_quantile_refuses_bad_arguments(confidence: float, df: float) -> None:
    with pytest.raises(ValueError, match="confidence|degrees of freedom"):
        t_quantile(confidence, df)


def test_interval_of_known_differences() -> None:
    # Differences 2, 4, 6: mean 4, std 2, standard error 2 / sqrt(3), t(0.975, df 2) exact.
    interval = mean_interval([2.0, 4.0, 6.0])
    half = exact_t_two_degrees(0.95) * 2 / math.sqrt(3)  # 4.9683
    assert (interval.n, interval.mean, interval.std) == (3, 4.0, 2.0)
    assert (interval.low, interval.high) == (pytest.approx(4 - half), pytest.approx(4 + half))
    # Two values: df 1, the Cauchy quantile; mean 2, std sqrt(2), standard error 1.
    two = mean_interval([1.0, 3.0])
    assert (two.low, two.high) == (pytest.approx(2 - 12.7062047), pytest.approx(2 + 12.7062047))
    single = mean_interval([5.0])
    assert (single.mean, single.std, single.low, single.high) == (5.0, None, None, None)
    with pytest.raises(ValueError, match="at least one"):
        mean_interval([])


# A made-up low-data sweep: sizes 50/100/200 x subsets 1-3, one seed, prefix and full, with per-subset test BLEU
# whose differences (prefix minus full) are known: 2, 4, 6 at 50; 1, 1, 1 at 100; -3, -1, 1 at 200.
FULL = {50: [50.0, 52.0, 54.0], 100: [60.0, 58.0, 59.0], 200: [66.0, 64.0, 65.0]}
DIFFERENCES = {50: [2.0, 4.0, 6.0], 100: [1.0, 1.0, 1.0], 200: [-3.0, -1.0, 1.0]}


def lowdata_records() -> list[dict]:
    records = []
    for size, scores in FULL.items():
        for subset, (full, difference) in enumerate(zip(scores, DIFFERENCES[size], strict=True), start=1):
            for method, bleu in (("prefix", full + difference), ("full", full)):
                overrides = {"method": method, "data.train_size": size, "data.subset_seed": subset, "seed": 1}
                record = make_record(overrides, bleu=bleu)
                record["test"]["test/rougel"] = bleu / 100
                records.append(record)
    # A prefix run whose full partner has not finished: in the main table, left out of the pairs.
    records.append(make_record({"method": "prefix", "data.train_size": 500, "data.subset_seed": 1, "seed": 1}, 70.0))
    return records


def read_paired_csv(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path) as file:
        return {(row["metric"], row["data.train_size"]): row for row in csv.DictReader(file)}


def test_paired_table_of_a_lowdata_sweep(tmp_path: Path) -> None:
    write_sweep(tmp_path, lowdata_records())
    out = aggregate(tmp_path)
    rows = read_paired_csv(out / "paired.csv")
    sizes = ("50", "100", "200", "all")  # the unpaired size-500 run makes no row
    assert set(rows) == {(metric, size) for metric in ("test/bleu", "test/rougel") for size in sizes}

    half = exact_t_two_degrees(0.95) * 2 / math.sqrt(3)
    fifty = rows[("test/bleu", "50")]
    assert fifty["pairs"] == "3" and fifty["prefix_ahead"] == "3"
    assert float(fifty["full_mean"]) == pytest.approx(52.0) and float(fifty["full_std"]) == pytest.approx(2.0)
    assert float(fifty["prefix_mean"]) == pytest.approx(56.0) and float(fifty["prefix_std"]) == pytest.approx(4.0)
    assert float(fifty["difference_mean"]) == pytest.approx(4.0)
    assert float(fifty["difference_std"]) == pytest.approx(2.0)
    assert float(fifty["interval_low"]) == pytest.approx(4 - half)
    assert float(fifty["interval_high"]) == pytest.approx(4 + half)

    constant = rows[("test/bleu", "100")]  # the same difference on every subset: a zero-width interval
    assert (float(constant["interval_low"]), float(constant["interval_high"])) == (pytest.approx(1.0),) * 2
    behind = rows[("test/bleu", "200")]
    assert behind["prefix_ahead"] == "1" and float(behind["difference_mean"]) == pytest.approx(-1.0)
    assert float(behind["interval_low"]) == pytest.approx(-1 - half)

    # All 9 pairs together: df 8.
    everything = [d for differences in DIFFERENCES.values() for d in differences]
    overall = rows[("test/bleu", "all")]
    assert overall["pairs"] == "9" and overall["prefix_ahead"] == "7"
    assert float(overall["difference_mean"]) == pytest.approx(statistics.fmean(everything))
    half_all = 2.306004 * statistics.stdev(everything) / 3
    assert float(overall["interval_high"]) == pytest.approx(statistics.fmean(everything) + half_all, abs=1e-5)
    assert float(rows[("test/rougel", "50")]["difference_mean"]) == pytest.approx(0.04)

    markdown = (out / "paired.md").read_text()
    assert markdown.index("### test/bleu: prefix − full") < markdown.index("### test/rougel: prefix − full")
    assert "| data.train_size | pairs | prefix | full | prefix − full | 95% interval | prefix ahead |" in markdown
    interval = f"{4 - half:.2f} to {4 + half:.2f}"
    assert f"| 50 | 3 | 56.00 ± 4.00 | 52.00 ± 2.00 | 4.00 ± 2.00 | {interval} | 3 of 3 |" in markdown
    # Each metric to the decimals of its scale: ROUGE-L's small differences show.
    assert "| 50 | 3 | 0.5600 ± 0.0400 | 0.5200 ± 0.0200 | 0.0400 ± 0.0200 | -0.0097 to 0.0897 | 3 of 3 |" in markdown
    assert "| all | 9 |" in markdown

    plot = out / "paired_test_bleu_vs_training_examples.png"
    assert plot.read_bytes().startswith(b"\x89PNG")
    html = (out / "report.html").read_text()
    assert html.index("Paired comparison: prefix − full") < html.index("All settings")
    assert "alt='paired_test_bleu_vs_training_examples'" in html
    assert html.count("src='data:image/png;base64,") == 2  # the paired plot and test/bleu vs training examples


def test_aggregate_command_prints_the_paired_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_sweep(tmp_path, lowdata_records())
    main([str(tmp_path)])
    assert "### test/bleu: prefix − full" in capsys.readouterr().out


def test_the_baseline_is_full_fine_tuning_else_the_first_name(tmp_path: Path) -> None:
    records = [
        make_record({"method": method, "data.subset_seed": subset}, bleu=bleu + subset)
        for method, bleu in (("lora", 10.0), ("prefix", 20.0))
        for subset in (1, 2)
    ]
    write_sweep(tmp_path, records)
    header = (aggregate(tmp_path) / "paired.md").read_text()
    assert "### test/bleu: prefix − lora" in header and "| 2 | 20.00" not in header
    assert "| 2 | 21.50 ± 0.71 | 11.50 ± 0.71 | 10.00 ± 0.00 | 10.00 to 10.00 | 2 of 2 |" in header
    assert not list((tmp_path / "summary").glob("paired_*.png"))  # one setting: nothing to plot against


def test_a_tied_pair_puts_neither_method_ahead_and_one_setting_has_no_row_over_all(tmp_path: Path) -> None:
    records = [
        make_record(
            {"method": method, "data.subset_seed": subset}, bleu=20.0 + (difference if method == "prefix" else 0)
        )
        for subset, difference in ((1, 0.0), (2, 2.0), (3, -1.0))
        for method in ("prefix", "full")
    ]
    write_sweep(tmp_path, records)
    with open(aggregate(tmp_path) / "paired.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["metric"] for row in rows] == ["test/bleu"]  # one setting: no row over all settings
    assert (rows[0]["pairs"], rows[0]["prefix_ahead"]) == ("3", "1")


@pytest.mark.parametrize(
    "sweep",
    [
        # Two methods, but no repeats to pair over.
        [{"method": method, "data.train_size": size} for method in ("prefix", "full") for size in (50, 100)],
        # Three methods.
        [{"method": method, "data.subset_seed": s} for method in ("prefix", "full", "lora") for s in (1, 2)],
        # Repeats of one method.
        [{"method": "prefix", "data.subset_seed": subset} for subset in (1, 2, 3)],
    ],
)
def test_no_paired_comparison_unless_two_methods_over_repeats(tmp_path: Path, sweep: list[dict]) -> None:
    write_sweep(tmp_path, [make_record(overrides, bleu=float(i)) for i, overrides in enumerate(sweep)])
    out = aggregate(tmp_path)
    (out / "paired.md").write_text("stale")  # from an earlier aggregation of another set of runs
    aggregate(tmp_path)
    assert not list(out.glob("paired*"))
    assert "Paired comparison" not in (out / "report.html").read_text()


def test_runs_are_compared_by_what_they_computed_not_by_what_their_command_lines_said(tmp_path: Path) -> None:
    """A baseline added to a sweep of the default method (whose runs name no method), a re-run adding a setting that
    changes nothing (data.num_workers), and an explicit null against a default that is not null."""
    records = [make_record({"data.subset_seed": subset}, bleu=20.0 + subset) for subset in (1, 2)]
    records[0]["choices"]["method"] = records[1]["choices"]["method"] = "prefix"
    records += [
        make_record({"method": "full", "data.subset_seed": 1, "data.num_workers": 0}, bleu=11.0),
        make_record({"method": "full", "data.subset_seed": 2}, bleu=12.0),
        make_record({"method": "full", "data.subset_seed": 3, "data.train_size": None}, bleu=5.0),
    ]
    write_sweep(tmp_path, records)
    for record in records[:4]:  # their runs trained on the data config's own size: 16
        started = tmp_path / record["run"] / ".hydra" / "started_config.yaml"
        started.parent.mkdir(parents=True)
        started.write_text("data:\n  train_size: 16\n")
    out = aggregate(tmp_path)
    table = (out / "results.md").read_text()
    assert "data.num_workers" not in table
    assert "| null | full | 1 |" in table and "| 16 | full | 2 |" in table and "| 16 | prefix | 2 |" in table
    assert "### test/bleu: prefix − full" in (out / "paired.md").read_text()


def test_ahead_counts_the_better_score_where_lower_is_better(tmp_path: Path) -> None:
    """TER counts edits and a loss is a cost: a method with the lower one is ahead, not the one with the higher."""
    records = []
    for subset, (prefix_ter, full_ter) in enumerate(((0.51, 0.41), (0.52, 0.42), (0.40, 0.43)), start=1):
        for method, ter in (("prefix", prefix_ter), ("full", full_ter)):
            record = make_record({"method": method, "data.subset_seed": subset}, bleu=30.0 + subset)
            record["test"]["test/ter"] = ter
            record.update(optimized_metric="val/loss", best_val=ter)
            records.append(record)
    write_sweep(tmp_path, records)
    with open(aggregate(tmp_path, metric="val/loss_best") / "paired.csv") as file:
        ahead = {row["metric"]: row["prefix_ahead"] for row in csv.DictReader(file)}
    assert ahead == {"val/loss_best": "1", "test/bleu": "0", "test/ter": "1"}


def test_a_job_run_again_under_a_name_that_changes_nothing_counts_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sweep run again with trainer.log_every_n_steps added names new job folders for the same computations: the
    table counted such a run as one more repeat of its setting, and the paired comparison kept one of the two."""
    records = [
        make_record({"method": method, "data.subset_seed": subset}, bleu=bleu + subset)
        for method, bleu in (("prefix", 50.0), ("full", 40.0))
        for subset in (1, 2)
    ]
    again = make_record({"method": "prefix", "data.subset_seed": 1, "trainer.log_every_n_steps": 5}, bleu=51.0)
    again["finished"] = "2026-01-02T00:00:00+00:00"
    write_sweep(tmp_path, [again, *records])
    table = (aggregate(tmp_path) / "results.md").read_text()
    assert "| prefix | 2 | 52.50 ± 0.71 | 51.50 ± 0.71 |" in table
    assert f"{records[0]['run']} and {again['run']} ran the same setting" in caplog.text
