"""XSum ROUGE as the prefix-tuning paper computed it: Google's `rouge-score`, ROUGE-1/2/L F-measure with stemming.

The paper's script (the Hugging Face seq2seq example's `calculate_rouge`) aggregates with rouge-score's
`BootstrapAggregator` and reports the "mid" F-measure times 100. That mid is the median of 1,000 resampled means
drawn from an unseeded generator, so it wobbles around the plain mean from run to run; the plain mean reported here
is the value it estimates. ROUGE-L is sentence-level `rougeL`, not the newline-split `rougeLsum`.
"""

from __future__ import annotations

from rouge_score.rouge_scorer import RougeScorer

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def score_xsum(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean F-measure (0-100, as the paper's script prints it) per key; with several references, the best one."""
    scorer = RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for hypothesis, group in zip(hypotheses, references, strict=True):
        best = scorer.score_multi(group, hypothesis)
        for key in ROUGE_KEYS:
            totals[key] += best[key].fmeasure
    return {key: 100.0 * total / len(hypotheses) for key, total in totals.items()}
