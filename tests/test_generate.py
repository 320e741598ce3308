"""`python -m prefix_lightning.generate`: new inputs decoded with several prefixes mixed in batches, no references;
bad inputs named by line before anything loads."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from prefix_lightning import PrefixModel
from prefix_lightning.decoding import generated_texts
from prefix_lightning.generate import (
    adopt_run_settings,
    exporting_runs,
    main,
    parse_prefixes,
    prompt_collators,
    read_requests,
)
from prefix_lightning.training.build import FLOAT_OPTIONS, generation_settings, load_configured_backbone
from prefix_lightning.training.compose import compose_config, model_config_for
from prefix_lightning.training.resume import run_config, run_model_overrides
from tests.helpers.config import REPO, compose_train, run_folder
from tests.helpers.tiny import tiny_lm

SOURCES = [
    "name : The Eagle | eatType : coffee shop | area : riverside",
    "Aarhus_Airport : cityServed : Aarhus, Denmark",
    "name : Alimentum | area : city centre | familyFriendly : no",
    "Mars Hill College : joined : 1973",
    "name : Zizzi | food : Italian",
]
NAMES = ["e2e", "webnlg", None, "e2e", "webnlg"]
DECODING = ["generation.max_new_tokens=6", "generation.num_beams=3"]
# The prefixes record "random:llama", which several random model configs share: the command is told which.
GENERATE = ["model=tiny_llama", *DECODING]


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Path]:
    """Two random prefixes of different lengths exported from the tiny Llama config's backbone."""
    folder = tmp_path_factory.mktemp("prefixes")
    cfg = compose_train(folder, ["model=tiny_llama"])
    exported = {}
    for seed, (name, length) in enumerate([("e2e", 3), ("webnlg", 6)]):
        torch.manual_seed(seed)
        lm, _ = load_configured_backbone(cfg)
        exported[name] = PrefixModel(lm, length=length, hidden_dim=16).save(folder / name)
    return exported


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def expected_generations(prefixes: dict[str, Path], tmp_path: Path) -> list[str]:
    """Each input decoded alone by a PrefixModel with its prefix (the plain LM for None)."""
    cfg = compose_train(tmp_path, ["model=tiny_llama", *DECODING])
    texts = []
    for source, name in zip(SOURCES, NAMES, strict=True):
        lm, tokenizer = load_configured_backbone(cfg)
        model = PrefixModel.from_prefix(lm, prefixes[name]) if name else PrefixModel(lm, length=1)
        ids = tokenizer(source + cfg.model.separator, add_special_tokens=False, return_tensors="pt").input_ids
        with model.prefix_disabled() if name is None else nullcontext():
            output = model.generate(input_ids=ids, **generation_settings(cfg, tokenizer))
        texts.append(tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return texts


def prefix_options(prefixes: dict[str, Path]) -> list[str]:
    return [option for name, folder in prefixes.items() for option in ("--prefix", f"{name}={folder}")]


def test_mixed_prefixes_decode_as_each_prefix_alone(prefixes: dict[str, Path], tmp_path: Path) -> None:
    rows = [{"id": i, "source": s, "prefix": n} for i, (s, n) in enumerate(zip(SOURCES, NAMES, strict=True))]
    inputs = write_jsonl(tmp_path / "inputs.jsonl", rows)
    output = tmp_path / "outputs.jsonl"
    options = ["--input", str(inputs), "--output", str(output), "--batch-size", "4", *GENERATE]
    assert main([*prefix_options(prefixes), *options]) == 0
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(row["id"], row["source"], row["prefix"]) for row in written] == [
        (row["id"], row["source"], row["prefix"]) for row in rows
    ]
    assert [row["generation"] for row in written] == expected_generations(prefixes, tmp_path)


