"""Scorers for generated text: `score(suite, ...)` for each dataset's official metrics, `corpus_bleu` for quick BLEU."""

from prefix_lightning.evaluation.bleu import corpus_bleu
from prefix_lightning.evaluation.java import MetricSkippedWarning
from prefix_lightning.evaluation.suites import (
    SUITES,
    higher_is_better,
    main_validation_metric,
    score,
    validation_metrics,
    validation_suite,
)
from prefix_lightning.evaluation.tasks import task_metrics, task_validation_metrics

__all__ = [
    "SUITES",
    "MetricSkippedWarning",
    "corpus_bleu",
    "higher_is_better",
    "main_validation_metric",
    "score",
    "task_metrics",
    "task_validation_metrics",
    "validation_metrics",
    "validation_suite",
]
