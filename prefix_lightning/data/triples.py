"""RDF triple sets to text, shared by WebNLG and DART: the WebNLG-style XML format and the paper's linearization."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prefix_lightning.data.examples import Example

logger = logging.getLogger("prefix_lightning.data")

Triple = tuple[str, str, str]


@dataclass(frozen=True)
class TripleEntry:
    """One input: a triple set with its reference texts, as (comment, text) pairs (the comment says where a
    text comes from, or WebNLG's quality flag). `where` locates the entry in its file for error messages."""

    where: str
    category: str
    triples: list[Triple]
    lexes: list[tuple[str, str]]


def linearize_triples(triples: Sequence[Triple], lowercase_properties: bool = False) -> str:
    """`[(s1, p1, o1), (s2, p2, o2)]` -> `s1 : p1 : o1 | s2 : p2 : o2`, the paper's format.

    The paper's WebNLG loader prepends " | " to every triple, so all its sources start with " | "; here the
    separator goes only between triples. Its DART loader lowercases properties (`lowercase_properties`).
    """
    return " | ".join(f"{s} : {p.lower() if lowercase_properties else p} : {o}" for s, p, o in triples)


def triple_examples(
    entries: Iterable[TripleEntry], lowercase_properties: bool = False, keep_categories: bool = True
) -> list[Example]:
    """One example per reference text; each entry is its own group (ids in order), even when two entries
    share a triple set, as the official multi-reference evaluations count them.

    Empty texts are skipped with one warning (DART's official test file has an empty `<lex/>` next to a real
    text); an entry left without any text is an error.
    """
    examples: list[Example] = []
    skipped: list[str] = []
    for group_id, entry in enumerate(entries):
        texts = [text for _, text in entry.lexes if text]
        skipped.extend([entry.where] * (len(entry.lexes) - len(texts)))
        if not texts:
            raise ValueError(f"{entry.where}: no reference text (an entry needs at least one non-empty text)")
        source = linearize_triples(entry.triples, lowercase_properties)
        category = entry.category if keep_categories else ""
        examples.extend(Example(source, text, group_id, category) for text in texts)
    if skipped:
        logger.warning("skipped %d empty reference text(s), the first in %s", len(skipped), skipped[0])
    return examples


def parse_triple(text: str, where: str) -> Triple:
    """`subject | property | object` -> its three parts, stripped."""
    parts = [part.strip() for part in text.split(" | ")]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"{where}: a triple must read 'subject | property | object', got {text!r}")
    subject, prop, obj = parts
    return subject, prop, obj


def read_triples_xml(path: Path) -> list[TripleEntry]:
    """The `<entry>` elements of a WebNLG-style XML file (WebNLG 2017, DART's XML release).

    Each entry needs a `<modifiedtripleset>` of `<mtriple>subject | property | object</mtriple>`; its `<lex>`
    texts are kept as they are (empty ones included) for `triple_examples` to check.
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        line, column = err.position
        raise ValueError(f"{path}, line {line}, column {column}: broken XML ({err})") from None
    entries = []
    for number, entry in enumerate(root.iter("entry"), start=1):
        where = f"{path}, entry {number} (eid={entry.get('eid')!r}, category={entry.get('category')!r})"
        mtriples = entry.findall("modifiedtripleset/mtriple")
        if not mtriples:
            raise ValueError(f"{where}: no <modifiedtripleset> with <mtriple> elements")
        entries.append(
            TripleEntry(
                where=where,
                category=entry.get("category", ""),
                triples=[parse_triple(mtriple.text or "", where) for mtriple in mtriples],
                lexes=[(lex.get("comment", ""), (lex.text or "").strip()) for lex in entry.findall("lex")],
            )
        )
    if not entries:
        raise ValueError(f"{path}: no <entry> elements; expected WebNLG-style XML (<benchmark><entries><entry>)")
    return entries
