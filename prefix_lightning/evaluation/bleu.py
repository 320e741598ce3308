"""Multi-reference corpus BLEU through sacrebleu."""

from __future__ import annotations

from sacrebleu.metrics import BLEU


def corpus_bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU (0-100, 13a tokenization) with each hypothesis scored against all of its own references.

    E2E groups have different numbers of references. sacrebleu takes references as parallel streams (stream k
    holds the k-th reference of every hypothesis) and drops `None` entries per segment, so short groups are
    padded with None. Padding with "" would be wrong: sacrebleu keeps empty strings as zero-length references,
    which changes the closest reference length and so the brevity penalty.
    """
    if not hypotheses:
        raise ValueError("corpus_bleu needs at least one hypothesis")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if any(not refs for refs in references):
        raise ValueError("every hypothesis needs at least one reference")
    width = max(len(refs) for refs in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    return BLEU(tokenize="13a").corpus_score(hypotheses, streams).score
