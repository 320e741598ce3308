"""Score a file of outputs with a dataset's official metrics, without training or a model.

    python -m prefix_lightning.score --suite e2e --hypotheses gen.txt --references refs.txt [--output scores.json]
    python -m prefix_lightning.score --suite e2e --generations run/test_generations.jsonl
    python -m prefix_lightning.score --suite webnlg --generations multitask_run/test_generations.jsonl --task webnlg

Hypotheses: one per line. References, one group per hypothesis, in either format:
- text, as e2e-metrics reads it: one reference per line, groups separated by one empty line (a file without
  empty lines holds one reference per hypothesis, or, for a single hypothesis, its group of references);
- JSONL with a `references` list per line, such as the `test_generations.jsonl` a run writes;
- the official E2E CSV (`mr,ref`), grouped by meaning representation in file order.
`--generations` reads both sides from a run's JSONL (`generation` and `references`). A run over several tasks
(`data=multi`) writes all tasks' outputs into one file, each line with its `task`: `--task` picks one.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import NoReturn

from prefix_lightning.data import group_references, read_e2e
from prefix_lightning.data.files import read_text
from prefix_lightning.evaluation import SUITES, MetricSkippedWarning, score


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line instead of usage plus message, like every other failure of this command."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def read_hypotheses(path: Path) -> list[str]:
    """One output per line, stripped; empty lines are empty outputs (e2e-metrics' `read_lines`)."""
    return [line.strip() for line in _lines(path)]


def read_references(path: Path, num_hypotheses: int, task: str | None = None) -> list[list[str]]:
    """Reference groups from a text, JSONL or E2E CSV file (see the module docstring)."""
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path, with_generation=False, task=task)[1]
    if path.suffix.lower() == ".csv":
        _require_file(path)  # read_e2e would explain how to download the E2E release
        return [refs for _, refs in group_references(read_e2e(path))]
    lines = _lines(path)
    while lines and not lines[-1].strip():  # trailing empty lines end the file, not a group
        lines.pop()
    groups: list[list[str]] = [[]]
    for number, line in enumerate(lines, start=1):
        if line.strip():
            groups[-1].append(line.strip())
        elif not groups[-1]:
            raise ValueError(f"{path}, line {number}: empty reference group (separate groups by one empty line)")
        else:
            groups.append([])
    if len(groups) == 1 and num_hypotheses != 1:  # no separators: one reference per hypothesis
        groups = [[reference] for reference in groups[0]]
    return groups


def read_generations(path: Path, task: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Outputs and reference groups from a run's `*_generations.jsonl` (of one `task`, for a multi-task run's)."""
    return _read_jsonl(path, with_generation=True, task=task)


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {'a folder, not a file' if path.is_dir() else 'no such file'}")


def _read_text(path: Path) -> str:
    """As the data files are read: UTF-8 with or without a byte-order mark (which would otherwise stick to the first
    output and lower its score), or UTF-16."""
    _require_file(path)
    return read_text(path)


def _lines(path: Path) -> list[str]:
    """The file's lines, split at line ends only (``splitlines`` also splits at U+2028 and form feeds, which an
    output may hold)."""
    lines = _read_text(path).split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _read_jsonl(path: Path, with_generation: bool, task: str | None) -> tuple[list[str], list[list[str]]]:
    """(`generation` per line if asked for, `references` per line), checked, skipping empty lines; only the lines of
    `task` when given. Lines of several tasks without `task` are refused: one suite's scores over a mixture of
    datasets would be no dataset's."""
    generations: list[str] = []
    references: list[list[str]] = []
    tasks: dict[str | None, None] = {}  # in first-seen order
    for number, line in enumerate(_read_text(path).split("\n"), start=1):  # JSON may hold a raw U+2028
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not JSON ({err.msg})") from None
        record_task = record.get("task") if isinstance(record, dict) else None
        tasks[record_task] = None
        if task is not None and record_task != task:
            continue
        refs = record.get("references") if isinstance(record, dict) else None
        if not refs or not isinstance(refs, list) or not all(isinstance(ref, str) for ref in refs):
            raise ValueError(f"{where}: expected a non-empty `references` list of strings")
        references.append(refs)
        if with_generation:
            generation = record.get("generation")
            if not isinstance(generation, str):
                raise ValueError(f"{where}: expected a `generation` string")
            generations.append(generation)
    if task is not None and not references:
        found = ", ".join(str(name) for name in tasks) or "none"
        raise ValueError(f"{path}: no line of task {task!r} (tasks: {found})")
    if task is None and len(tasks) > 1:
        found = ", ".join(str(name) for name in tasks)
        raise ValueError(f"{path} holds the outputs of several tasks ({found}): pick one with --task")
    return generations, references


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m prefix_lightning.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", required=True, choices=list(SUITES), help="which official metrics")
    parser.add_argument("--hypotheses", type=Path, help="outputs, one per line")
    parser.add_argument("--references", type=Path, help="reference groups: .txt, .jsonl or E2E .csv")
    parser.add_argument("--generations", type=Path, help="a run's *_generations.jsonl (outputs and references)")
    parser.add_argument("--task", help="score only the JSONL lines of this task (a multi-task run's outputs)")
    parser.add_argument("--output", type=Path, help="also write the scores to this JSON file")
    args = parser.parse_args(argv)
    if args.generations is not None and (args.hypotheses or args.references):
        parser.error("give either --generations or --hypotheses with --references, not both")
    if args.generations is None and not (args.hypotheses and args.references):
        parser.error("give --hypotheses and --references, or --generations")
    if args.hypotheses is not None and args.hypotheses.suffix.lower() == ".jsonl":
        # Each JSON line would be scored as an output text, which still gets a (meaningless) score.
        parser.error("--hypotheses takes one output per line; a run's JSONL goes to --generations")
    if args.task is not None and (args.generations or args.references).suffix.lower() != ".jsonl":
        parser.error("--task picks lines of a JSONL file (--generations, or --references *.jsonl)")

    try:
        if args.output is not None:  # a place the scores cannot go is refused before the scoring, not after it
            if args.output.is_dir():
                raise ValueError(f"--output {args.output} is a folder: give the JSON file's name")
            args.output.parent.mkdir(parents=True, exist_ok=True)
        if args.generations is not None:
            hypotheses, references = read_generations(args.generations, args.task)
        else:
            hypotheses = read_hypotheses(args.hypotheses)
            references = read_references(args.references, len(hypotheses), args.task)
        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MetricSkippedWarning)
            scores = score(args.suite, hypotheses, references)
        for warning in caught:
            print(f"warning: {warning.message}", file=sys.stderr)
        print(f"{args.suite}: {len(hypotheses)} hypotheses")
        for name, value in scores.items():
            print(f"  {name:<8} {value:10.4f}")
        if args.output is not None:
            report = {"suite": args.suite, "num_hypotheses": len(hypotheses), "scores": scores}
            args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