def test_an_infix_decodes_alone_as_its_prefix_model_does(
    prefixes: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A bank holds no infix (only the target reads it): generate decodes one on its own PrefixModel, and refuses
    to mix it with other prefixes or the plain LM before anything loads."""
    cfg = compose_train(tmp_path, ["model=tiny_llama", *DECODING])
    torch.manual_seed(3)
    infix = PrefixModel(load_configured_backbone(cfg)[0], length=4, kind="infix").save(tmp_path / "infix")
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("".join(source + "\n" for source in SOURCES[:3]))
    output = tmp_path / "outputs.txt"
    assert main(["--prefix", f"infix={infix}", "--input", str(inputs), "--output", str(output), *GENERATE]) == 0
    lm, tokenizer = load_configured_backbone(cfg)
    model = PrefixModel.from_prefix(lm, infix).eval()
    expected = []
    for source in SOURCES[:3]:
        ids = tokenizer(source + cfg.model.separator, add_special_tokens=False, return_tensors="pt").input_ids
        generated = model.generate(input_ids=ids, **generation_settings(cfg, tokenizer))
        expected.append(tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True).strip())
    assert output.read_text().splitlines() == expected
    capsys.readouterr()
    with_e2e = ["--prefix", f"infix={infix}", "--prefix", f"e2e={prefixes['e2e']}"]
    for options, other in ((with_e2e, "e2e"), (["--prefix", f"infix={infix}"], None)):  # None: the plain LM
        rows = [{"source": SOURCES[0], "prefix": "infix"}, {"source": SOURCES[1], "prefix": other}]
        write_jsonl(inputs, rows)
        with pytest.raises(SystemExit):
            main([*options, "--input", str(inputs), "--output", "-", *GENERATE])
        said = capsys.readouterr().err
        assert "error: --prefix infix is an infix, which only the target reads: it decodes alone" in said
        assert "generate:" not in said  # refused before anything loads


def test_plain_text_with_one_prefix(prefixes: dict[str, Path], tmp_path: Path) -> None:
    """As editors save it (a byte-order mark, a blank last line), with a prefix in a sweep job's folder."""
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\ufeff" + "\n".join(SOURCES[:2]) + "\n\n")
    job = shutil.copytree(prefixes["e2e"], tmp_path / "sweep" / "data.train_size=50,prefix.length=3" / "prefix")
    for given, name in ((str(job), "prefix"), (f"e2e={job}", "e2e")):
        output = tmp_path / "outputs.jsonl"
        options = ["--prefix", given, *GENERATE, "--input", str(inputs), "--output", str(output)]  # options last too
        assert main(options) == 0
        written = [json.loads(line) for line in output.read_text().splitlines()]
        assert [(row["source"], row["prefix"]) for row in written] == [(source, name) for source in SOURCES[:2]]
    text = tmp_path / "outputs.txt"
    assert main(["--prefix", str(job), *GENERATE, "--input", str(inputs), "--output", str(text)]) == 0
    assert text.read_text().splitlines() == [row["generation"] for row in written]


def test_inputs_are_read_as_data_files_are(
    prefixes: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """UTF-16 with its byte-order mark (what Windows PowerShell's ``>`` writes) and Windows line ends are read; bytes
    that are no UTF-8 are named by file and line."""
    utf16 = tmp_path / "inputs.txt"
    utf16.write_bytes("\r\n".join(SOURCES[:2]).encode("utf-16") + "\r\n".encode("utf-16-le"))
    output = tmp_path / "outputs.jsonl"
    options = ["--prefix", str(prefixes["e2e"]), *GENERATE, "--output", str(output)]
    assert main([*options, "--input", str(utf16)]) == 0
    assert [json.loads(line)["source"] for line in output.read_text().splitlines()] == SOURCES[:2]
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("a source\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(SystemExit):
        main([*options, "--input", str(latin1)])
    assert f"{latin1}, line 2: not UTF-8 text (byte 0xe9)" in capsys.readouterr().err


def test_text_to_stdout_and_inputs_kept(prefixes: dict[str, Path], tmp_path: Path, capsys) -> None:
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\n".join(SOURCES[:2]) + "\n")
    options = ["--prefix", str(prefixes["e2e"]), *GENERATE, "--input", str(inputs)]
    assert main([*options, "--output", "-", "--output-format", "text"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and not any(line.startswith("{") for line in lines)
    with pytest.raises(SystemExit):
        main([*options, "--output", str(tmp_path / "." / "inputs.txt")])
    assert "is the --input file" in capsys.readouterr().err
    assert inputs.read_text() == "\n".join(SOURCES[:2]) + "\n"


def test_sampled_decoding_is_seeded(prefixes: dict[str, Path], tmp_path: Path) -> None:
    inputs = write_jsonl(tmp_path / "inputs.jsonl", [{"source": source} for source in SOURCES])
    sampling = ["generation.do_sample=true", "generation.num_beams=1"]

    def sampled(*overrides: str) -> str:
        output = tmp_path / "outputs.jsonl"
        options = ["--prefix", str(prefixes["e2e"]), "--input", str(inputs), "--output", str(output)]
        assert main([*options, *GENERATE, *sampling, *overrides]) == 0
        return output.read_text()

    assert sampled() == sampled() != sampled("seed=2")


def test_whole_numbers_are_taken_for_options_transformers_wants_as_floats(
    prefixes: dict[str, Path], tmp_path: Path
) -> None:
    """Hydra reads ``temperature=2`` as an integer, which transformers' processors refuse (a run would stop at its
    first validation, after its training steps)."""
    inputs = write_jsonl(tmp_path / "inputs.jsonl", [{"source": source} for source in SOURCES[:2]])
    sampling = ["generation.do_sample=true", "generation.num_beams=1"]

    def sampled(value: str) -> str:
        output = tmp_path / "outputs.jsonl"
        options = ["--prefix", str(prefixes["e2e"]), "--input", str(inputs), "--output", str(output)]
        penalties = [f"+generation.{option}={value}" for option in FLOAT_OPTIONS]
        assert main([*options, *GENERATE, *sampling, *penalties]) == 0
        return output.read_text()

    assert sampled("2") == sampled("2.0")


def test_a_budget_in_max_length_decodes_as_the_same_budget_in_new_tokens(
    prefixes: dict[str, Path], tmp_path: Path
) -> None:
    """``generation.max_new_tokens=null +generation.max_length=...`` (the prompt counted): generate's target budget
    follows it (it read null and refused data.max_target_tokens, an option the user never set)."""
    inputs = write_jsonl(tmp_path / "inputs.jsonl", [{"source": SOURCES[0]}])
    cfg = compose_config("generate", ["model=tiny_llama"])
    _, tokenizer = load_configured_backbone(cfg)
    prompt = len(tokenizer(SOURCES[0] + cfg.model.separator, add_special_tokens=False).input_ids)

    def generation(*budget: str) -> str:
        output = tmp_path / "outputs.jsonl"
        options = ["--prefix", str(prefixes["e2e"]), "--input", str(inputs), "--output", str(output)]
        assert main([*options, "model=tiny_llama", "generation.num_beams=2", *budget]) == 0
        return json.loads(output.read_text())["generation"]

    assert generation("generation.max_new_tokens=null", f"+generation.max_length={prompt + 4}") == generation(
        "generation.max_new_tokens=4"
    )


def test_lines_end_at_line_ends_only() -> None:
    """A raw U+2028 inside a JSON string (which generate writes itself) or a form feed in a source is no line end."""
    held = '{"source": "first\u2028second", "prefix": "e2e"}\n{"source": "x", "prefix": "e2e"}\r\n'
    stream = io.StringIO(held, newline=None)
    assert [r.source for r in read_requests(stream, "auto", ["e2e"], "inputs")] == ["first\u2028second", "x"]
    stream = io.StringIO("third\x0cfourth\nfifth\n", newline=None)
    assert [r.source for r in read_requests(stream, "text", ["e2e"], "inputs")] == ["third\x0cfourth", "fifth"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"source": "a", "prefix": "e2e"}', "not json"], "line 2: not JSON"),
        (
            ['{"source": "a", "prefix": "e2e"}', "", '{"source": "b", "prefix": "dart"}'],
            "line 3: unknown prefix 'dart'",
        ),
        (['{"prefix": "e2e"}'], 'line 1: "source" must be a non-empty string'),
        (['{"source": "a"}'], 'line 1: no "prefix", and 2 prefixes are given'),
        (["a source", "another"], "plain text, one source per line: it reads one prefix, but 2 are given"),
    ],
)
def test_a_bad_line_is_named_before_anything_runs(
    prefixes: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, lines: list[str], message: str
) -> None:
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("\n".join(lines) + "\n")
    output = tmp_path / "outputs.jsonl"
    with pytest.raises(SystemExit) as stopped:
        main([*prefix_options(prefixes), "--input", str(inputs), "--output", str(output)])
    assert stopped.value.code == 1
    assert message in capsys.readouterr().err
    assert not output.exists(), "nothing is written for a bad input"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--threads", "0"], "argument --threads: 0 is not valid: use 1 or more"),
        (["--device", "bogus"], "argument --device: 'bogus' is not a torch device"),
        (["model=tiny_llama", "--output", "."], "--output . is a folder: give the file to write the generations to"),
        (["model=tiny_llama", "generation.num_beams=0"], "generation.num_beams=0 is not valid"),
        (["model=tiny_llama", "+generation.num_beam=3"], "generation has no option num_beam"),
        (["model=tiny_llama", "seed=abc"], "seed='abc' is not valid: use an integer"),
        (["model=tiny_llama", "model.separator=123"], "model.separator=123 is not valid: use text"),
        (
            ["model=tiny_llama", "data.max_source_tokens=abc"],
            "data.max_source_tokens='abc' is not valid: use tokens > 0",
        ),
    ],
)
def test_bad_options_are_named(
    prefixes: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, options: list[str], message: str
) -> None:
    inputs = write_jsonl(tmp_path / "inputs.jsonl", [{"source": "x", "prefix": "e2e"}])
    output = tmp_path / "outputs.jsonl"
    with pytest.raises(SystemExit) as stopped:
        main([*prefix_options(prefixes), "--input", str(inputs), "--output", str(output), *options])
    assert stopped.value.code != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_multi_task_runs_prefix_folder_is_answered_with_its_tasks(
    prefixes: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    held = tmp_path / "prefix"
    for name, folder in prefixes.items():
        shutil.copytree(folder, held / name)
    inputs = write_jsonl(tmp_path / "inputs.jsonl", [{"source": "x", "prefix": "e2e"}])
    with pytest.raises(SystemExit):
        main(["--prefix", str(held), "--input", str(inputs), "--output", "-"])
    each = f"--prefix e2e={held / 'e2e'} --prefix webnlg={held / 'webnlg'}"
    assert f"holds a multi-task run's prefixes, one per task: give each ({each})" in capsys.readouterr().err


def test_a_run_folder_stands_for_its_export_and_another_adapter_is_named(
    prefixes: dict[str, Path], tmp_path: Path
) -> None:
    """A run's folder was taken for a multi-task run's (its prefix/ looked like a task's); a LoRA adapter was said to
    load with PrefixModel.from_peft, which refuses it."""
    run = run_folder(tmp_path / "run", "method:\n  export_dir: prefix\n", [])
    shutil.copytree(prefixes["e2e"], run / "prefix")
    assert parse_prefixes([str(run), f"other={run}"]) == {"run": run / "prefix", "other": run / "prefix"}
    lora = tmp_path / "adapter"
    lora.mkdir()
    (lora / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(FileNotFoundError, match=r"prefix_config.json is missing \(it holds a PEFT LORA adapter, not a"):
        parse_prefixes([str(lora)])


def test_prefixes_of_different_base_models_decode_in_calls_of_their_own(
    prefixes: dict[str, Path], tmp_path: Path, capsys
) -> None:
    """It asked for model=<name>, which led on to other refusals before the one that mattered."""
    cfg = compose_train(tmp_path, ["model=tiny_gpt2"])
    other = PrefixModel(load_configured_backbone(cfg)[0], length=2, hidden_dim=8).save(tmp_path / "gpt2")
    inputs = write_jsonl(tmp_path / "inputs.jsonl", [{"source": "x", "prefix": "gpt2"}])
    with pytest.raises(SystemExit):
        main(
            ["--prefix", f"e2e={prefixes['e2e']}", "--prefix", f"gpt2={other}", "--input", str(inputs), "--output", "-"]
        )
    said = capsys.readouterr().err
    assert "the prefixes were trained on different base models (random:gpt2, random:llama): a batch decodes on" in said


@pytest.mark.integration
def test_stdin_to_stdout(prefixes: dict[str, Path]) -> None:
    rows = "".join(json.dumps({"source": s, "prefix": n}) + "\n" for s, n in zip(SOURCES, NAMES, strict=True))
    command = [sys.executable, "-m", "prefix_lightning.generate", *prefix_options(prefixes), "--input", "-"]
    result = subprocess.run(
        [*command, "--output", "-", *GENERATE], input=rows, cwd=REPO, capture_output=True, text=True, env=os.environ
    )
    assert result.returncode == 0, result.stderr[-2000:]
    written = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["prefix"] for row in written] == NAMES and all(isinstance(row["generation"], str) for row in written)
    assert "generate: 100%" in result.stderr  # the progress bar


def test_the_model_config_is_found_from_what_the_prefixes_record(prefixes: dict[str, Path], tmp_path: Path) -> None:
    """An export names its base model; the one model config with that backbone is chosen, an ambiguous one is asked
    for."""
    embedded = tmp_path / "embedded"
    embedded.mkdir()
    description = json.loads((prefixes["e2e"] / "prefix_config.json").read_text())
    description["base_model"]["name_or_path"] = "embedded:smollm2-135m-instruct"
    (embedded / "prefix_config.json").write_text(json.dumps(description))
    assert model_config_for([embedded]) == "smollm2_135m"
    with pytest.raises(ValueError, match="trained on random:llama, and configs .*tiny_llama match it: give the model"):
        model_config_for(prefixes.values())


def in_run_folder(prefix: Path, run: Path, settings: dict, task: str | None = None) -> Path:
    """A copy of ``prefix`` exported by a run with ``settings`` (as its ``.hydra/config.yaml`` records them), as
    ``<run>/prefix`` or a multi-task run's ``<run>/prefix/<task>``."""
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"method": {"export_dir": "prefix"}, **settings}))
    return Path(shutil.copytree(prefix, run / "prefix" / task if task else run / "prefix"))


