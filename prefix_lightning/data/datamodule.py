"""LightningDataModule for every text-to-text dataset: splits, seeded training subsets, loss / generation loaders."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from lightning.fabric.utilities.data import AttributeDict
from torch.utils.data import DataLoader

from prefix_lightning.data.collate import EncodedPair, EncodedPrompt, TextToTextCollator
from prefix_lightning.data.examples import Example, Group, reference_groups
from prefix_lightning.data.loaders import evaluation_loader, training_loader
from prefix_lightning.data.registry import DATASETS, METRIC_SUITES

logger = logging.getLogger(__name__)

TEST_SUBSETS = ("all", "seen", "unseen")


class TextToTextDataModule(L.LightningDataModule):
    """Splits of the dataset named `dataset` (see `registry.DATASETS`: e2e, webnlg, dart, xsum, xsum_sample,
    custom), read from `<data_dir>/<dataset folder>/<file>` (a relative `data_dir` is taken from the working
    directory; an absolute file name is used as is; for `xsum` the "files" are Hub split names). Files left
    None take the dataset's official names.

    - `train_size`: number of training (source, target) pairs drawn at random with `subset_seed`; the draw
      uses its own generator, so every DDP rank gets the same subset, and for one seed smaller subsets are
      contained in larger ones where the pool they are drawn from does not depend on `train_size` (not with
      `val_fraction` on a held-out part of the training file: each size holds out its own groups, and draws
      anew). None keeps all pairs.
    - `val_size` / `test_size`: number of groups (inputs with all their references), the first N in file
      order. None keeps all.
    - `val_fraction`: when `val_size` is None, validate on `val_fraction` x `train_size` groups (rounded, at
      least 1), e.g. 0.3 for the paper's low-data dev splits (30% of the training size). Needs `train_size`.
    - When `val_file == train_file` (offline: some official training sets are not shipped), the LAST `val_size`
      groups are held out for validation and training pairs come only from the others.
    - `test_subset` (WebNLG): `seen` / `unseen` keep only test inputs whose category does / does not occur in
      the training split; `seen_categories` holds those categories, and generation batches carry each input's
      category, so that one `all` run can also be scored per subset.
    - `source_column` / `target_column` / `group_column`: the columns of your own data (`dataset=custom`).
    - `metric_suite`: which scorers apply (e2e, webnlg, dart, xsum, bleu); None takes the dataset's own.
    - `download`: fetch the official files when missing, where the dataset has a download address; otherwise
      a missing file raises an error that says where it looked and how to get the data.
    - `shuffle_seed` seeds the training order (set it to the run's seed).
    - `group_by_length`: each training batch holds pairs of similar lengths (sorted by length within windows of
      50 batches, the batches then shuffled), so that less padding is computed: the accelerator's setting, where a
      step's time follows its padded tokens; False draws batches at random.
    - `tested`: the run tests after training, so the test split is read and checked before training starts (a
      missing or bad test file would otherwise stop the run only after it trained); False: it is never read.

    Loaders: `val_dataloader()` returns `[loss_loader, generation_loader]` (dataloader_idx 0 and 1);
    `test_dataloader()` returns the generation loader. See `TextToTextCollator` for the batch formats.

    Reading needs no tokenizer: built with `tokenizer=None`, the module downloads (`prepare_data`) and reads and
    checks its splits (`read`) before the model loads, and tokenizes once `encode_with` gives it the model's
    tokenizer, layout and source budget (`setup` reads nothing twice).
    """

    def __init__(
        self,
        tokenizer: Any | None,
        data_dir: str | Path,
        dataset: str,
        separator: str,
        target_end: str,
        is_encoder_decoder: bool = False,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        train_size: int | None = None,
        subset_seed: int = 0,
        val_size: int | None = None,
        test_size: int | None = None,
        val_fraction: float | None = None,
        test_subset: str = "all",
        source_column: str = "source",
        target_column: str = "target",
        group_column: str | None = None,
        metric_suite: str | None = None,
        batch_size: int = 10,
        eval_batch_size: int = 10,
        max_source_tokens: int = 256,
        max_target_tokens: int = 128,
        num_workers: int = 0,
        download: bool = True,
        tested: bool = True,
        shuffle_seed: int = 0,
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
        self.spec = DATASETS[dataset]
        train_file, val_file, test_file = (
            given or default for given, default in zip((train_file, val_file, test_file), self.spec.files, strict=True)
        )
        self.metric_suite: str = metric_suite or self.spec.metric_suite
        if self.metric_suite not in METRIC_SUITES:
            raise ValueError(f"unknown metric_suite {metric_suite!r}; choose one of {METRIC_SUITES}")
        if test_subset not in TEST_SUBSETS:
            raise ValueError(f"test_subset must be one of {TEST_SUBSETS}, got {test_subset!r}")
        if test_subset != "all" and not self.spec.seen_unseen:
            raise ValueError(f"test_subset={test_subset!r}: {dataset} has no seen/unseen categories (only webnlg)")
        if val_fraction is not None and not (val_fraction > 0 and (train_size is not None or val_size is not None)):
            raise ValueError(
                f"val_fraction={val_fraction} sizes validation as a fraction of train_size: use a positive "
                "fraction and set train_size (or give val_size instead)"
            )
        data_dir = str(data_dir)  # checkpoints load with weights_only=True, which refuses Path objects
        # This call's arguments, given whole: Lightning's own collection also takes those of a data module whose
        # __init__ builds this one (a MultiTaskDataModule's tasks, on Python >= 3.12 whose comprehensions run in
        # the enclosing frame), and theirs would win (every task's sizes and seed the mixture's None).
        given = locals()
        parameters = inspect.signature(TextToTextDataModule.__init__).parameters
        arguments = {name: given[name] for name in parameters if name not in ("self", "tokenizer")}
        self.save_hyperparameters(arguments, logger=False)  # train() logs the config
        self._collator: TextToTextCollator | None = None
        if tokenizer is not None:
            self.encode_with(tokenizer, is_encoder_decoder, max_source_tokens)
        self._splits_read: set[str] = set()  # "fit", "test": the stages whose splits `read` has read
        self.train_examples: list[Example] = []
        self.val_groups: list[Group] = []
        self.test_groups: list[Group] = []
        self.seen_categories: frozenset[str] = frozenset()
        self._train: list[EncodedPair] = []
        self._val_loss: list[EncodedPair] = []
        self._val_generation: list[EncodedPrompt] = []
        self._test_generation: list[EncodedPrompt] = []

    def encode_with(self, tokenizer: Any, is_encoder_decoder: bool, max_source_tokens: int) -> None:
        """Tokenize for the model, once it has loaded: its tokenizer, its layout (encoder-decoder or causal) and the
        source tokens its positions leave room for."""
        self.hparams.update(is_encoder_decoder=is_encoder_decoder, max_source_tokens=max_source_tokens)
        hp = self.hparams
        self._collator = TextToTextCollator(
            tokenizer, hp.separator, hp.target_end, is_encoder_decoder, max_source_tokens, hp.max_target_tokens
        )

    @property
    def collator(self) -> TextToTextCollator:
        """The model's tokenization (see `encode_with`)."""
        if self._collator is None:
            raise RuntimeError("the data module has no tokenizer yet: call encode_with(...) before setup")
        return self._collator

    @property
    def hparams(self) -> AttributeDict:
        """The saved arguments. Lightning's type also admits a plain mapping, which has no attribute access;
        ``save_hyperparameters`` always stores an ``AttributeDict``."""
        return cast(AttributeDict, super().hparams)

    def _location(self, name: str) -> Path | str:
        if self.spec.folder is None:
            return name
        return Path(self.hparams.data_dir) / self.spec.folder / name

    @property
    def _validation_held_out(self) -> bool:
        """Validation is held out of the training file: the same file given twice, however its path is spelled."""
        train, val = (self._location(name) for name in (self.hparams.train_file, self.hparams.val_file))
        if isinstance(train, Path) and isinstance(val, Path):
            return train.resolve() == val.resolve()
        return train == val

    def _read(self, name: str) -> list[Example]:
        options = {option: self.hparams[option] for option in self.spec.options}
        examples = self.spec.read(self._location(name), **options)
        if not examples:  # else a run would "finish" without a training step, or test on nothing
            raise ValueError(f"{self._location(name)} holds no examples (the file has no rows)")
        return examples

    def prepare_data(self, stage: str | None = None) -> None:
        """Download the official files (once, on one process per node) if one that `stage` reads is missing (a
        missing file of the user's own is named when it is read). Lightning gives no stage: it is what the
        attached trainer runs (see `stage_to_prepare`)."""
        hp = self.hparams
        if not (hp.download and self.spec.download):
            return
        stage = stage_to_prepare(self, stage)
        read = self._files_read(stage)
        missing = sorted(name for name in read & set(self.spec.files) if not Path(self._location(name)).exists())
        if missing:
            folder = Path(hp.data_dir) / str(self.spec.folder)
            logger.info("%s: %s missing in %s, downloading the official files", hp.dataset, ", ".join(missing), folder)
            self.spec.download(Path(hp.data_dir), missing)

    def _files_read(self, stage: str | None) -> set[str]:
        """The files that `read(stage)` reads."""
        hp = self.hparams
        files = set()
        if stage in (None, "fit", "validate"):
            files |= {hp.train_file, hp.val_file} | ({hp.test_file} if hp.tested else set())
        if stage in (None, "test"):
            files |= {hp.test_file} | ({hp.train_file} if self.spec.seen_unseen else set())
        return files

    def read(self, stage: str | None = None) -> None:
        """Read and check the splits of `stage` (fit and validate: training and validation, and the test split when
        the run tests; test: the test split; None: all), each once. Needs no tokenizer, so that a run reads them
        before its model loads: a missing, empty or malformed file is said in seconds, not after minutes of
        loading."""
        if stage in (None, "fit", "validate") and "fit" not in self._splits_read:
            self._read_fit()
            self._splits_read.add("fit")
        if stage in (None, "test") and "test" not in self._splits_read:
            self._read_test()

    def setup(self, stage: str | None = None) -> None:
        self.read(stage)
        if stage in (None, "fit", "validate"):
            val_pairs = [
                Example(group.source, reference, group.group_id, group.category)
                for group in self.val_groups
                for reference in group.references
            ]
            self._train = self.collator.encode_pairs(self.train_examples, "train")
            self._val_loss = self.collator.encode_pairs(val_pairs, "validation (loss)")
            self._val_generation = self.collator.encode_prompts(self.val_groups, "validation (generation)")
        if stage in (None, "test"):
            self._test_generation = self.collator.encode_prompts(self.test_groups, "test")

    def _read_fit(self) -> None:
        hp = self.hparams
        train = self._read(hp.train_file)
        if self.spec.seen_unseen:  # the test split's seen/unseen inputs, without reading the training file twice
            self.seen_categories = frozenset(example.category for example in train)
        val_size = self.val_size
        if self._validation_held_out:
            groups = reference_groups(train)
            if val_size is None or not 0 < val_size < len(groups):
                raise ValueError(
                    f"val_file == train_file ({hp.train_file}): set val_size to the number of groups to hold "
                    f"out for validation, between 1 and {len(groups) - 1} (got {val_size})"
                )
            self.val_groups = groups[len(groups) - val_size :]
            held_out = {group.source for group in self.val_groups}
            pool = [example for example in train if example.source not in held_out]
        else:
            pool = train
            groups = reference_groups(self._read(hp.val_file))
            self.val_groups = _first_groups(groups, val_size, "val_size", self._location(hp.val_file))
        self.train_examples = self._draw_subset(pool)
        if hp.tested:  # a missing, bad or too small test split is refused now, not after the training
            self._read_test()

    @property
    def val_size(self) -> int | None:
        """The number of validation groups: `val_size`, else `val_fraction` x `train_size`, else None (all)."""
        hp = self.hparams
        if hp.val_size is not None or hp.val_fraction is None:
            return hp.val_size
        return max(1, round(hp.val_fraction * hp.train_size))

    def _read_test(self) -> None:
        self.test_groups = self._test_groups()
        self._splits_read.add("test")

    def _test_groups(self) -> list[Group]:
        hp = self.hparams
        groups = reference_groups(self._read(hp.test_file))
        if self.spec.seen_unseen:
            if not self.seen_categories:
                self.seen_categories = frozenset(example.category for example in self._read(hp.train_file))
            if hp.test_subset != "all":
                seen = hp.test_subset == "seen"
                groups = [group for group in groups if (group.category in self.seen_categories) == seen]
        return _first_groups(groups, hp.test_size, "test_size", self._location(hp.test_file))

    def _draw_subset(self, pool: list[Example]) -> list[Example]:
        size = self.hparams.train_size
        if size is None:
            return pool
        if not 0 < size <= len(pool):
            held_out = self._validation_held_out
            raise ValueError(
                f"train_size={size}, but {self.hparams.train_file} has {len(pool)} training pairs available"
                + (" after holding out the validation groups" if held_out else "")
            )
        generator = torch.Generator().manual_seed(self.hparams.subset_seed)
        return [pool[i] for i in torch.randperm(len(pool), generator=generator)[:size].tolist()]

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        lengths = [pair.length for pair in self._train] if hp.group_by_length else None
        return training_loader(
            self._train,
            lengths,
            hp.shuffle_seed,
            hp.batch_size,
            self.trainer,
            self.collator.train_batch,
            hp.num_workers,
        )

    def val_dataloader(self) -> list[DataLoader]:
        hp = self.hparams
        loss_loader = evaluation_loader(self._val_loss, hp.eval_batch_size, self.collator.train_batch, hp.num_workers)
        return [loss_loader, self._generation_loader(self._val_generation)]

    def test_dataloader(self) -> DataLoader:
        return self._generation_loader(self._test_generation)

    def _generation_loader(self, prompts: list[EncodedPrompt]) -> DataLoader:
        hp = self.hparams
        return evaluation_loader(prompts, hp.eval_batch_size, self.collator.generation_batch, hp.num_workers)


def _first_groups(groups: list[Group], size: int | None, name: str, where: Path | str) -> list[Group]:
    if size is None:
        return groups
    if not 0 < size <= len(groups):
        raise ValueError(f"{name}={size}, but {where} has {len(groups)} groups (inputs; data.{name}=null takes all)")
    return groups[:size]


def stage_to_prepare(datamodule: L.LightningDataModule, stage: str | None) -> str:
    """The stage whose files ``prepare_data`` downloads: the one given, else the one the attached trainer runs
    (Lightning calls ``prepare_data`` without one; an evaluation then downloads no training split), else a
    training run's."""
    if stage is not None:
        return stage
    running = datamodule.trainer.state.fn if datamodule.trainer is not None else None
    return running.value if running is not None else "fit"
