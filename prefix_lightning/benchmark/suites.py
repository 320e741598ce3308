"""Named sets of benchmark runs, one command each: ``--suite gpu`` measures what the GPU issue's acceptance names,
at real model shapes (random weights, no download), bf16 autocast, E2E batches of 32; ``--suite frozen_lm`` trains and
decodes the same prefix on SmolLM2-135M stored four ways (float32, bfloat16, int8, int4) and prints each against
float32."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TRAIN = ("train_ours", "train_peft", "train_full")


@dataclass(frozen=True)
class SuiteRun:
    label: str
    overrides: tuple[str, ...]  # before the command line's own (which can add e.g. paths.data_dir)
    phases: tuple[str, ...]
    precision: str  # "32" or "bf16-mixed" (the frozen LM is then stored in bf16)


@dataclass(frozen=True)
class Suite:
    runs: tuple[SuiteRun, ...]
    compared: bool = False  # the runs differ only in how the LM is stored: each is set against the first


def _bf16(label: str, *overrides: str, phases: tuple[str, ...]) -> SuiteRun:
    return SuiteRun(label, overrides, phases, "bf16-mixed")


OURS = ("train_ours", "generate_ours")
# The 100 test inputs decoded as one batch (500 beams): a GPU decoding step is host-bound, its time about
# the same for 50 rows as for 500, so the 10 inputs per batch that suit the CPU would leave the GPU idle.
ONE_DECODING_BATCH = "data.eval_batch_size=100"
# Our training again with the blocks compiled (model.compile; decoding runs eager either way): the warm-up steps
# compile.
COMPILED = ("model.compile=true",)
# Training batches of similar lengths, as a GPU run should draw them (data.group_by_length): a step's GPU time follows
# its padded tokens, 1.44 per real token in random batches of 32 E2E pairs, 1.02 grouped. Every method trains on
# the same batches.
GROUPED = "data.group_by_length=true"
AT_135M = ("model=random_smollm2_135m", "data.batch_size=32", GROUPED, ONE_DECODING_BATCH)
AT_1_7B = ("model=random_smollm2_1_7b", "data.batch_size=32", GROUPED)
SUITES = {
    "gpu": Suite(
        (
            # PEFT's decoding last: the slowest phase, which a time limit (.ci/gpu) should cut rather than another.
            _bf16("135M shape, batch 32", *AT_135M, phases=OURS + TRAIN[1:] + ("generate_peft",)),
            _bf16("135M compiled", *AT_135M, *COMPILED, phases=OURS[:1]),
            _bf16("1.7B shape, batch 32", *AT_1_7B, phases=TRAIN),
            _bf16("1.7B compiled", *AT_1_7B, *COMPILED, phases=OURS[:1]),
        )
    ),
    "frozen_lm": Suite(
        (
            SuiteRun("float32", (), OURS, "32"),
            SuiteRun("bfloat16", (), OURS, "bf16-mixed"),
            SuiteRun("int8", ("model.backbone.quantization=int8",), OURS, "32"),
            SuiteRun("int4", ("model.backbone.quantization=int4",), OURS, "32"),
        ),
        compared=True,
    ),
}


def format_comparison(runs: dict[str, dict[str, Any]]) -> str:
    """Each phase of each run beside the first run's: tokens/s and peak memory, and their ratios to it."""
    first = next(iter(runs.values()))["results"]
    lines = [f"{'phase':<15}{'run':<10}{'tokens/s':>10}{'x first':>9}{'peak MB':>10}{'x first':>9}"]
    for phase in first:
        for label, benchmark in runs.items():
            result, base = benchmark["results"][phase], first[phase]
            speed, memory = result["tokens_per_s"], result["peak_memory_mb"]
            lines.append(
                f"{phase:<15}{label:<10}{speed:>10.1f}{speed / base['tokens_per_s']:>9.2f}"
                f"{memory:>10.0f}{memory / base['peak_memory_mb']:>9.2f}"
            )
    return "\n".join(lines)
