"""Every method's export: `evaluate` loads it (the folder says which method wrote it) and reproduces the run's
recorded test scores and generations; `python -m prefix_lightning.export` writes the export of any checkpoint; each
export folder carries a model card stating the run's facts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from safetensors.torch import load_file

from prefix_lightning.evaluate import with_run_settings
from prefix_lightning.export import export_checkpoint
from prefix_lightning.methods.exports import export_loader
from prefix_lightning.training.checks import ConfigError
from prefix_lightning.training.resume import STARTED_CONFIG, exporting_run
from tests.helpers.cli import run_cli
from tests.helpers.config import REPO, run_folder

# Every method class once (prefix_direct is PrefixModel like prefix).
METHODS = ("prefix", "embedding", "infix", "full", "top2", "lora", "peft_prefix")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny run per method (one multirun, so one process), each exporting its best validation checkpoint."""
    sweep = tmp_path_factory.mktemp("methods")
    command = [sys.executable, "run.py", "-m", f"hydra.sweep.dir={sweep}", "model=tiny_llama", "debug=fast"]
    command.append(f"method={','.join(METHODS)}")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    records = {path.parent: json.loads(path.read_text()) for path in sweep.glob("*/result.json")}
    return {record["overrides"]["method"]: run for run, record in records.items()}


@pytest.mark.integration
@pytest.mark.parametrize("method", METHODS)
def test_evaluate_reproduces_each_methods_recorded_test_scores(method: str, runs: dict[str, Path], tmp_path) -> None:
    run = runs[method]
    record = json.loads((run / "result.json").read_text())
    assert record["export"] == "best" and record["test"]
    export = run / record["prefix"]
    result = run_cli(tmp_path, f"export_path={export}", entry=("-m", "prefix_lightning.evaluate"))
    assert f"evaluating with the settings of the run in {run}" in result.stderr
    evaluated = json.loads((tmp_path / "test_metrics.json").read_text())
    assert evaluated == json.loads((run / "test_metrics.json").read_text())
    assert {f"test/{name.lower()}": value for name, value in evaluated.items()} == pytest.approx(record["test"])
    assert (tmp_path / "test_generations.txt").read_text() == (run / "test_generations.txt").read_text()


@pytest.mark.integration
def test_every_export_folder_has_a_model_card_of_the_runs_facts(runs: dict[str, Path]) -> None:
    for method, run in runs.items():
        record = json.loads((run / "result.json").read_text())
        card = (run / record["prefix"] / "README.md").read_text()
        assert card.startswith("---\n") and f"# {method} for tiny_llama" in card
        assert f"(`python run.py method={method} ...`)" in card  # the config's own name: top2, not top_layers
        if method in ("prefix", "embedding", "infix"):
            assert f"(stored as {'input embeddings' if method == 'embedding' else 'keys/values'};" in card
        assert " on e2e\n" in card and "| data | 16 training pairs |" in card
        assert f"exported: the best validation checkpoint, step {record['exported_step']}" in card
        for name, value in record["test"].items():
            assert f"| {name} | {value:.4g} |" in card
        assert "load_export(lm, " in card
        assert ("PeftModel.from_pretrained" in card) == (method in ("prefix", "lora", "peft_prefix"))


