"""The datasets that `TextToTextDataModule` knows by name: where their files live, how to read, fetch and score them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prefix_lightning.data.dart import DART_FILES, download_dart, read_dart
from prefix_lightning.data.e2e import E2E_FILES, download_e2e, read_e2e
from prefix_lightning.data.examples import Example
from prefix_lightning.data.table import read_table
from prefix_lightning.data.webnlg import read_webnlg
from prefix_lightning.data.xsum_hub import read_xsum_hub
from prefix_lightning.data.xsum_sample import read_xsum_sample

# What the scorers compute for a dataset: its official metrics, or corpus BLEU for your own data.
METRIC_SUITES = ("e2e", "webnlg", "dart", "xsum", "bleu")


@dataclass(frozen=True)
class DatasetSpec:
    """How to read one dataset.

    - `read(location, **options)` returns a split's examples; `options` names the data module arguments it takes.
    - `folder`: where split locations are resolved, under the data dir; None when a location is not a path
      (a Hub split name).
    - `files`: the default train / validation / test locations.
    - `download(data_dir, needed)` fetches the official files, where the dataset has a stable download address;
      a failure names the files of `needed` (those the run reads).
    - `seen_unseen`: the test split can be narrowed to categories seen or unseen in training.
    """

    read: Callable[..., list[Example]]
    folder: str | None
    files: tuple[str, str, str]
    metric_suite: str
    options: tuple[str, ...] = ()
    download: Callable[[Path, Sequence[str]], None] | None = None
    seen_unseen: bool = False


_XSUM_SAMPLE = "xsum-human-evaluation-data.txt"

DATASETS: dict[str, DatasetSpec] = {
    "e2e": DatasetSpec(read_e2e, "e2e", E2E_FILES, "e2e", download=download_e2e),
    "webnlg": DatasetSpec(
        read_webnlg, "webnlg2017", ("train", "dev", "test/testdata_with_lex.xml"), "webnlg", seen_unseen=True
    ),
    "dart": DatasetSpec(read_dart, "dart", DART_FILES, "dart", download=download_dart),
    "xsum": DatasetSpec(read_xsum_hub, None, ("train", "validation", "test"), "xsum"),
    "xsum_sample": DatasetSpec(read_xsum_sample, "xsum_sample", (_XSUM_SAMPLE,) * 3, "xsum"),
    "custom": DatasetSpec(
        read_table,
        "",
        ("custom/train.jsonl", "custom/val.jsonl", "custom/test.jsonl"),
        "bleu",
        options=("source_column", "target_column", "group_column"),
    ),
}