def test_a_prefix_in_its_run_folder_decodes_with_that_runs_prompts(prefixes: dict[str, Path], tmp_path: Path) -> None:
    """Separator, end marker and source budget come from the run that exported the prefix: the same generations as
    those settings given by hand, others than the defaults'."""
    settings = {"model": {"separator": " =>", "target_end": "<|endoftext|>"}, "data": {"max_source_tokens": 5}}
    exported = in_run_folder(prefixes["e2e"], tmp_path / "run", settings)
    inputs = write_jsonl(tmp_path / "inputs.jsonl", [{"source": source} for source in SOURCES])

    def generations(folder: Path, *overrides: str) -> list[str]:
        output = tmp_path / "outputs.jsonl"
        assert (
            main(["--prefix", f"e2e={folder}", "--input", str(inputs), "--output", str(output), *GENERATE, *overrides])
            == 0
        )
        return [json.loads(line)["generation"] for line in output.read_text().splitlines()]

    from_run = generations(exported)
    assert from_run == generations(prefixes["e2e"], "model.separator=' =>'", "data.max_source_tokens=5")
    assert from_run != generations(prefixes["e2e"])
    assert generations(exported, "data.max_source_tokens=256") == generations(prefixes["e2e"], "model.separator=' =>'")


def test_a_prefix_in_its_run_folder_decodes_on_that_runs_model(prefixes: dict[str, Path], tmp_path: Path) -> None:
    """The run's model config and its ``model.*`` settings: no ``model=`` needed where several model configs share
    the backbone the prefix records (random:llama)."""
    run = tmp_path / "run"
    exported = in_run_folder(prefixes["e2e"], run, {})
    OmegaConf.save(compose_train(run, ["model=tiny_llama"]), run / ".hydra" / "config.yaml")
    overrides = ["model=tiny_llama", "model.gradient_checkpointing=true", "seed=3"]
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "hydra.yaml").write_text("hydra:\n  runtime:\n    choices:\n      model: tiny_llama\n")
    assert run_model_overrides(run) == ["model=tiny_llama", "model.gradient_checkpointing=true"]
    inputs = write_jsonl(tmp_path / "inputs.jsonl", [{"source": source} for source in SOURCES])
    outputs = {}
    for name, options in (("run's", DECODING), ("given", GENERATE)):
        outputs[name] = tmp_path / f"{name}.jsonl"
        command = ["--prefix", f"e2e={exported}", "--input", str(inputs), "--output", str(outputs[name])]
        assert main([*command, *options]) == 0
    assert outputs["run's"].read_text() == outputs["given"].read_text()


