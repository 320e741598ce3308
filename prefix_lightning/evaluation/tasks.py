"""Scores of a run over several tasks (``data=multi``): each task with its own suite, and the mean over the tasks of
what they all report, which is what such a run optimizes when every task is validated alike."""

from __future__ import annotations

from collections.abc import Mapping

from prefix_lightning.evaluation.suites import main_validation_metric, validation_metrics


def task_metrics(by_task: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Each task's metrics under ``<task>/<key>``, and for each key that every task reports (seen/unseen subsets
    aside) its mean over the tasks under ``<key>``: e.g. BLEU when every task is table-to-text."""
    metrics = {f"{task}/{key}": value for task, scores in by_task.items() for key, value in scores.items()}
    shared = set.intersection(*(set(scores) for scores in by_task.values())) if by_task else set()
    for key in sorted(key for key in shared if "/" not in key):
        metrics[key] = sum(scores[key] for scores in by_task.values()) / len(by_task)
    return metrics


def task_validation_metrics(suites: Mapping[str, str]) -> tuple[dict[str, str], str | None]:
    """What validation logs for tasks with these test suites (names as ``val/...`` with their direction, see
    :func:`task_metrics`), and the metric that picks the best checkpoint: the tasks' common main metric, None
    when their main metrics differ (the run must name one)."""
    per_task = {task: validation_metrics(suite) for task, suite in suites.items()}
    logged = {"val/loss": "min"}
    for task, names in per_task.items():
        logged |= {f"val/{task.lower()}/{name[4:]}": mode for name, mode in names.items() if name != "val/loss"}
    shared = set.intersection(*(set(names) for names in per_task.values()))
    logged |= {name: mode for name, mode in next(iter(per_task.values())).items() if name in shared}
    mains = {main_validation_metric(suite) for suite in suites.values()}
    return logged, mains.pop() if len(mains) == 1 else None
