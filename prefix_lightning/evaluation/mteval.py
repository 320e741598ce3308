"""BLEU and NIST exactly as the E2E challenge's `e2e-metrics` computes them with its Python mteval-v13a port.

Written by hand because no library computes NIST, and sacrebleu's BLEU parts from e2e-metrics' on short outputs.
Both metrics follow `measure_scores.py -p` (the mode the prefix-tuning paper ran):
- mteval-v13a tokenization (sacrebleu's `13a` tokenizer, identical to e2e-metrics' regexes), then lowercasing;
  an empty segment becomes one empty token, as there;
- each hypothesis is scored against all references of its group (one E2E meaning representation);
- BLEU-4: clipped n-gram hits against the per-n-gram maximum over references, brevity penalty against the closest
  reference length (ties go to the shorter one), and e2e-metrics' quirks kept: candidate n-gram counts are
  `len - n + 1` even when negative, and zero counts are floored (hits at 1e-15, totals at 1e-9) instead of
  making the score 0;
- NIST-5: information weights from the n-gram counts summed over all references of the whole corpus, divided by
  the hypotheses' n-gram counts, times NIST's length penalty against the summed per-group mean reference length.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

BLEU_ORDER = 4
NIST_ORDER = 5
# mteval-v13a: the length penalty is 0.5 when the output is 2/3 of the reference length.
NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2
_TOKENIZER = Tokenizer13a()


class ShortOutputWarning(UserWarning):
    """Outputs too short for e2e-metrics' n-gram counts: its BLEU and NIST overstate the corpus."""


def tokenize(text: str) -> list[str]:
    """mteval-v13a tokens, lowercased. `split(" ")`, not `split()`: e2e-metrics counts "" as one token."""
    return _TOKENIZER(text).lower().split(" ")


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def mteval_bleu_nist(hypotheses: list[str], references: list[list[str]]) -> tuple[float, float]:
    """(BLEU on e2e-metrics' 0-1 scale, NIST) of the corpus; the caller checks the argument shapes."""
    bleu_hits = [0] * BLEU_ORDER
    candidate_counts = [0] * NIST_ORDER  # per order: sum of len(hypothesis) - n + 1, as e2e-metrics counts them
    closest_lengths = 0
    nist_hits: list[Counter[tuple[str, ...]]] = [Counter() for _ in range(NIST_ORDER)]
    reference_counts: Counter[tuple[str, ...]] = Counter()  # every reference n-gram of the corpus, () = all tokens
    mean_reference_lengths = 0.0
    short_outputs = 0

    for hypothesis, group in zip(hypotheses, references, strict=True):
        hyp = tokenize(hypothesis)
        short_outputs += len(hyp) < NIST_ORDER - 1
        refs = [tokenize(reference) for reference in group]
        for n in range(1, NIST_ORDER + 1):
            ref_ngrams = [_ngrams(ref, n) for ref in refs]
            max_ref: Counter[tuple[str, ...]] = Counter()
            for counts in ref_ngrams:
                max_ref |= counts
                reference_counts.update(counts)
            clipped = _ngrams(hyp, n) & max_ref
            nist_hits[n - 1].update(clipped)
            candidate_counts[n - 1] += len(hyp) - n + 1
            if n <= BLEU_ORDER:
                bleu_hits[n - 1] += sum(clipped.values())
        closest_lengths += min((abs(len(ref) - len(hyp)), len(ref)) for ref in refs)[1]
        reference_counts[()] += sum(len(ref) for ref in refs)
        mean_reference_lengths += sum(len(ref) for ref in refs) / len(refs)

    _warn_short(short_outputs, len(hypotheses))
    return (
        _bleu(bleu_hits, candidate_counts[:BLEU_ORDER], closest_lengths),
        _nist(nist_hits, candidate_counts, reference_counts, mean_reference_lengths),
    )


def _warn_short(short: int, total: int) -> None:
    """Say where the kept quirk moves the scores: an output shorter than NIST's order counts negative n-grams,
    which shrink the totals that the hits are divided by (two empty outputs of three make BLEU 11585)."""
    if short:
        warnings.warn(
            f"{short} of {total} outputs have fewer than {NIST_ORDER - 1} tokens: e2e-metrics counts "
            "their n-grams as negative, which inflates BLEU and NIST (kept here as the official script computes them)",
            ShortOutputWarning,
            stacklevel=3,
        )


def _bleu(hits: list[int], totals: list[int], reference_length: int) -> float:
    output_length = totals[0]
    brevity = 1.0
    if output_length <= reference_length:
        brevity = math.exp(1.0 - reference_length / (output_length or 1e-5))
    log_precision = sum(math.log(max(hit, 1e-15) / max(total, 1e-9)) for hit, total in zip(hits, totals, strict=True))
    return brevity * math.exp(log_precision / len(hits))


def _nist(
    hits: list[Counter[tuple[str, ...]]],
    totals: list[int],
    reference_counts: Counter[tuple[str, ...]],
    mean_reference_lengths: float,
) -> float:
    score = 0.0
    for order_hits, total in zip(hits, totals, strict=True):
        information = sum(
            count * math.log2(reference_counts[ngram[:-1]] / reference_counts[ngram])
            for ngram, count in order_hits.items()
        )
        # e2e-metrics divides by zero here when no hypothesis is long enough for this order; count it as 0.
        score += information / total if total else 0.0
    ratio = totals[0] / mean_reference_lengths
    if ratio >= 1:
        return score
    if ratio <= 0:
        return 0.0
    return score * math.exp(-NIST_BETA * math.log(ratio) ** 2)
