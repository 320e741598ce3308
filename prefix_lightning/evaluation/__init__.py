"""Scorers for generated text: `score(suite, ...)` for each dataset's official metrics, `corpus_bleu` for quick BLEU."""

from prefix_lightning.evaluation.bleu import corpus_bleu
from prefix_lightning.evaluation.java import MetricSkippedWarning
from prefix_lightning.evaluation.suites import (
    SUITES,
    main_validation_metric,
    score,
    validation_metrics,
    validation_suite,
)

__all__ = [
    "SUITES",
    "MetricSkippedWarning",
    "corpus_bleu",
    "main_validation_metric",
    "score",
    "validation_metrics",
    "validation_suite",
]
