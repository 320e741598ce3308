"""Reader for the WebNLG 2017 challenge (Gardent et al. 2017): DBpedia triple sets to text, XML files."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from prefix_lightning.data.examples import Example
from prefix_lightning.data.files import DATA_DIR_HINT
from prefix_lightning.data.triples import TripleEntry, read_triples_xml, triple_examples

logger = logging.getLogger("prefix_lightning.data")

WEBNLG_SOURCE = "https://gitlab.com/shimorina/webnlg-dataset (folder webnlg_challenge_2017)"


def _how_to_get_data(folder: Path) -> str:
    return (
        f"Get the WebNLG 2017 challenge data from {WEBNLG_SOURCE} and put its train/, dev/ and test/ folders in "
        f"{folder}, or {DATA_DIR_HINT}."
    )


def read_webnlg(path: Path) -> list[Example]:
    """Read one XML file, or every `*.xml` under a folder (train/ and dev/ hold one file per category and triple
    count), in sorted path order. Each entry is one group; `category` is its DBpedia category.

    As in the paper's code, only texts rated good are used: texts flagged `comment="toFix"` are dropped, and
    with them the few training entries that have no other text.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.xml"))
        if not files:
            raise FileNotFoundError(f"no WebNLG XML files under {path}. {_how_to_get_data(path.parent)}")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"WebNLG data not found: looked for {path}. {_how_to_get_data(path.parent)}")
    return triple_examples(_drop_flagged([entry for file in files for entry in read_triples_xml(file)], path))


def _drop_flagged(entries: list[TripleEntry], path: Path) -> list[TripleEntry]:
    kept, dropped_texts = [], 0
    for entry in entries:
        good = [lex for lex in entry.lexes if lex[0] != "toFix"]
        dropped_texts += len(entry.lexes) - len(good)
        if good or not entry.lexes:  # an entry without any text stays, for triple_examples to report
            kept.append(replace(entry, lexes=good))
    if dropped_texts:
        logger.info(
            "%s: dropped %d texts flagged toFix and %d entries left without text",
            path,
            dropped_texts,
            len(entries) - len(kept),
        )
    return kept
