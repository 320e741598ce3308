"""Reader for the 50-article sample of XSum that ships with the XSum human evaluation (Narayan et al. 2018).

Small enough for offline tests of the summarization path; the full corpus comes from the Hub (`xsum_hub`).
"""

from __future__ import annotations

import re
from pathlib import Path

from prefix_lightning.data.examples import Example
from prefix_lightning.data.files import DATA_DIR_HINT, read_text, require_file

_ARTICLE_RE = re.compile(r"==(\S+)==")
SOURCE_BLOCK, TARGET_BLOCK = "Document-Full", "Reference"


def read_xsum_sample(path: Path) -> list[Example]:
    """One example per article: its full document (one sentence per line, as in the Hub's `document`) and its
    reference summary.

    The file holds, per article, a `==ID==` line and then blocks separated by blank lines, each a name line
    (`Document-400`, `Document-Full`, `Reference`, system names, ...) followed by its text; only
    `Document-Full` and `Reference` are used.
    """
    path = require_file(
        Path(path),
        "XSum sample",
        f"It is xsum-human-evaluation-data.txt from the XSum repository (EdinburghNLP/XSum); put it in "
        f"{Path(path).parent}, or {DATA_DIR_HINT}. For the full corpus use data=xsum (Hugging Face Hub).",
    )
    articles: list[tuple[str, int, dict[str, list[str]]]] = []  # (id, line, blocks)
    block: list[str] | None = None  # the block being read; None between blocks
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        header = _ARTICLE_RE.fullmatch(line.strip())
        if header:
            articles.append((header.group(1), number, {}))
            block = None
        elif not line.strip():
            block = None
        elif not articles:
            raise ValueError(f"{path}, line {number}: text before the first ==ID== line")
        elif block is None:
            block = articles[-1][2].setdefault(line.strip(), [])
        else:
            block.append(line.strip())
    if not articles:
        raise ValueError(f"{path}: no articles (==ID== lines) found")
    return [_example(path, group_id, *article) for group_id, article in enumerate(articles)]


def _example(path: Path, group_id: int, article: str, line: int, blocks: dict[str, list[str]]) -> Example:
    where = f"{path}, line {line} (article {article})"
    texts = []
    for name in (SOURCE_BLOCK, TARGET_BLOCK):
        if name not in blocks:
            raise ValueError(f"{where}: no {name!r} block (found {sorted(blocks)})")
        if not blocks[name]:
            raise ValueError(f"{where}: empty {name!r} block")
        texts.append("\n".join(blocks[name]))
    return Example(source=texts[0], target=texts[1], group_id=group_id)
