"""One entry point for every dataset's official metrics: `score(suite, hypotheses, references)`."""

from __future__ import annotations

from collections.abc import Callable

from prefix_lightning.evaluation.bleu import corpus_bleu
from prefix_lightning.evaluation.e2e_metrics import score_e2e
from prefix_lightning.evaluation.references import check_pairs
from prefix_lightning.evaluation.rouge import score_xsum
from prefix_lightning.evaluation.table_to_text import score_dart, score_webnlg


def _bleu_only(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    return {"BLEU": corpus_bleu(hypotheses, references)}


SUITES: dict[str, Callable[[list[str], list[list[str]]], dict[str, float]]] = {
    "e2e": score_e2e,
    "webnlg": score_webnlg,
    "dart": score_dart,
    "xsum": score_xsum,
    "bleu": _bleu_only,
}


# What validation scores, per test suite: the test's own metrics where they are cheap (XSum's ROUGE), else corpus BLEU
# (the full table-to-text suites start a JVM); and the metric that picks the best validation checkpoint.
VALIDATION_SUITES = {"xsum": "xsum"}
MAIN_METRICS = {"xsum": "rougel", "bleu": "bleu"}


# Metrics where less is better, by the last part of their logged name: TER counts edits, a loss is a cost.
LOWER_BETTER = ("ter", "loss")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of this logged metric is better (``test/bleu``: yes; ``test/unseen/ter``,
    ``val/loss``: no)."""
    return metric.rsplit("/", 1)[-1].lower() not in LOWER_BETTER


def validation_suite(metric_suite: str) -> str:
    """The scorers a validation of a dataset with this test ``metric_suite`` runs."""
    return VALIDATION_SUITES.get(metric_suite, "bleu")


def validation_metrics(metric_suite: str) -> dict[str, str]:
    """The names validation logs for this test ``metric_suite`` (as ``val/<key>``), each with its direction for a
    checkpoint callback or sweeper ("max" or "min")."""
    keys = {"xsum": ("rouge1", "rouge2", "rougeL"), "bleu": ("BLEU",)}[validation_suite(metric_suite)]
    names = ["val/loss", *(f"val/{key.lower()}" for key in keys)]
    return {name: "max" if higher_is_better(name) else "min" for name in names}


def main_validation_metric(metric_suite: str) -> str:
    """The validation metric that picks the best checkpoint unless the config names another: BLEU for
    table-to-text, ROUGE-L for XSum."""
    return f"val/{MAIN_METRICS[validation_suite(metric_suite)]}"


def score(metric_suite: str, hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """The official metrics of one dataset, keyed as its official script prints them.

    Suites, keys and scales (BLEU is always on 0-100, whatever scale the official script prints it on):
    - "e2e": BLEU (0-100), NIST, METEOR (0-1), ROUGE_L (0-1), CIDEr, as e2e-metrics computes them.
    - "webnlg", "dart": BLEU (0-100), METEOR (0-1), TER (0-1, lower is better), as the official scripts.
    - "xsum": rouge1, rouge2, rougeL (0-100), rouge-score F-measures with stemming.
    - "bleu": BLEU (0-100), sacrebleu with 13a tokenization (`corpus_bleu`).
    `references[i]` holds all references of `hypotheses[i]`. METEOR (and for E2E also ROUGE_L and CIDEr, which
    need the Java tokenizer) is left out with one `MetricSkippedWarning` when Java is missing or fails.
    """
    if metric_suite not in SUITES:
        raise ValueError(f"unknown metric suite {metric_suite!r}; choose one of {', '.join(SUITES)}")
    check_pairs(hypotheses, references)
    return SUITES[metric_suite](list(hypotheses), [list(refs) for refs in references])