def test_a_run_on_a_model_config_of_ones_own_decodes_on_it_from_any_folder(
    prefixes: dict[str, Path], tmp_path: Path
) -> None:
    """The run read its model config from a folder of the user's, given relative to where it started
    (hydra.searchpath=[file://my_conf]): generate composes it (it named the model config alone, not the folder)."""
    own = tmp_path / "my_conf" / "model"
    own.mkdir(parents=True)
    (own / "mine.yaml").write_text("defaults:\n  - tiny_llama\n  - _self_\n")
    run = tmp_path / "run"
    exported = in_run_folder(prefixes["e2e"], run, {})
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model=mine"]))
    (run / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  searchpath:\n  - file://my_conf\n  runtime:\n    cwd: {tmp_path}\n    choices:\n      model: mine\n"
    )
    assert run_model_overrides(run) == ["model=mine", f"hydra.searchpath=['file://{own.parent}']"]
    inputs = write_jsonl(tmp_path / "inputs.jsonl", [{"source": source} for source in SOURCES[:2]])
    output = tmp_path / "outputs.jsonl"
    assert main(["--prefix", f"e2e={exported}", "--input", str(inputs), "--output", str(output), *DECODING]) == 0
    assert len(output.read_text().splitlines()) == 2


def test_each_prefix_cuts_sources_as_its_run_did(tmp_path: Path) -> None:
    """The run's source and target budgets and the prefix's own virtual tokens (not the longest prefix held), in
    the model's positions (tiny_gpt2: 256)."""
    cfg = compose_config("generate", ["model=tiny_gpt2", "generation.max_new_tokens=6"])
    lm, tokenizer = load_configured_backbone(cfg)
    virtual = {"short": 3, "long": 60}
    run = OmegaConf.create({"data": {"max_source_tokens": 512, "max_target_tokens": 60}})
    budgets = {
        name: collator.max_source_tokens
        for name, collator in prompt_collators(cfg, lm, virtual, tokenizer, {"short": run}, set()).items()
    }
    assert budgets == {None: 256 - 6, "short": 256 - 3 - 60, "long": 256 - 60 - 6}
    cfg.data.max_source_tokens = 100  # given here: wins over the run's
    given = prompt_collators(cfg, lm, virtual, tokenizer, {"short": run}, {"data.max_source_tokens"})
    assert given["short"].max_source_tokens == 100


