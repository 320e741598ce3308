"""Shared fixtures: the real data and tokenizer files that ship in ../shared (see its README); per-test time limits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.config import REPO
from tests.helpers.tokenizer import tokenizer_folder

# Seconds a test may take before pytest-timeout fails it, by kind (an explicit @pytest.mark.timeout wins). The ini
# option `timeout` is the bound of what is neither unit nor slow: the integration tests.
UNIT_TIMEOUT_S = 120
SLOW_TIMEOUT_S = 1800


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("timeout") is not None:
            continue
        if item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
        elif item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.timeout(UNIT_TIMEOUT_S))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """`PREFIX_LIGHTNING_DATA`, else `<repo>/../shared/data`."""
    folder = Path(os.environ.get("PREFIX_LIGHTNING_DATA", REPO.parent / "shared" / "data"))
    if not (folder / "e2e").is_dir():
        pytest.fail(f"test data not found in {folder}: set PREFIX_LIGHTNING_DATA to the shared data folder")
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(data_dir: Path) -> Path:
    """The real GPT-2 tokenizer's files: `PREFIX_LIGHTNING_TOKENIZER` (a folder or a Hub id), else
    `<data_dir>/../tokenizers/gpt2`."""
    try:
        folder = tokenizer_folder(os.environ.get("PREFIX_LIGHTNING_TOKENIZER"), data_dir)
    except FileNotFoundError as error:
        pytest.fail(f"GPT-2 tokenizer not found: {error}; set PREFIX_LIGHTNING_TOKENIZER to a folder", pytrace=False)
    if not (folder / "vocab.json").is_file():
        pytest.fail(f"GPT-2 tokenizer not found in {folder}: set PREFIX_LIGHTNING_TOKENIZER")
    return folder


@pytest.fixture(scope="session")
def gpt2_tokenizer(tokenizer_dir: Path):
    """The real GPT-2 tokenizer."""
    from transformers import AutoTokenizer

    # The folder holds only vocab.json and merges.txt (no config), so AutoTokenizer must be told the type.
    return AutoTokenizer.from_pretrained(tokenizer_dir, tokenizer_type="gpt2")
