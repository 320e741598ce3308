"""Reader and downloader for the E2E NLG Challenge CSV files (Novikova, Dusek and Rieser, 2017)."""

from __future__ import annotations

import csv
import io
import os
import re
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from prefix_lightning.data.examples import Example

E2E_URL = "https://github.com/tuetschek/e2e-dataset/releases/download/v1.0.0/e2e-dataset.zip"
E2E_FILES = ("trainset.csv", "devset.csv", "testset_w_refs.csv")

# One `attr[value]` pair; values may hold commas ("food[Fish, Chips]") but no brackets.
_PAIR = r"\s*([^\[\],]+?)\s*\[([^\[\]]*)\]\s*"
_PAIR_RE = re.compile(_PAIR)
_MR_RE = re.compile(rf"{_PAIR}(?:,{_PAIR})*")


def _how_to_get_data(folder: Path) -> str:
    return (
        f"Download the official release from {E2E_URL} and put {', '.join(E2E_FILES)} in {folder}, "
        "or point the data dir at a folder that holds e2e/ (paths.data_dir=... or env var PREFIX_LIGHTNING_DATA)."
    )


def linearize_mr(mr: str) -> str:
    """`name[The Eagle], eatType[coffee shop]` -> `name : The Eagle | eatType : coffee shop`, as in the paper.

    Raises ValueError (without location; `read_e2e` adds file and line) when `mr` is not a list of `attr[value]`.
    """
    if _MR_RE.fullmatch(mr) is None:
        raise ValueError(f"meaning representation is not a comma-separated list of attr[value]: {mr!r}")
    return " | ".join(f"{attr} : {value.strip()}" for attr, value in _PAIR_RE.findall(mr))


def read_e2e(path: Path) -> list[Example]:
    """Read an official E2E CSV (header `mr,ref`) into examples with linearized sources.

    Rows sharing an MR get one `group_id` (its index among the file's unique MRs, first-seen order).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"E2E file {path.name} not found: looked for {path}. {_how_to_get_data(path.parent)}")
    examples: list[Example] = []
    group_ids: dict[str, int] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in ("mr", "ref") if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}, line 1: missing column(s) {missing}; an E2E file has the header 'mr,ref' "
                f"(found {reader.fieldnames})"
            )
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            mr, ref = (row["mr"] or "").strip(), (row["ref"] or "").strip()
            if not mr or not ref:
                raise ValueError(f"{where}: empty {'mr' if not mr else 'ref'}")
            try:
                source = linearize_mr(mr)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            group_id = group_ids.setdefault(source, len(group_ids))
            examples.append(Example(source=source, target=ref, group_id=group_id))
    return examples


def download_e2e(data_dir: Path, url: str = E2E_URL) -> None:
    """Fetch the official release zip and write its three CSVs into `data_dir/e2e/`.

    Each file is written to a temporary name and renamed, so an interrupted run never leaves a truncated CSV
    that later runs would take for real data. Any network failure becomes a FileNotFoundError that says what
    is missing and how to provide it by hand (these machines are often offline).
    """
    folder = Path(data_dir) / "e2e"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            archive = zipfile.ZipFile(io.BytesIO(response.read()))
    except (OSError, zipfile.BadZipFile) as err:
        missing = [name for name in E2E_FILES if not (folder / name).is_file()] or list(E2E_FILES)
        raise FileNotFoundError(
            f"E2E file(s) {', '.join(missing)} missing: looked in {folder}, and downloading {url} failed ({err}). "
            f"{_how_to_get_data(folder)}"
        ) from err
    members = {Path(name).name: name for name in archive.namelist()}
    absent = [name for name in E2E_FILES if name not in members]
    if absent:
        raise FileNotFoundError(f"{url} does not contain {absent}. {_how_to_get_data(folder)}")
    folder.mkdir(parents=True, exist_ok=True)
    for name in E2E_FILES:
        _write_atomically(folder / name, archive.read(members[name]))


def _write_atomically(path: Path, payload: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(payload)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
