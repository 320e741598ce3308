"""WebNLG 2017 and DART scores as the official scripts print them: the `evaluation/` folder of the DART repository,
which bundles the WebNLG 2017 challenge evaluation and which the prefix-tuning paper ran for both datasets.

What those scripts do, and what is mirrored here:
- Text normalization, applied to references and outputs alike: split off every non-word character
  (Python's `re.split(r"(\\W)")`), collapse whitespace, lowercase; WebNLG also transliterates to ASCII with
  `unidecode` (outputs: before lowercasing, references: after, as the challenge script does). The DART script only
  ships references normalized this way and leaves system outputs as given, so outputs are normalized here too: the
  scores equal the official ones for an output file written in the references' style.
- BLEU: `multi-bleu.perl` (4-gram, no smoothing, closest reference length with ties to the shorter) against the
  first three references, missing ones being empty lines of the reference files (which count as empty references);
  computed with sacrebleu on the normalized text without further tokenization. WebNLG runs it with `-lc`.
- METEOR 1.5 (`-l en -norm`), the jar's corpus score against the first three references: WebNLG with `-r 3`, DART
  with `-r 8` (its `prepare_files.py` writes the non-empty lines of its three reference files, then empty lines).
- TER: tercom 0.7.25 (case-insensitive, no normalization; fewest edits over the references, divided by their mean
  length), computed with sacrebleu's port of tercom, against the first three references (DART: the non-empty lines
  of its three reference files, as `prepare_files.py` writes them).

Checked end to end against the challenge's published evaluation files (team ADAPT_Centre, 7-triple subset: BLEU
62.96, METEOR 0.43542716715861496, TER 0.3729966002914036 reproduced from the raw test XML and the team's output).
"""

from __future__ import annotations

import re

from sacrebleu.metrics import BLEU, TER
from unidecode import unidecode

from prefix_lightning.evaluation.java import JavaUnavailable, meteor, warn_skipped
from prefix_lightning.evaluation.references import reference_streams

MAX_REFERENCES = 3  # bleu_eval_3ref.sh, meteor -r 3, ter 3ref; DART's reference0..2 files
DART_METEOR_SLOTS = 8  # run_eval_on_dart.sh: METEOR -r 8 over up to three references padded with empty lines
_NON_WORD = re.compile(r"(\W)")


def split_non_word(text: str) -> str:
    """`' '.join(re.split(r'(\\W)', text))` with whitespace collapsed: the scripts' "detokenise" step."""
    return " ".join(_NON_WORD.sub(r" \1 ", text).split())


def webnlg_output(text: str) -> str:
    """A system output as the WebNLG 2017 script rewrites it before scoring."""
    return split_non_word(unidecode(text.strip()).lower())


def webnlg_reference(text: str) -> str:
    """A reference as the WebNLG 2017 script writes it into its reference files."""
    return unidecode(split_non_word(text).lower())


def dart_text(text: str) -> str:
    """A reference as DART's reference files hold it (lowercased, split; no transliteration), applied to outputs too."""
    return split_non_word(text.lower())


def score_webnlg(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU (0-100), METEOR (0-1), TER (0-1, lower is better) as the WebNLG 2017 challenge scripts print them.

    Score each split (seen, unseen, all) with its own call, as the challenge does per category set.
    """
    outputs = [webnlg_output(text) for text in hypotheses]
    refs = [[webnlg_reference(text) for text in group[:MAX_REFERENCES]] for group in references]
    # A reference file exists only up to the largest reference count of the scored entries.
    width = min(MAX_REFERENCES, max(len(group) for group in refs))
    return _score(outputs, _pad(refs, width, ""), _pad(refs, MAX_REFERENCES, ""), refs, lowercase=True)


def score_dart(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU (0-100), METEOR (0-1), TER (0-1, lower is better) as DART's `run_eval_on_dart.sh` prints them."""
    outputs = [dart_text(text) for text in hypotheses]
    refs = [[dart_text(text) for text in group[:MAX_REFERENCES]] for group in references]
    bleu_refs = _pad(refs, MAX_REFERENCES, "")
    return _score(outputs, bleu_refs, _pad(refs, DART_METEOR_SLOTS, ""), refs, lowercase=False)


def _pad(groups: list[list[str]], width: int, filler: str) -> list[list[str]]:
    return [group + [filler] * (width - len(group)) for group in groups]


def _score(
    outputs: list[str],
    bleu_refs: list[list[str]],
    meteor_refs: list[list[str]],
    ter_refs: list[list[str]],
    lowercase: bool,
) -> dict[str, float]:
    bleu = BLEU(tokenize="none", lowercase=lowercase, smooth_method="none", force=True)
    # sacrebleu takes None for a missing reference (as documented) but annotates str.
    scores = {"BLEU": bleu.corpus_score(outputs, reference_streams(bleu_refs)).score}  # type: ignore[arg-type]
    try:
        scores["METEOR"] = meteor(outputs, meteor_refs)
    except JavaUnavailable as err:
        warn_skipped(["METEOR"], err)
    # sacrebleu takes None for a missing reference (as documented) but annotates str.
    scores["TER"] = TER().corpus_score(outputs, reference_streams(ter_refs)).score / 100.0  # type: ignore[arg-type]
    return scores
