"""File access shared by the readers: a missing file, a failed download or undecodable bytes become errors
that say where the reader looked and what to do about it."""

from __future__ import annotations

import codecs
import urllib.request
from collections.abc import Mapping
from functools import partial
from pathlib import Path

from prefix_lightning.files.atomic import atomic_write

DATA_DIR_HINT = "point the data dir at the folder that holds it (paths.data_dir=... or env var PREFIX_LIGHTNING_DATA)"


def require_file(path: Path, what: str, how_to_get: str) -> Path:
    """`path` if it is a file; otherwise an error naming `what`, where it looked and `how_to_get` (a folder is said to
    be one: "not found" misled where the path exists)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what}: {path} is a folder; give the data file in it")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: looked for {path}. {how_to_get}")
    return path


def read_text(path: Path) -> str:
    """The file as text: UTF-8, with or without the byte-order mark that Excel and Notepad write, or UTF-16 with its
    mark (Excel's "Unicode text"); undecodable bytes raise a ValueError naming the file and line."""
    payload = Path(path).read_bytes()
    encoding = "utf-16" if payload.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        return payload.decode(encoding)
    except UnicodeDecodeError as err:
        line = payload.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{path}, line {line}: not UTF-8 text (byte {payload[err.start]:#04x}); save the file as UTF-8"
        ) from None


def fetch(urls: Mapping[str, str], folder: Path, how_to_get: str) -> None:
    """Download each `name: url` into `folder/name`.

    Each file is written under a temporary name and renamed, so an interrupted run never leaves a truncated
    file that later runs would take for real data. A network failure becomes a FileNotFoundError that says
    what is missing and how to provide it by hand (these machines are often offline).
    """
    for name, url in urls.items():
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                payload = response.read()
        except OSError as err:
            raise FileNotFoundError(
                f"{name} missing: looked in {folder}, and downloading {url} failed ({err}). {how_to_get}"
            ) from err
        atomic_write(Path(folder) / name, partial(Path.write_bytes, data=payload))