def test_the_run_of_each_prefix_is_found(prefixes: dict[str, Path], tmp_path: Path) -> None:
    """A multi-task run's task prefix reads its run's settings; runs that built prompts differently are refused."""
    single = in_run_folder(prefixes["e2e"], tmp_path / "a", {"model": {"separator": " =>"}})
    task = in_run_folder(prefixes["webnlg"], tmp_path / "b", {"model": {"separator": " :"}}, task="webnlg")
    runs = exporting_runs({"e2e": single, "webnlg": task, "alone": prefixes["e2e"]})
    assert runs == {"e2e": tmp_path / "a", "webnlg": tmp_path / "b"}
    found = {name: run_config(run) for name, run in runs.items()}
    assert {name: config.model.separator for name, config in found.items()} == {"e2e": " =>", "webnlg": " :"}
    cfg = compose_train(tmp_path, ["model=tiny_llama"])
    with pytest.raises(ValueError, match="different model.separator"):
        adopt_run_settings(cfg, found, set())
    adopt_run_settings(cfg, found, {"model.separator"})  # given: kept
    assert cfg.model.separator == " <|endoftext|>"
    found["e2e"].generation = {"num_beams": 6}
    found["webnlg"].generation = {"num_beams": 5}
    with pytest.raises(ValueError, match=r"different generation .*give generation=\.\.\."):
        adopt_run_settings(cfg, found, {"model.separator"})
    adopt_run_settings(cfg, found, {"model.separator", "generation"})  # a group chosen: the runs' settings left
    assert cfg.generation.num_beams == 5 and cfg.generation.ban_newline


