"""Multi-reference corpus BLEU through sacrebleu."""

from __future__ import annotations

from sacrebleu.metrics import BLEU

from prefix_lightning.evaluation.references import check_pairs, reference_streams


def corpus_bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU (0-100, 13a tokenization) with each hypothesis scored against all of its own references.

    Groups may differ in size (E2E): short ones are padded with None, never "" (see `reference_streams`).
    """
    check_pairs(hypotheses, references)
    # sacrebleu takes None for a missing reference (as documented) but annotates str.
    return BLEU(tokenize="13a").corpus_score(hypotheses, reference_streams(references)).score  # type: ignore[arg-type]
