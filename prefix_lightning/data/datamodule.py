"""LightningDataModule for E2E: splits, seeded training subsets, and loss / generation loaders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from prefix_lightning.data.collate import EncodedPair, EncodedPrompt, TextToTextCollator
from prefix_lightning.data.e2e import download_e2e, read_e2e
from prefix_lightning.data.examples import Example, group_references
from prefix_lightning.data.sampler import EpochShuffleSampler


class E2EDataModule(L.LightningDataModule):
    """E2E splits read from `<data_dir>/e2e/<file>` (a relative `data_dir` is taken from the working directory).

    - `train_size`: number of training (source, target) pairs drawn at random with `subset_seed`; the draw
      uses its own generator, so every DDP rank gets the same subset, and for one seed smaller subsets are
      contained in larger ones. None keeps all pairs.
    - `val_size` / `test_size`: number of MR groups, the first N in file order. None keeps all.
    - When `val_file == train_file` (offline: the E2E trainset is not shipped, so one trains on devset.csv),
      the LAST `val_size` groups are held out for validation and training pairs come only from the others.
    - `shuffle_seed` seeds the training order (set it to the run's seed).

    Loaders: `val_dataloader()` returns `[loss_loader, generation_loader]` (dataloader_idx 0 and 1);
    `test_dataloader()` returns the generation loader. See `TextToTextCollator` for the batch formats.
    """

    def __init__(
        self,
        tokenizer: Any,
        data_dir: str | Path,
        separator: str,
        target_end: str,
        is_encoder_decoder: bool = False,
        train_file: str = "trainset.csv",
        val_file: str = "devset.csv",
        test_file: str = "testset_w_refs.csv",
        train_size: int | None = None,
        subset_seed: int = 0,
        val_size: int | None = None,
        test_size: int | None = None,
        batch_size: int = 10,
        eval_batch_size: int = 10,
        max_source_tokens: int = 256,
        max_target_tokens: int = 128,
        num_workers: int = 0,
        download: bool = True,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        data_dir = str(data_dir)  # checkpoints load with weights_only=True, which refuses Path objects
        self.save_hyperparameters(ignore=["tokenizer"])
        self.collator = TextToTextCollator(
            tokenizer, separator, target_end, is_encoder_decoder, max_source_tokens, max_target_tokens
        )
        self.train_examples: list[Example] = []
        self.val_groups: list[tuple[str, list[str]]] = []
        self.test_groups: list[tuple[str, list[str]]] = []
        self._train: list[EncodedPair] = []
        self._val_loss: list[EncodedPair] = []
        self._val_generation: list[EncodedPrompt] = []
        self._test_generation: list[EncodedPrompt] = []

    @property
    def e2e_dir(self) -> Path:
        return Path(self.hparams.data_dir) / "e2e"

    def prepare_data(self) -> None:
        """Download the official release (once, on one process per node) if a configured file is missing."""
        files = {self.hparams.train_file, self.hparams.val_file, self.hparams.test_file}
        if self.hparams.download and not all((self.e2e_dir / name).is_file() for name in files):
            download_e2e(Path(self.hparams.data_dir))

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate"):
            self._setup_fit()
        if stage in (None, "test"):
            test = read_e2e(self.e2e_dir / self.hparams.test_file)
            self.test_groups = _first_groups(group_references(test), self.hparams.test_size, "test_size")
            self._test_generation = self.collator.encode_prompts(self.test_groups, "test")

    def _setup_fit(self) -> None:
        hp = self.hparams
        train = read_e2e(self.e2e_dir / hp.train_file)
        if hp.val_file == hp.train_file:
            groups = group_references(train)
            if hp.val_size is None or not 0 < hp.val_size < len(groups):
                raise ValueError(
                    f"val_file == train_file ({hp.train_file}): set val_size to the number of MR groups to hold "
                    f"out for validation, between 1 and {len(groups) - 1} (got {hp.val_size})"
                )
            self.val_groups = groups[len(groups) - hp.val_size :]
            held_out = {source for source, _ in self.val_groups}
            pool = [example for example in train if example.source not in held_out]
        else:
            pool = train
            val = read_e2e(self.e2e_dir / hp.val_file)
            self.val_groups = _first_groups(group_references(val), hp.val_size, "val_size")
        self.train_examples = self._draw_subset(pool)
        val_pairs = [
            Example(source, reference, group_id)
            for group_id, (source, references) in enumerate(self.val_groups)
            for reference in references
        ]
        self._train = self.collator.encode_pairs(self.train_examples, "train")
        self._val_loss = self.collator.encode_pairs(val_pairs, "validation (loss)")
        self._val_generation = self.collator.encode_prompts(self.val_groups, "validation (generation)")

    def _draw_subset(self, pool: list[Example]) -> list[Example]:
        size = self.hparams.train_size
        if size is None:
            return pool
        if not 0 < size <= len(pool):
            held_out = self.hparams.val_file == self.hparams.train_file
            raise ValueError(
                f"train_size={size}, but {self.hparams.train_file} has {len(pool)} training pairs available"
                + (" after holding out the validation groups" if held_out else "")
            )
        generator = torch.Generator().manual_seed(self.hparams.subset_seed)
        return [pool[i] for i in torch.randperm(len(pool), generator=generator)[:size].tolist()]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self._train,
            batch_size=self.hparams.batch_size,
            sampler=EpochShuffleSampler(len(self._train), self.hparams.shuffle_seed),
            collate_fn=self.collator.train_batch,
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> list[DataLoader]:
        loss_loader = DataLoader(
            self._val_loss,
            batch_size=self.hparams.eval_batch_size,
            collate_fn=self.collator.train_batch,
            num_workers=self.hparams.num_workers,
        )
        return [loss_loader, self._generation_loader(self._val_generation)]

    def test_dataloader(self) -> DataLoader:
        return self._generation_loader(self._test_generation)

    def _generation_loader(self, prompts: list[EncodedPrompt]) -> DataLoader:
        return DataLoader(
            prompts,
            batch_size=self.hparams.eval_batch_size,
            collate_fn=self.collator.generation_batch,
            num_workers=self.hparams.num_workers,
        )


def _first_groups(groups: list[tuple[str, list[str]]], size: int | None, name: str) -> list[tuple[str, list[str]]]:
    if size is None:
        return groups
    if not 0 < size <= len(groups):
        raise ValueError(f"{name}={size}, but the file has {len(groups)} MR groups")
    return groups[:size]