def test_a_prefix_in_its_run_folder_decodes_as_that_run_decoded_its_test(
    prefixes: dict[str, Path], tmp_path: Path
) -> None:
    """The run's generation settings (an XSum run's beam search, not table-to-text's defaults), unless given: an
    option given keeps the others, a group given replaces them."""
    summarization = ["generation=summarization", "generation.max_new_tokens=5", "generation.min_new_tokens=4"]
    decoded = compose_config("generate", ["model=tiny_llama", *summarization]).generation
    exported = in_run_folder(prefixes["e2e"], tmp_path / "run", {"generation": OmegaConf.to_container(decoded)})
    inputs = write_jsonl(tmp_path / "inputs.jsonl", [{"source": source} for source in SOURCES])

    def generations(folder: Path, *overrides: str) -> list[str]:
        output = tmp_path / "outputs.jsonl"
        command = ["--prefix", f"e2e={folder}", "--input", str(inputs), "--output", str(output)]
        assert main([*command, "model=tiny_llama", *overrides]) == 0
        return [json.loads(line)["generation"] for line in output.read_text().splitlines()]

    from_run = generations(exported)
    assert from_run == generations(prefixes["e2e"], *summarization)
    assert from_run != generations(prefixes["e2e"])  # table-to-text's 100 new tokens
    assert generations(exported, "generation.num_beams=2") == generations(
        prefixes["e2e"], *summarization, "generation.num_beams=2"
    )
    table_to_text = ["generation=table_to_text", "generation.max_new_tokens=8"]
    assert generations(exported, *table_to_text) == generations(prefixes["e2e"], *table_to_text)


@pytest.mark.parametrize("family", ["gpt2", "bart"])
def test_generated_texts_are_the_new_tokens_only(family: str, gpt2_tokenizer) -> None:
    """A causal LM's output starts with the whole prompt, none of which is text it wrote (an encoder-decoder's
    holds new tokens only); the end token and the filler after it are no text."""
    end = gpt2_tokenizer.eos_token_id
    prompt = gpt2_tokenizer("name : Zizzi ||").input_ids
    new = [*gpt2_tokenizer(" Zizzi is nice. ").input_ids, end, end]
    output = torch.tensor([prompt + new if family == "gpt2" else new])
    assert generated_texts(output, len(prompt), tiny_lm(family), gpt2_tokenizer) == ["Zizzi is nice."]
