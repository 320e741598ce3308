"""Reader and downloader for the E2E NLG Challenge CSV files (Novikova, Dusek and Rieser, 2017)."""

from __future__ import annotations

import io
import re
import urllib.request
import zipfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from prefix_lightning.data.examples import Example
from prefix_lightning.data.files import DATA_DIR_HINT, require_file
from prefix_lightning.data.table import read_table
from prefix_lightning.files.atomic import atomic_write

E2E_URL = "https://github.com/tuetschek/e2e-dataset/releases/download/v1.0.0/e2e-dataset.zip"
E2E_FILES = ("trainset.csv", "devset.csv", "testset_w_refs.csv")

# One `attr[value]` pair; values may hold commas ("food[Fish, Chips]") but no brackets.
_PAIR = r"\s*([^\[\],]+?)\s*\[([^\[\]]*)\]\s*"
_PAIR_RE = re.compile(_PAIR)
_MR_RE = re.compile(rf"{_PAIR}(?:,{_PAIR})*")


def _how_to_get_data(folder: Path, names: Sequence[str]) -> str:
    return f"Download the official release from {E2E_URL} and put {', '.join(names)} in {folder}, or {DATA_DIR_HINT}."


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
    path = require_file(path, f"E2E file {path.name}", _how_to_get_data(path.parent, [path.name]))
    return read_table(path, source_column="mr", target_column="ref", linearize=linearize_mr)


def download_e2e(data_dir: Path, needed: Sequence[str] = E2E_FILES, url: str = E2E_URL) -> None:
    """Fetch the official release zip and write its three CSVs into `data_dir/e2e/`.

    Each file is written to a temporary name and renamed, so an interrupted run never leaves a truncated CSV
    that later runs would take for real data. Any network failure becomes a FileNotFoundError that names the
    files of `needed` (those the run reads) that are missing, and how to provide them by hand (these machines are
    often offline).
    """
    folder = Path(data_dir) / "e2e"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            archive = zipfile.ZipFile(io.BytesIO(response.read()))
    except (OSError, zipfile.BadZipFile) as err:
        missing = [name for name in needed if not (folder / name).is_file()] or list(needed)
        raise FileNotFoundError(
            f"E2E file(s) {', '.join(missing)} missing: looked in {folder}, and downloading {url} failed ({err}). "
            f"{_how_to_get_data(folder, missing)}"
        ) from err
    members = {Path(name).name: name for name in archive.namelist()}
    absent = [name for name in E2E_FILES if name not in members]
    if absent:
        raise FileNotFoundError(f"{url} does not contain {absent}. {_how_to_get_data(folder, E2E_FILES)}")
    for name in E2E_FILES:
        payload = archive.read(members[name])
        atomic_write(folder / name, partial(Path.write_bytes, data=payload))
