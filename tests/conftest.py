"""Shared fixtures: the real data and tokenizer files that ship in ../shared (see its README)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """`PREFIX_LIGHTNING_DATA`, else `<repo>/../shared/data`."""
    folder = Path(os.environ.get("PREFIX_LIGHTNING_DATA", REPO.parent / "shared" / "data"))
    if not (folder / "e2e").is_dir():
        pytest.fail(f"test data not found in {folder}: set PREFIX_LIGHTNING_DATA to the shared data folder")
    return folder


@pytest.fixture(scope="session")
def gpt2_tokenizer(data_dir: Path):
    """The real GPT-2 tokenizer: `PREFIX_LIGHTNING_TOKENIZER`, else `<data_dir>/../tokenizers/gpt2`."""
    from transformers import AutoTokenizer

    folder = Path(os.environ.get("PREFIX_LIGHTNING_TOKENIZER", data_dir.parent / "tokenizers" / "gpt2"))
    # The folder holds only vocab.json and merges.txt (no config), so AutoTokenizer must be told the type.
    return AutoTokenizer.from_pretrained(folder, tokenizer_type="gpt2")
