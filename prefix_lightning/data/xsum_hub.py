"""Reader for XSum (Narayan et al. 2018) from the Hugging Face Hub: BBC articles and their one-sentence summaries.

Needs the optional `datasets` package (`pip install 'prefix-lightning[hub]'`); the rest of the project does not.
"""

from __future__ import annotations

import logging

from prefix_lightning.data.examples import Example

logger = logging.getLogger("prefix_lightning.data")

XSUM_HUB_NAME = "EdinburghNLP/xsum"
OFFLINE_HINT = "Offline, data=xsum_sample runs on the 50-article sample in <data_dir>/xsum_sample."


def read_xsum_hub(split: str, name: str = XSUM_HUB_NAME) -> list[Example]:
    """One example per article of `split` (train / validation / test): source `document`, target `summary`.

    `datasets` downloads the split once and caches it. Articles with an empty document or summary (a published
    dataset one cannot fix) are skipped with one warning, rather than stopping a run.
    """
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"reading {name} from the Hugging Face Hub needs the `datasets` package: "
            f"pip install 'prefix-lightning[hub]' (or pip install datasets). {OFFLINE_HINT}"
        ) from err
    try:
        rows = datasets.load_dataset(name, split=split)
    except (OSError, ValueError, RuntimeError) as err:  # no network; unknown split; a format this version refuses
        raise FileNotFoundError(
            f"could not load split {split!r} of {name} from the Hugging Face Hub: {err}. Check the network and the "
            f"split name (train, validation, test); HF_DATASETS_OFFLINE=1 reads the local cache. {OFFLINE_HINT}"
        ) from err
    examples: list[Example] = []
    skipped = 0
    for row in rows:
        document, summary = (row["document"] or "").strip(), (row["summary"] or "").strip()
        if document and summary:
            examples.append(Example(source=document, target=summary, group_id=len(examples)))
        else:
            skipped += 1
    if skipped:
        logger.warning("%s %s: skipped %d articles with an empty document or summary", name, split, skipped)
    return examples
