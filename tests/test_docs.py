"""What the docs (README.md, docs/*.md) show holds for the code: the runs they show compose and pass the config
check, the README's table of config groups names every shipped option, the source files they name exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from prefix_lightning.training.checks import check_config
from prefix_lightning.training.optimized import settle_optimized_metric
from tests.helpers.config import CONF, REPO, compose_train, options

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# What a reader adds of their own (the README's example method and config folder): not shipped, so not composed here
# (tests/test_methods.py trains that method from a folder of its own).
OF_ONES_OWN = ("method=norms", "hydra.searchpath=")


def documented_runs() -> list[tuple[str, tuple[str, ...]]]:
    """The overrides of every `python run.py ...` (and `make run ARGS="..."`) the docs show, by document; commands
    with placeholders (<run>, resume=...) or of the reader's own files are left out."""
    runs = []
    for doc in DOCS:
        for line in doc.read_text().replace("\\\n", " ").splitlines():
            command = re.search(r"(?:python |`)run\.py((?: +[^\s`#]+)*)", line) or re.search(r'ARGS="([^"]*)"', line)
            if command is None:
                continue
            overrides = tuple(item for item in shlex.split(command.group(1)) if item not in ("-m", "..."))
            if overrides and not any(
                "<" in item or "..." in item or item.startswith(OF_ONES_OWN) for item in overrides
            ):
                runs.append((doc.name, overrides))
    return list(dict.fromkeys(runs))


DOCUMENTED_RUNS = documented_runs()


@pytest.mark.parametrize(
    ("doc", "overrides"), DOCUMENTED_RUNS, ids=[f"{doc}: {' '.join(run)}" for doc, run in DOCUMENTED_RUNS]
)
def test_the_runs_the_docs_show_compose_and_pass_the_config_check(
    doc: str, overrides: tuple[str, ...], tmp_path: Path
) -> None:
    """A renamed key, group option or value fails here rather than in a reader's run; a multirun's swept values
    are each composed (the others at their first value), GPU trainers on the CPU (the same keys)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    first = [
        f"{item.get_key_element()}={next(item.sweep_string_iterator())}"
        if item.is_sweep_override()
        else item.input_line
        for item in parsed
    ]
    variants = [first] + [
        [*first[:index], f"{item.get_key_element()}={value}", *first[index + 1 :]]
        for index, item in enumerate(parsed)
        if item.is_sweep_override()
        for value in item.sweep_string_iterator()
    ]
    for variant in variants:
        cfg = compose_train(tmp_path, variant)
        if cfg.trainer.accelerator == "gpu":
            cfg = compose_train(tmp_path, [*variant, "trainer.accelerator=cpu"])
        settle_optimized_metric(cfg)  # as train() does before it checks
        check_config(cfg)


def test_the_docs_show_runs() -> None:
    """The search above finds the docs' commands (a changed way of writing them would leave nothing to check)."""
    runs = DOCUMENTED_RUNS
    assert ("README.md", ("prefix.length=5", "trainer.max_steps=300")) in runs  # make run ARGS="..."
    assert {doc for doc, _ in runs} >= {"README.md", "lowdata.md", "methods.md", "smollm2_sweep.md"}
    assert len(runs) >= 20


def test_the_readme_table_of_groups_names_every_option() -> None:
    """The README's table of config groups lists each group's options: none missing, none that is not shipped."""
    rows = re.findall(r"^\| `(\w+)` \| (.*) \|$", (REPO / "README.md").read_text(), flags=re.MULTILINE)
    listed = {group: set(re.findall(r"`(\w+)`", cell)) for group, cell in rows}
    # A group's default.yaml is the base of its other options (trainer/), or its one option (callbacks/).
    shipped = {group: set(options(group)) for group in listed if (CONF / group).is_dir()}
    shipped = {group: names - {"default"} if len(names) > 1 else names for group, names in shipped.items()}
    assert {"model", "method", "data", "trainer", "logger"} <= set(shipped)
    assert {group: listed[group] for group in shipped} == shipped


# Files the docs name that are not the repository's: the reader's own (the README's example method) and the paper
# authors' script.
NOT_OURS = {"my_methods.py", "conf/method/norms.yaml", "gpt2/train_e2e.py"}


def test_the_source_files_the_docs_name_exist() -> None:
    """Every Python file (`prefix/attention.py`, or by its name where a table gives the package) and config file
    (`conf/...yaml`) the docs name is in the repository: a module renamed or moved leaves no stale name behind."""
    sources = [
        *REPO.glob("*.py"),
        *(path for folder in ("prefix_lightning", "tests", "conf") for path in (REPO / folder).rglob("*")),
    ]
    files = [path.relative_to(REPO).as_posix() for path in sources]
    named = {
        (doc.name, name)
        for doc in DOCS
        for name in re.findall(r"(?<![\w/.<-])((?:[\w.]+/)*\w+\.py|conf/[\w/]+\.yaml)\b", doc.read_text())
        if name not in NOT_OURS
    }
    assert len(named) > 50
    missing = [(doc, name) for doc, name in sorted(named) if not any(f"/{path}".endswith(f"/{name}") for path in files)]
    assert missing == []
