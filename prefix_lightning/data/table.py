"""Reader for your own data: JSON Lines, JSON or CSV/TSV files with one (source, target) pair per row, as common
tools write them (pandas, Hugging Face datasets, Excel: a byte-order mark, Windows line ends, JSON Lines named .json).

Works for table-to-text (a linearized table in the source column) and summarization (a document) alike.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefix_lightning.data.examples import Example
from prefix_lightning.data.files import read_text, require_file

_DELIMITERS = {".csv": ",", ".tsv": "\t"}


def read_table(
    path: Path,
    source_column: str = "source",
    target_column: str = "target",
    group_column: str | None = None,
    linearize: Callable[[str], str] | None = None,
) -> list[Example]:
    """Read `.jsonl` (one JSON object per line), `.json` (a list of objects, or JSON Lines) or `.csv` / `.tsv` (with
    a header row) into examples.

    Rows with the same `group_column` value form one multi-reference group and must share their source;
    without a group column, rows with the same source do. `linearize` turns a raw source cell into the model's
    source text (E2E meaning representations); it raises ValueError on a malformed cell. Every error names the
    file and line.
    """
    path = require_file(
        Path(path),
        "data file",
        "Set data.train_file / val_file / test_file to your files (absolute, or relative to data.data_dir).",
    )
    columns = [source_column, target_column] + ([group_column] if group_column else [])
    named = {"source_column": source_column, "target_column": target_column, "group_column": group_column or "-"}
    for option, column in named.items():
        if not (isinstance(column, str) and column.strip()):
            raise ValueError(f"data.{option} must name a column (or JSON field) of the data files, got {column!r}")
    examples: list[Example] = []
    group_ids: dict[str, int] = {}
    first_seen: dict[str, tuple[str, str]] = {}
    for where, row in _rows(path, columns):
        source, target = (_cell(row, column, where) for column in (source_column, target_column))
        if linearize is not None:
            try:
                source = linearize(source)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        key = _cell(row, group_column, where) if group_column else source
        if group_column and first_seen.setdefault(key, (source, where))[0] != source:
            raise ValueError(
                f"{where}: group {key!r} has a different {source_column} than {first_seen[key][1]}; "
                f"rows of one group ({group_column}) must share their source"
            )
        examples.append(Example(source, target, group_ids.setdefault(key, len(group_ids))))
    return examples


def _rows(path: Path, columns: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) pairs, where = "<file>, line <n>" (or "item <n>" of a JSON list); a row may lack a column only
    in JSON (checked per row there)."""
    text = read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".json" and text.lstrip().startswith("["):
        yield from _json_list(path, text, columns)
    elif suffix in (".jsonl", ".json"):
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}, column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object with fields {columns}")
            yield f"{path}, line {number}", row
    elif suffix in _DELIMITERS:
        yield from _delimited_rows(path, text, _DELIMITERS[suffix], columns)
    else:
        hint = " (save a spreadsheet as CSV UTF-8)" if suffix in (".xlsx", ".xls", ".ods") else ""
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json, .csv or .tsv{hint}")


def _delimited_rows(path: Path, text: str, delimiter: str, columns: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """CSV/TSV rows, each named by the line it begins on (blank lines hold none). Quoting is checked strictly: a
    cell that begins with a quote and goes on after its closing one (``"Hi" he said``) would lose its quotes, and
    one never closed would take in every line after it."""
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # a long document in one cell (csv's cap: 128k)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    start = 1  # the line the row being read begins on (a quoted cell may hold line breaks)
    try:
        header = next(reader, [])
        repeated = sorted({column for column in header if header.count(column) > 1})
        if repeated:
            raise ValueError(f"{path}, line 1: the header names column(s) {repeated} more than once")
        missing = [column for column in columns if column not in header]
        if missing:
            raise ValueError(f"{path}, line 1: missing column(s) {missing} (the header has {header})")
        start = reader.line_num + 1
        for cells in reader:
            if len(cells) > len(header):  # an unquoted delimiter inside a cell
                raise ValueError(
                    f"{path}, line {start}: {len(cells)} cells, but the header has {len(header)} columns; quote "
                    f'cells that hold a {delimiter!r} ("a, b")'
                )
            if cells:
                yield f"{path}, line {start}", dict(zip(header, cells, strict=False))  # a short row lacks cells
            start = reader.line_num + 1
    except csv.Error as err:
        said = str(err).replace("\t", "\\t")
        raise ValueError(
            f'{path}, line {start}: a cell that begins with a quote (") must end with one ({said}); quote a cell '
            'whole ("a ""b"" c": quotes inside doubled) or not at all'
        ) from None


def _json_list(path: Path, text: str, columns: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """A JSON list of objects (pandas ``to_json(orient="records")``); rows are numbered as list items."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}, item {number}: expected a JSON object with fields {columns}")
        yield f"{path}, item {number}", row


def _cell(row: dict[str, Any], column: str, where: str) -> str:
    if column not in row:
        raise ValueError(f"{where}: missing field {column!r} (the row has {sorted(row)})")
    value = row[column]
    if value is None:
        value = ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{where}: {column!r} must be text, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):  # JSON's NaN: how pandas writes a missing value
        raise ValueError(f"{where}: {column!r} is {value} (a missing value?), not text")
    text = str(value).strip()
    if not text:
        raise ValueError(f"{where}: empty {column}")
    return text
