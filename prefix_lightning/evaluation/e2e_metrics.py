"""The five E2E NLG Challenge metrics, computed as the official `e2e-metrics` script (`measure_scores.py -p`) does.

- BLEU and NIST: its Python port of mteval-v13a (`mteval.py`), on the raw texts.
- METEOR, ROUGE_L, CIDEr: its copy of the COCO caption evaluation, on texts lowercased and tokenized by the Stanford
  PTBTokenizer with punctuation dropped. METEOR is the official 1.5 jar; ROUGE_L (LCS F-measure with beta 1.2,
  best precision and best recall over the references, averaged over hypotheses) and CIDEr come from
  `pycocoevalcap`, the same code. The COCO "CIDEr" is CIDEr-D (clipped counts, Gaussian length penalty with
  sigma 6), with document frequencies taken from the references of the scored corpus itself: score the whole test
  set at once, a CIDEr on a subset is not comparable.

Java is needed for the tokenizer and for METEOR. Without it, METEOR, ROUGE_L and CIDEr are left out with one
`MetricSkippedWarning`: ROUGE_L and CIDEr on another tokenization would silently differ from the official numbers.
"""

from __future__ import annotations

from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from prefix_lightning.evaluation.java import JavaUnavailable, meteor, ptb_tokenize, warn_skipped
from prefix_lightning.evaluation.mteval import mteval_bleu_nist


def score_e2e(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU (0-100; e2e-metrics prints it on 0-1), NIST, METEOR (0-1), ROUGE_L (0-1), CIDEr (about 0-10).

    Keys and order as e2e-metrics prints them; one hypothesis per E2E meaning representation, with all its
    references. The caller checks the argument shapes.
    """
    bleu, nist = mteval_bleu_nist(hypotheses, references)
    scores = {"BLEU": 100.0 * bleu, "NIST": nist}
    try:
        flat = ptb_tokenize([reference for group in references for reference in group])
        tokenized_hypotheses = ptb_tokenize(hypotheses)
    except JavaUnavailable as err:
        warn_skipped(["METEOR", "ROUGE_L", "CIDEr"], err)
        return scores
    tokenized_references, start = [], 0
    for group in references:
        tokenized_references.append(flat[start : start + len(group)])
        start += len(group)

    try:
        scores["METEOR"] = meteor(tokenized_hypotheses, tokenized_references)
    except JavaUnavailable as err:
        warn_skipped(["METEOR"], err)
    gts = dict(enumerate(tokenized_references))
    res = {i: [hypothesis] for i, hypothesis in enumerate(tokenized_hypotheses)}
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores
