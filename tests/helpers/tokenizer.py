"""Where the tests find the real GPT-2 tokenizer's files (vocab.json, merges.txt)."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import snapshot_download

TOKENIZER_FILES = ["vocab.json", "merges.txt"]


def tokenizer_folder(setting: str | None, data_dir: Path) -> Path:
    """`setting` (PREFIX_LIGHTNING_TOKENIZER: a folder, or a Hub id such as `gpt2`, which `make test` passes when no
    TOKENIZER_DIR is given), else `<data_dir>/../tokenizers/gpt2`. A Hub id is fetched once into the Hub's cache:
    the README promises that the tests fetch `gpt2` without a folder, and runs read the same setting that way."""
    if not setting:
        return data_dir.parent / "tokenizers" / "gpt2"
    folder = Path(setting)
    if folder.exists():
        return folder
    try:
        return Path(snapshot_download(setting, allow_patterns=TOKENIZER_FILES))
    except Exception as error:  # offline, or no such repository: the fixture says what to set
        raise FileNotFoundError(f"{setting!r} is neither a folder nor a reachable Hub tokenizer ({error})") from error