@pytest.mark.integration
def test_the_export_command_writes_any_checkpoints_export(runs: dict[str, Path], tmp_path: Path) -> None:
    run = runs["prefix"]
    record = json.loads((run / "result.json").read_text())
    best = run / record["best_checkpoint"]
    command = [sys.executable, "-m", "prefix_lightning.export"]
    done = subprocess.run([*command, str(best), str(tmp_path / "best")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    exported, original = (load_file(folder / "prefix.safetensors") for folder in (tmp_path / "best", run / "prefix"))
    assert all((exported[key] == original[key]).all() for key in original)
    assert (tmp_path / "best" / "README.md").read_text() == (run / "prefix" / "README.md").read_text()  # the same

    # The card states what the run's config gives its card (callbacks.export.card), as the run's own did.
    edited = tmp_path / "edited_run"
    shutil.copytree(run / ".hydra", edited / ".hydra")
    (edited / "checkpoints").mkdir()
    shutil.copy(best, edited / "checkpoints")
    config = OmegaConf.load(edited / STARTED_CONFIG)
    config.callbacks.export.card.dataset = "e2e_renamed"
    OmegaConf.save(config, edited / STARTED_CONFIG)
    export_checkpoint(edited / "checkpoints" / best.name, tmp_path / "renamed")
    assert "# prefix for tiny_llama on e2e_renamed\n" in (tmp_path / "renamed" / "README.md").read_text()

    last = run / "checkpoints" / "last.ckpt"
    subprocess.run([*command, str(last), str(tmp_path / "last")], cwd=REPO, check=True, capture_output=True)
    last_prefix = load_file(tmp_path / "last" / "prefix.safetensors")
    assert any(not (last_prefix[key] == original[key]).all() for key in original)
    assert "## Scores" not in (tmp_path / "last" / "README.md").read_text()  # not the tested weights

    truncated = tmp_path / "checkpoints" / "cut.ckpt"
    truncated.parent.mkdir()
    truncated.write_bytes(best.read_bytes()[:1000])
    refused = subprocess.run([*command, str(truncated), str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"error: checkpoint {truncated} cannot be used: it is truncated or not a checkpoint (1,000 bytes, no complete "
        f"torch archive); no intact checkpoint in {truncated.parent} (set HYDRA_FULL_ERROR=1 for the traceback)"
    ]


def test_the_export_command_refuses_a_file_for_its_folder_first(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("")
    with pytest.raises(ValueError, match="taken is a file: give a folder to export into"):
        export_checkpoint(tmp_path / "no.ckpt", tmp_path / "taken")  # before the checkpoint is even looked at
    (tmp_path / "prefix").mkdir()
    (tmp_path / "prefix" / "prefix.safetensors").write_text("")
    with pytest.raises(ValueError, match="prefix is not empty: give a new folder to export into, or --overwrite"):
        export_checkpoint(tmp_path / "no.ckpt", tmp_path / "prefix")
    with pytest.raises(FileNotFoundError, match="no.ckpt"):  # allowed: on to the checkpoint
        export_checkpoint(tmp_path / "no.ckpt", tmp_path / "prefix", overwrite=True)


def test_a_folder_without_an_export_is_refused_naming_what_was_looked_for(tmp_path: Path) -> None:
    checkpoint = tmp_path / "step2.ckpt"
    checkpoint.touch()
    with pytest.raises(
        ValueError, match=r"step2.ckpt is a file, not an export folder \(python -m prefix_lightning.export"
    ):
        export_loader(checkpoint)
    with pytest.raises(FileNotFoundError, match=r"holds no export of this project's methods: expected prefix_config"):
        export_loader(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"\(a method of one's own saves its own files, which its own code"):
        export_loader(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(ValueError, match=r"describes a 'IA3' adapter; this project trains LORA, PREFIX_TUNING"):
        export_loader(tmp_path)


def test_evaluate_refuses_two_exports(tmp_path: Path) -> None:
    """prefix_path (the older name) silently won over export_path."""
    first, second = tmp_path / "a", tmp_path / "b"
    with pytest.raises(ConfigError, match=f"export_path={first} and prefix_path={second}: give one export to evaluate"):
        with_run_settings(["evaluate", f"export_path={first}", f"prefix_path={second}"])
    assert (
        with_run_settings(["evaluate", f"export_path={first}", f"prefix_path='{first}'"])[-1]
        == f"prefix_path='{first}'"
    )


def test_evaluate_says_which_settings_an_export_overrules(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["evaluate", "prefix.length=5", f"export_path={tmp_path}", "data.test_size=4", "method=lora"]
    assert with_run_settings(argv)[1:] == ["data.test_size=4", f"export_path='{tmp_path}'"]  # nothing checks them
    assert f"ignoring prefix.length=5 method=lora: the export in {tmp_path} says its method" in capsys.readouterr().err
    with_run_settings(["evaluate", f"export_path={tmp_path}", "data.test_size=4", "+prefixes=1"])
    said = capsys.readouterr().err
    assert "ignoring" not in said
    assert f"{tmp_path} is not in its run's folder: evaluating with the settings given (data, decoding)" in said


def test_evaluate_takes_a_run_folder_for_the_export_it_holds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = run_folder(tmp_path / "job=1,lr=2", "method:\n  export_dir: adapter\n", ["method=lora", "data.train_size=8"])
    argv = with_run_settings(["evaluate", f"export_path={run}", "data.test_size=4"])
    assert argv == [
        "evaluate",
        "method=lora",
        "data.train_size=8",
        "data.test_size=4",
        f"export_path='{run / 'adapter'}'",
    ]
    assert f"evaluating with the settings of the run in {run}: method=lora data.train_size=8" in capsys.readouterr().err


def test_evaluate_on_another_data_choice_keeps_what_composes_and_puts_hydras_flags_last(tmp_path: Path) -> None:
    """A mixture's run scored on one dataset: its data.tasks (which data=e2e_devsplit lacks) left out, its budget
    kept; ``--cfg job`` after the rebuilt overrides (Hydra's parser reads them in one run)."""
    run = run_folder(
        tmp_path / "run",
        "method:\n  export_dir: prefix\n",
        ["data=multi", "data.tasks=[e2e_devsplit,webnlg]", "data.train_size=8"],
    )
    (run / ".hydra" / "hydra.yaml").write_text("hydra:\n  runtime:\n    choices:\n      data: multi\n")
    argv = with_run_settings(["evaluate", "--cfg", "job", f"export_path={run}", "data=e2e_devsplit"])
    assert argv == [
        "evaluate",
        "data.train_size=8",
        "data=e2e_devsplit",
        f"export_path='{run / 'prefix'}'",
        "--cfg",
        "job",
    ]


def test_evaluate_does_not_write_into_the_folder_the_run_was_given(tmp_path: Path) -> None:
    """A run started with paths.output_dir=<its folder>: evaluating its export with other settings writes into
    evaluate's own folder, not over the run's test outputs."""
    run = run_folder(
        tmp_path / "run", "method:\n  export_dir: prefix\n", ["data.train_size=8", f"paths.output_dir={tmp_path}"]
    )
    argv = with_run_settings(["evaluate", f"export_path={run}", "generation.num_beams=1"])
    assert argv == ["evaluate", "data.train_size=8", "generation.num_beams=1", f"export_path='{run / 'prefix'}'"]


def test_an_export_in_its_run_folder_is_found_by_evaluate_and_generate(tmp_path: Path) -> None:
    """The run's own export, another export of its checkpoints into its folder, one task's prefix of a multi-task
    run; not an export moved out of the run, nor a folder in an export that is not a task's prefix."""
    run = run_folder(tmp_path / "run", "method:\n  export_dir: prefix\n", ["data=multi"])
    for folder in ("prefix/e2e", "prefix/webnlg", "step4"):
        (run / folder).mkdir(parents=True)
        (run / folder / "prefix_config.json").write_text("{}")
    (tmp_path / "moved").mkdir()
    assert exporting_run(run / "prefix") == (run, None)
    assert exporting_run(run / "step4") == (run, None)
    assert exporting_run(run / "prefix" / "webnlg") == (run, "webnlg")
    assert exporting_run(run / "step4" / "extra") is None
    assert exporting_run(tmp_path / "moved") is None


def test_evaluate_of_a_prefix_outside_its_run_loads_the_model_it_records(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The one model config whose backbone the export records, unless model= is given; where several match, the
    error asks for model=."""

    def exported(identity: str) -> Path:
        folder = tmp_path / identity.replace(":", "_")
        folder.mkdir()
        description = {"format": "prefix-lightning/2", "prefix": {"length": 2}, "sites": []}
        (folder / "prefix_config.json").write_text(
            json.dumps({**description, "base_model": {"name_or_path": identity}})
        )
        return folder

    smollm2 = exported("embedded:smollm2-135m-instruct")
    assert with_run_settings(["evaluate", f"export_path={smollm2}"])[1] == "model=smollm2_135m"
    assert "evaluating on model=smollm2_135m, the base model the export records" in capsys.readouterr().err
    assert with_run_settings(["evaluate", f"export_path={smollm2}", "model=tiny_llama"])[1] == "model=tiny_llama"
    several = exported("random:llama")  # tiny_llama, random_smollm2_135m, ...
    with pytest.raises(ValueError, match="random:llama, and configs .*tiny_llama.* match it: give the model config"):
        with_run_settings(["evaluate", f"export_path={several}"])
    given = with_run_settings(["evaluate", f"export_path={several}", "model=tiny_llama"])
    assert given == ["evaluate", "model=tiny_llama", f"export_path='{several}'"]
