"""Dataset readers and tokenization/batching. The LightningDataModule is ``prefix_lightning.data.datamodule``, not
imported here, so that reading and scoring data never needs Lightning."""

from prefix_lightning.data.collate import IGNORE_INDEX, EncodedPair, EncodedPrompt, TextToTextCollator
from prefix_lightning.data.dart import DART_FILES, DART_URL, download_dart, read_dart
from prefix_lightning.data.e2e import E2E_FILES, E2E_URL, download_e2e, linearize_mr, read_e2e
from prefix_lightning.data.examples import Example, Group, group_references, reference_groups
from prefix_lightning.data.registry import DATASETS, METRIC_SUITES, DatasetSpec
from prefix_lightning.data.table import read_table
from prefix_lightning.data.triples import linearize_triples
from prefix_lightning.data.webnlg import read_webnlg
from prefix_lightning.data.xsum_hub import XSUM_HUB_NAME, read_xsum_hub
from prefix_lightning.data.xsum_sample import read_xsum_sample

__all__ = [
    "DART_FILES",
    "DART_URL",
    "DATASETS",
    "E2E_FILES",
    "E2E_URL",
    "IGNORE_INDEX",
    "METRIC_SUITES",
    "XSUM_HUB_NAME",
    "DatasetSpec",
    "EncodedPair",
    "EncodedPrompt",
    "Example",
    "Group",
    "TextToTextCollator",
    "download_dart",
    "download_e2e",
    "group_references",
    "linearize_mr",
    "linearize_triples",
    "read_dart",
    "read_e2e",
    "read_table",
    "read_webnlg",
    "read_xsum_hub",
    "read_xsum_sample",
    "reference_groups",
]
