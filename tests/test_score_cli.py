"""`python -m prefix_lightning.score`: the reference formats, the printed table and JSON, one-line errors."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from prefix_lightning.data import group_references, read_e2e
from prefix_lightning.evaluation import MetricSkippedWarning, corpus_bleu, score
from prefix_lightning.score import main

HYPOTHESES = ["The Eagle is a coffee shop near the river.", "Blue Spice serves cheap food."]
REFERENCES = [
    ["The Eagle is a coffee shop by the river.", "There is a coffee shop called The Eagle."],
    ["Blue Spice is a cheap restaurant."],
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", errors="surrogateescape")  # lone surrogates: bytes that are not UTF-8
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    return _write(path, "".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture()
def hypotheses_file(tmp_path) -> Path:
    return _write(tmp_path / "gen.txt", "".join(h + "\n" for h in HYPOTHESES))


def test_text_references_in_groups_print_a_table_and_write_json(hypotheses_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no Java: BLEU and NIST only, with one warning line
    references = _write(tmp_path / "refs.txt", "\n".join("".join(r + "\n" for r in refs) for refs in REFERENCES))
    output = tmp_path / "out" / "scores.json"
    argv = ["--suite", "e2e", "--hypotheses", str(hypotheses_file), "--references", str(references)]
    assert main([*argv, "--output", str(output)]) == 0

    printed = capsys.readouterr()
    with pytest.warns(MetricSkippedWarning):
        expected = score("e2e", HYPOTHESES, REFERENCES)
    assert printed.out.splitlines() == [
        "e2e: 2 hypotheses",
        f"  BLEU     {expected['BLEU']:10.4f}",
        f"  NIST     {expected['NIST']:10.4f}",
    ]
    assert printed.err.startswith("warning: METEOR, ROUGE_L, CIDEr not computed") and printed.err.count("\n") == 1
    assert json.loads(output.read_text()) == {"suite": "e2e", "num_hypotheses": 2, "scores": expected}


def test_a_runs_generations_jsonl_is_rescored_alone(tmp_path, capsys):
    rows = [
        {"group_id": i, "source": f"name : X{i}", "references": refs, "generation": hypothesis}
        for i, (hypothesis, refs) in enumerate(zip(HYPOTHESES, REFERENCES, strict=True))
    ]
    generations = _jsonl(tmp_path / "test_generations.jsonl", rows)
    assert main(["--suite", "bleu", "--generations", str(generations)]) == 0
    assert f"BLEU     {corpus_bleu(HYPOTHESES, REFERENCES):10.4f}" in capsys.readouterr().out


def test_files_saved_with_a_byte_order_mark_or_odd_line_breaks_score_as_plain_ones(tmp_path, capsys):
    """A BOM stuck to the first output lowered its score silently; U+2028 inside an output split it in two."""
    hypotheses = [HYPOTHESES[0] + "\u2028", HYPOTHESES[1]]
    _write(tmp_path / "gen.txt", "\ufeff" + "\r\n".join(hypotheses) + "\r\n")
    _write(tmp_path / "refs.txt", "\ufeff" + "\n\n".join("\n".join(group) for group in REFERENCES) + "\n")
    _jsonl(tmp_path / "refs.JSONL", [{"references": group} for group in REFERENCES])
    for references in ("refs.txt", "refs.JSONL"):
        argv = [
            "--suite",
            "bleu",
            "--hypotheses",
            str(tmp_path / "gen.txt"),
            "--references",
            str(tmp_path / references),
        ]
        assert main(argv) == 0
        assert f"BLEU     {corpus_bleu(HYPOTHESES, REFERENCES):10.4f}" in capsys.readouterr().out


def test_jsonl_csv_and_one_per_line_references(hypotheses_file, tmp_path, data_dir, capsys):
    jsonl = _jsonl(tmp_path / "refs.jsonl", [{"references": refs} for refs in REFERENCES])
    assert main(["--suite", "bleu", "--hypotheses", str(hypotheses_file), "--references", str(jsonl)]) == 0
    assert f"{corpus_bleu(HYPOTHESES, REFERENCES):10.4f}" in capsys.readouterr().out

    # Without empty lines, a file holds one reference per hypothesis (as e2e-metrics reads it).
    single = _write(tmp_path / "single.txt", "The Eagle is a coffee shop.\nBlue Spice serves cheap food.\n")
    assert main(["--suite", "bleu", "--hypotheses", str(hypotheses_file), "--references", str(single)]) == 0
    expected = corpus_bleu(HYPOTHESES, [["The Eagle is a coffee shop."], ["Blue Spice serves cheap food."]])
    assert f"{expected:10.4f}" in capsys.readouterr().out

    # The official E2E CSV, grouped by meaning representation: outputs equal to a reference score 100.
    csv = data_dir / "e2e" / "testset_w_refs.csv"
    first_refs = [refs[0] for _, refs in group_references(read_e2e(csv))]
    outputs = _write(tmp_path / "e2e.txt", "".join(ref + "\n" for ref in first_refs))
    assert len(first_refs) == 630
    assert main(["--suite", "bleu", "--hypotheses", str(outputs), "--references", str(csv)]) == 0
    assert "BLEU       100.0000" in capsys.readouterr().out


GEN = ["--hypotheses", "gen.txt", "--references"]  # gen.txt holds the two HYPOTHESES


@pytest.mark.parametrize(
    ("files", "argv", "message"),
    [
        ({}, [*GEN, "missing.txt"], "missing.txt: no such file"),
        ({"refs.txt": "a\n\nb\n\nc\n"}, [*GEN, "refs.txt"], "2 hypotheses but 3 reference groups"),
        ({"refs.txt": "a\n\n\nb\n"}, [*GEN, "refs.txt"], "refs.txt, line 3: empty reference group"),
        ({"refs.txt": "\na\n\nb\n"}, [*GEN, "refs.txt"], "refs.txt, line 1: empty reference group"),
        ({"r.jsonl": "[oops\n"}, [*GEN, "r.jsonl"], "r.jsonl, line 1: not JSON"),
        ({"r.jsonl": '{"references": ["a"]}\n{"refs": []}\n'}, [*GEN, "r.jsonl"], "line 2: expected a non-empty"),
        ({"r.jsonl": '{"references": ["a"]}\n'}, ["--generations", "r.jsonl"], "line 1: expected a `generation`"),
        ({}, ["--generations", "r.jsonl", "--hypotheses", "gen.txt"], "either --generations or"),
        ({}, ["--hypotheses", "gen.txt"], "give --hypotheses and --references, or --generations"),
        ({}, [*GEN, "missing.csv"], "missing.csv: no such file"),  # not the E2E download's advice
        ({}, [*GEN, "."], ".: a folder, not a file"),
        ({"r.txt": "a\nb\n"}, [*GEN, "r.txt", "--output", "."], "--output . is a folder"),
        ({"r.txt": "a\nb\n", "f": ""}, [*GEN, "r.txt", "--output", "f/s.json"], "File exists"),
        (
            {"r.txt": "caf\udce9\n"},
            [*GEN, "r.txt"],
            "r.txt, line 1: not UTF-8 text (byte 0xe9); save the file as UTF-8",
        ),
    ],
)
def test_errors_exit_non_zero_with_one_line(files, argv, message, hypotheses_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        _write(tmp_path / name, text)
    try:  # input errors return 1; argument errors exit 2 through argparse
        code = main(["--suite", "e2e", *argv])
    except SystemExit as exit:
        code = exit.code
    assert code != 0
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_the_module_entry_point_exits_with_mains_code(tmp_path, capsys, monkeypatch):
    # In-process (runpy) rather than a subprocess: importing the package loads torch, seconds per process.
    missing = tmp_path / "no.jsonl"
    monkeypatch.setattr(sys, "argv", ["score", "--suite", "e2e", "--generations", str(missing)])
    monkeypatch.delitem(sys.modules, "prefix_lightning.score")  # runpy runs a fresh copy as __main__
    with pytest.raises(SystemExit) as exit:
        runpy.run_module("prefix_lightning.score", run_name="__main__")
    assert exit.value.code == 1
    assert capsys.readouterr().err == f"error: {missing}: no such file\n"


def test_a_multitask_runs_generations_are_scored_one_task_at_a_time(tmp_path, capsys):
    # data=multi writes every task's outputs into one file; one suite over all of them would be no dataset's score.
    rows = [
        {"task": task, "group_id": i, "references": refs, "generation": hypothesis}
        for i, (task, hypothesis, refs) in enumerate(zip(["e2e", "webnlg"], HYPOTHESES, REFERENCES, strict=True))
    ]
    generations = _jsonl(tmp_path / "test_generations.jsonl", rows)
    assert main(["--suite", "bleu", "--generations", str(generations)]) == 1
    assert "holds the outputs of several tasks (e2e, webnlg): pick one with --task" in capsys.readouterr().err

    assert main(["--suite", "bleu", "--generations", str(generations), "--task", "webnlg"]) == 0
    expected = corpus_bleu(HYPOTHESES[1:], REFERENCES[1:])
    assert capsys.readouterr().out.splitlines() == ["bleu: 1 hypotheses", f"  BLEU     {expected:10.4f}"]

    assert main(["--suite", "bleu", "--generations", str(generations), "--task", "dart"]) == 1
    assert "no line of task 'dart' (tasks: e2e, webnlg)" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        main(["--suite", "bleu", "--hypotheses", "gen.txt", "--references", "refs.txt", "--task", "e2e"])
    assert exit_info.value.code == 2 and "--task picks lines of a JSONL file" in capsys.readouterr().err


def test_a_jsonl_of_generations_is_refused_as_plain_hypotheses(tmp_path, capsys):
    # Each JSON line would be scored as an output text: a low score, but a score, with no sign of the mistake.
    rows = [
        {"references": refs, "generation": hypothesis} for hypothesis, refs in zip(HYPOTHESES, REFERENCES, strict=True)
    ]
    generations = _jsonl(tmp_path / "test_generations.jsonl", rows)
    with pytest.raises(SystemExit) as exit_info:
        main(["--suite", "bleu", "--hypotheses", str(generations), "--references", str(generations)])
    assert exit_info.value.code == 2
    assert "--hypotheses takes one output per line; a run's JSONL goes to --generations" in capsys.readouterr().err
