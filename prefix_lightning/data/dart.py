"""Reader and downloader for DART v1.1.1 (Nan et al. 2021): open-domain triple sets to text, JSON or XML."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefix_lightning.data.examples import Example
from prefix_lightning.data.files import DATA_DIR_HINT, fetch, read_text, require_file
from prefix_lightning.data.triples import Triple, TripleEntry, read_triples_xml, triple_examples

DART_URL = "https://raw.githubusercontent.com/Yale-LILY/dart/master/data/v1.1.1/"
DART_FILES = ("dart-v1.1.1-full-train.json", "dart-v1.1.1-full-dev.json", "dart-v1.1.1-full-test.json")


def _how_to_get_data(folder: Path, names: Sequence[str]) -> str:
    return (
        f"Download {', '.join(names)} from {DART_URL} (the Yale-LILY/dart repository, data/v1.1.1) into "
        f"{folder}, or {DATA_DIR_HINT}."
    )


def read_dart(path: Path) -> list[Example]:
    """Read the official JSON release or its WebNLG-style XML form (chosen by the file's suffix).

    Each triple set is one group with all its annotations as references; properties are lowercased and triples
    linearized as in the paper's DART loader.
    """
    path = Path(path)
    path = require_file(path, f"DART file {path.name}", _how_to_get_data(path.parent, [path.name]))
    entries = read_triples_xml(path) if path.suffix.lower() == ".xml" else _read_json(path)
    return triple_examples(entries, lowercase_properties=True, keep_categories=False)


def download_dart(data_dir: Path, needed: Sequence[str] = DART_FILES) -> None:
    """Fetch the official JSON files of `needed` (those the run reads) into `data_dir/dart/`."""
    folder = Path(data_dir) / "dart"
    fetch({name: DART_URL + name for name in needed}, folder, _how_to_get_data(folder, needed))


def _read_json(path: Path) -> list[TripleEntry]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{'tripleset': ..., 'annotations': ...}} objects")
    return [_entry(item, f"{path}, entry {number}") for number, item in enumerate(data, start=1)]


def _entry(item: Any, where: str) -> TripleEntry:
    if not isinstance(item, dict) or "tripleset" not in item or "annotations" not in item:
        raise ValueError(f"{where}: expected an object with 'tripleset' and 'annotations'")
    if not isinstance(item["tripleset"], list) or not item["tripleset"]:
        raise ValueError(f"{where}: 'tripleset' must be a non-empty list of [subject, property, object]")
    triples = [_triple(triple, where) for triple in item["tripleset"]]
    if not isinstance(item["annotations"], list):
        raise ValueError(f"{where}: 'annotations' must be a list of {{'source': ..., 'text': ...}}")
    for annotation in item["annotations"]:
        if not isinstance(annotation, dict) or not isinstance(annotation.get("text"), str):
            raise ValueError(f"{where}: every annotation needs a 'text' string, got {annotation!r}")
    lexes = [(str(note.get("source", "")), note["text"].strip()) for note in item["annotations"]]
    return TripleEntry(where=where, category="", triples=triples, lexes=lexes)


def _triple(triple: Any, where: str) -> Triple:
    if not (isinstance(triple, list) and len(triple) == 3 and all(isinstance(part, str) for part in triple)):
        raise ValueError(f"{where}: a triple must be [subject, property, object] strings, got {triple!r}")
    subject, prop, obj = (part.strip() for part in triple)
    if not (subject and prop and obj):
        raise ValueError(f"{where}: a triple has an empty part: {triple!r}")
    return subject, prop, obj
