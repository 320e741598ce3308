"""Named sets of benchmark runs: ``--suite gpu`` measures what the GPU issue's table reports, at real model shapes
(random weights, no download), bf16 autocast, E2E batches; one command on a GPU machine."""

from __future__ import annotations

from dataclasses import dataclass

TRAIN = ("train_ours", "train_peft", "train_full")
DECODE = ("generate_ours",)


@dataclass(frozen=True)
class SuiteRun:
    label: str
    overrides: tuple[str, ...]  # before the command line's own (which can add e.g. paths.data_dir)
    phases: tuple[str, ...]


@dataclass(frozen=True)
class Suite:
    precision: str
    runs: tuple[SuiteRun, ...]


SUITES = {
    "gpu": Suite(
        "bf16-mixed",
        (
            SuiteRun("135M shape, batch 10", ("model=random_smollm2_135m", "data.batch_size=10"), TRAIN + DECODE),
            SuiteRun("135M shape, batch 32", ("model=random_smollm2_135m", "data.batch_size=32"), TRAIN),
            SuiteRun("1.7B shape, batch 10", ("model=random_smollm2_1_7b", "data.batch_size=10"), TRAIN[:2]),
        ),
    ),
}
