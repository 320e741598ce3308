"""``python -m prefix_lightning.benchmark [options] [Hydra overrides]``: see ``--help``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from prefix_lightning.benchmark import PHASES, format_report, run_benchmark, write_json
from prefix_lightning.benchmark.phases import MIXED, PRECISIONS, Setting
from prefix_lightning.benchmark.suites import SUITES, format_comparison
from prefix_lightning.cli import device_option, positive_float, positive_int, report_errors

EPILOG = """
Hydra overrides choose the model, prefix, batch sizes and decoding as for run.py, e.g. model=tiny_llama
prefix.length=5 data.batch_size=10 generation.num_beams=5 paths.data_dir=../shared/data. Training batches come
from <data_dir>/e2e/devset.csv (drawn with data.subset_seed), decoding inputs are the first --inputs meaning
representations of <data_dir>/e2e/testset_w_refs.csv. generate_mixed decodes them in batches whose rows read 4
prefixes in turn (--prefix, --mixed-prefix, random ones up to 4), timed against the same batches with one prefix
and against their 4 one-prefix batches in a row. The JSON holds every number printed, the outputs of the decoders,
and the setting.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m prefix_lightning.benchmark",
        description="Our prefix training vs PEFT's prefix tuning vs full fine-tuning, and our beam search vs "
        "PEFT's, on the same model, data and batches; each phase in a fresh process.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=positive_int, default=20, help="timed training steps per method (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps before them (default 2)")
    parser.add_argument(
        "--inputs", type=positive_int, default=100, help="test inputs decoded with beam search (default 100)"
    )
    parser.add_argument(
        "--check-inputs",
        type=positive_int,
        default=10,
        help="test inputs decoded greedily by both decoders (default 10)",
    )
    parser.add_argument(
        "--phases",
        type=phase_list,
        default=",".join(PHASES),
        help=f"comma-separated subset of {','.join(PHASES)} (default: all, in this order)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="32",
        help="32 (default), or bf16-mixed: autocast for every method; a frozen LM (ours, PEFT's) is stored in bf16",
    )
    parser.add_argument("--device", type=device_option, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads per phase (default: torch's)")
    parser.add_argument(
        "--prefix", default=None, help="exported prefix folder to decode with (default: the one train_ours ends with)"
    )
    parser.add_argument(
        "--mixed-prefix",
        action="append",
        default=[],
        metavar="FOLDER",
        help="generate_mixed: another prefix to mix with --prefix (repeat; filled up to 4 with random ones)",
    )
    parser.add_argument(
        "--fixed-new-tokens",
        type=positive_int,
        default=None,
        help="generate_mixed: decode exactly N tokens per input, so that every timed batch does the same steps",
    )
    parser.add_argument(
        "--peak-tflops",
        type=positive_float,
        default=None,
        help="the device's peak TFLOP/s at this precision, for MFU (default: known for H100/H200/A100/L4 GPUs)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="folder for a torch.profiler trace and table of one more step (or decoding batch) of every phase; on "
        "CUDA also the host-device synchronisations by source line",
    )
    parser.add_argument(
        "--suite",
        choices=sorted(SUITES),
        default=None,
        help="a named set of runs instead of one (gpu: the GPU issue's table at real shapes, bf16-mixed; frozen_lm: "
        "our prefix on the LM stored in float32, bfloat16, int8 and int4, each against float32); "
        "--phases and --precision are then the suite's, overrides are added to each run's",
    )
    parser.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="LABEL",
        help="with --suite: only the suite's run of this label (repeat for several), e.g. to give each its own time "
        "limit",
    )
    parser.add_argument("--output", type=Path, default=None, help="JSON file (default outputs/benchmark/<time>.json)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the train config")
    args = parser.parse_intermixed_args(argv)  # options may follow the overrides
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    if len(args.mixed_prefix) > MIXED - 1:
        parser.error(f"--mixed-prefix: at most {MIXED - 1} (batches mix {MIXED} prefixes, --prefix's among them)")
    mixing = [
        option
        for option, value in (("--mixed-prefix", args.mixed_prefix), ("--fixed-new-tokens", args.fixed_new_tokens))
        if value
    ]
    if mixing and args.suite is None and "generate_mixed" not in args.phases:
        parser.error(f"{' and '.join(mixing)}: for generate_mixed, which --phases leaves out")
    if args.suite == "gpu" and torch.device(args.device).type != "cuda":
        parser.error(f"--suite gpu measures real model shapes on a GPU (hours on --device {args.device}): use a GPU")
    if args.run:
        if args.suite is None:
            parser.error("--run picks runs of a suite: give --suite too")
        labels = [run.label for run in SUITES[args.suite].runs]
        unknown = [label for label in args.run if label not in labels]
        if unknown:
            parser.error(f"--run {unknown[0]!r}: not a run of suite {args.suite}; its runs: {labels}")
    if args.output is not None and args.output.is_dir():
        parser.error(f"--output {args.output}: a folder; give the JSON file to write")
    if args.profile is not None and args.profile.exists() and not args.profile.is_dir():
        parser.error(f"--profile {args.profile}: a file; give a folder")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    output = args.output or Path("outputs") / "benchmark" / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}.json"
    if args.suite:
        suite, runs = SUITES[args.suite], {}
        for run in (run for run in suite.runs if not args.run or run.label in args.run):
            print(f"\n== {run.label}")
            setting = _setting(args, (*run.overrides, *args.overrides), run.precision)
            runs[run.label] = run_benchmark(setting, run.phases)
            write_json(runs, output)  # after each run: a suite cut short by a time limit keeps what it measured
        print("".join(f"\n== {label}\n{format_report(result)}\n" for label, result in runs.items()))
        if suite.compared:
            print(f"== against {next(iter(runs))}\n{format_comparison(runs)}\n")
        print(f"written to {output}")
        return
    benchmark = run_benchmark(_setting(args, tuple(args.overrides), args.precision), args.phases)
    write_json(benchmark, output)
    print("\n" + format_report(benchmark) + f"\n\nwritten to {output}")


def phase_list(names: str) -> tuple[str, ...]:
    """``--phases``: known phases, each once (one result per phase)."""
    phases = tuple(name for name in names.split(",") if name)
    if not phases:
        raise argparse.ArgumentTypeError(f"{names!r} names no phase")
    unknown = [name for name in phases if name not in PHASES]
    if unknown:
        raise argparse.ArgumentTypeError(f"{unknown[0]!r} is not a phase; choose from {','.join(PHASES)}")
    repeated = sorted({name for name in phases if phases.count(name) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{names!r} names {', '.join(repeated)} more than once")
    return phases


def _setting(args: argparse.Namespace, overrides: tuple[str, ...], precision: str) -> Setting:
    return Setting(
        overrides=overrides,
        steps=args.steps,
        warmup=args.warmup,
        inputs=args.inputs,
        check_inputs=args.check_inputs,
        precision=precision,
        device=args.device,
        threads=args.threads,
        prefix_dir=args.prefix,
        mixed_prefix_dirs=tuple(args.mixed_prefix),
        fixed_new_tokens=args.fixed_new_tokens,
        peak_tflops=args.peak_tflops,
        profile_dir=str(args.profile) if args.profile else None,
    )


if __name__ == "__main__":
    report_errors(main)
