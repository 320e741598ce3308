"""Readers for WebNLG, DART, XSum and your own data on the real files in ../shared/data, their malformed-input
errors, and every data config: instantiate, set up, one batch of each loader with the real GPT-2 tokenizer."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from prefix_lightning.data import (
    DATASETS,
    Example,
    TextToTextCollator,
    linearize_triples,
    read_dart,
    read_table,
    read_webnlg,
    read_xsum_hub,
    read_xsum_sample,
    reference_groups,
)
from prefix_lightning.data.datamodule import TextToTextDataModule
from prefix_lightning.data.triples import read_triples_xml
from prefix_lightning.training.build import build_model
from prefix_lightning.training.module import _split_metrics
from tests.helpers.config import CONF, build_datamodule, compose_train

UNSEEN_2017 = {"Artist", "Athlete", "CelestialBody", "MeanOfTransportation", "Politician"}
XSUM_SAMPLE = "xsum_sample/xsum-human-evaluation-data.txt"


def reference_counts(examples: list[Example]) -> Counter[int]:
    """How many groups have 1, 2, 3, ... references."""
    return Counter(len(group.references) for group in reference_groups(examples))


@pytest.fixture(scope="module")
def webnlg(data_dir: Path) -> dict[str, list[Example]]:
    files = dict(zip(("train", "dev", "test"), DATASETS["webnlg"].files, strict=True))
    return {split: read_webnlg(data_dir / "webnlg2017" / name) for split, name in files.items()}


@pytest.fixture(scope="module")
def dart(data_dir: Path) -> dict[str, list[Example]]:
    folder = data_dir / "dart"
    return {
        "dev": read_dart(folder / "dart-v1.1.1-full-dev.json"),
        "test": read_dart(folder / "dart-v1.1.1-full-test.xml"),
    }


# --- WebNLG --------------------------------------------------------------------------------------------


def test_webnlg_counts(data_dir, webnlg):
    raw = {
        split: sum(len(read_triples_xml(f)) for f in sorted((data_dir / "webnlg2017" / split).rglob("*.xml")))
        for split in ("train", "dev")
    }
    assert raw == {"train": 6940, "dev": 872}
    # Texts flagged toFix are dropped as in the paper: 77 train texts (5 entries with no other), 10 dev (1 entry).
    assert (len(webnlg["train"]), len(reference_groups(webnlg["train"]))) == (18025, 6935)
    assert (len(webnlg["dev"]), len(reference_groups(webnlg["dev"]))) == (2258, 871)
    assert (len(webnlg["test"]), len(reference_groups(webnlg["test"]))) == (4928, 1862)
    assert reference_counts(webnlg["test"]) == {1: 109, 2: 474, 3: 1262, 4: 8, 5: 4, 6: 3, 7: 1, 8: 1}


def test_webnlg_linearization(webnlg):
    first = webnlg["train"][0]
    assert first.source == 'Aarhus_Airport : cityServed : "Aarhus, Denmark"'
    assert first.target == "The Aarhus is the airport of Aarhus, Denmark."
    assert first.category == "Airport"
    test_groups = reference_groups(webnlg["test"])
    assert test_groups[0].references == [
        "Abilene, Texas is served by the Abilene regional airport.",
        "Abilene Regional Airport serves the city of Abilene in Texas.",
    ]
    several = next(group for group in test_groups if group.source.count(" | ") == 2)
    # Separators only between triples: the paper's loader started every source with " | ".
    assert several.source == (
        "Alan_Bean : nationality : United_States | Alan_Bean : birthPlace : Wheeler,_Texas"
        ' | Alan_Bean : status : "Retired"'
    )


def test_webnlg_unseen_categories_are_those_absent_from_training(webnlg):
    seen = {example.category for example in webnlg["train"]}
    test_groups = reference_groups(webnlg["test"])
    assert {group.category for group in test_groups} - seen == UNSEEN_2017
    assert sum(group.category in seen for group in test_groups) == 971
    assert sum(group.category not in seen for group in test_groups) == 891


def test_linearize_triples():
    triples = [("A", "birthPlace", "B"), ("A", "OCCUPATION", "C")]
    assert linearize_triples(triples) == "A : birthPlace : B | A : OCCUPATION : C"
    assert linearize_triples(triples, lowercase_properties=True) == "A : birthplace : B | A : occupation : C"


# --- DART ----------------------------------------------------------------------------------------------


def test_dart_counts(dart):
    assert (len(dart["dev"]), len(reference_groups(dart["dev"]))) == (6980, 2768)
    # 12,552 <lex> elements in 5,097 entries; one is empty (entry Id116, next to a real text) and is skipped.
    assert (len(dart["test"]), len(reference_groups(dart["test"]))) == (12551, 5097)
    assert reference_counts(dart["dev"])[1] == 1100 and max(reference_counts(dart["dev"])) == 33
    assert reference_counts(dart["test"])[3] == 2149 and max(reference_counts(dart["test"])) == 35


def test_dart_linearization(dart):
    first = reference_groups(dart["dev"])[0]
    assert (
        first.source == "Mars Hill College : joined : 1973 | Mars Hill College : location : Mars Hill, North Carolina"
    )
    assert first.references == ["A school from Mars Hill, North Carolina, joined in 1973."]
    assert first.category == ""
    # The XML form reads the same way: properties lowercased, one group per entry even for repeated triple sets.
    assert reference_groups(dart["test"])[115].source == (
        "reserved (previously G721) : no._of_channels : 1 | reserved (previously G721) : clock_rate_(hz) : 8000"
    )


def test_dart_empty_text_is_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "dart.json"
    path.write_text(json.dumps([{"tripleset": [["a", "P", "b"]], "annotations": [{"text": "A b."}, {"text": " "}]}]))
    with caplog.at_level(logging.WARNING, logger="prefix_lightning.data"):
        assert read_dart(path) == [Example("a : p : b", "A b.", 0)]
    assert "skipped 1 empty reference text(s), the first in " + f"{path}, entry 1" in caplog.text


# --- XSum ----------------------------------------------------------------------------------------------


def test_xsum_sample(data_dir):
    examples = read_xsum_sample(data_dir / XSUM_SAMPLE)
    assert len(examples) == 50 and [e.group_id for e in examples] == list(range(50))
    first = examples[0]
    assert first.source.startswith(
        "West Berkshire Council is setting up an emotional health academy to train psychology graduates"
    )
    assert len(first.source.splitlines()) == 9  # Document-Full: one sentence per line
    assert first.target == "a council plans to employ its own staff to help young people with mental health problems ."


def test_xsum_hub_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"pip install 'prefix-lightning\[hub\]'.*data=xsum_sample"):
        read_xsum_hub("test")


def test_xsum_source_budget_in_both_layouts(data_dir, tokenizer_dir, gpt2_tokenizer, caplog):
    from transformers import BartTokenizer

    examples = read_xsum_sample(data_dir / XSUM_SAMPLE)
    bart = BartTokenizer.from_pretrained(tokenizer_dir)
    for tokenizer, layout in ((gpt2_tokenizer, {"separator": " TL;DR:"}), (bart, {"is_encoder_decoder": True})):
        collator = TextToTextCollator(tokenizer, max_source_tokens=512, **layout)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="prefix_lightning.data"):
            prompts = collator.encode_prompts(reference_groups(examples), "xsum")
        assert max(len(prompt.input_ids) for prompt in prompts) == 512
        assert "truncated 18 of 50 sources to max_source_tokens=512" in caplog.text
    assert all(prompt.input_ids[-1] == bart.eos_token_id for prompt in prompts)  # truncation keeps </s>


# --- your own data -------------------------------------------------------------------------------------


def test_custom_jsonl_round_trip(tmp_path):
    rows = [
        {"table": "name : A | food : B", "text": "A serves B.", "id": 7},
        {"table": "name : A | food : B", "text": "B at\u2028A.", "id": 7},  # a line separator inside a string
        {"table": "name : C", "text": "C.", "id": "x"},
        {"table": "name : C", "text": "C again.", "id": "y"},  # another group with the same source
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n\n", encoding="utf-8")
    examples = read_table(path, "table", "text", group_column="id")
    assert examples == [
        Example("name : A | food : B", "A serves B.", 0),
        Example("name : A | food : B", "B at\u2028A.", 0),
        Example("name : C", "C.", 1),
        Example("name : C", "C again.", 2),
    ]


def test_custom_csv_and_tsv_group_by_source_without_a_group_column(tmp_path):
    csv_path, tsv_path = tmp_path / "data.csv", tmp_path / "data.tsv"
    csv_path.write_text('document,summary\n"Long, quoted\ntext.",Short.\nOther.,Two.\n"Long, quoted\ntext.",Brief.\n')
    tsv_path.write_text("document\tsummary\nLong text.\tShort.\n")
    examples = read_table(csv_path, "document", "summary")
    assert [(e.group_id, e.target) for e in examples] == [(0, "Short."), (1, "Two."), (0, "Brief.")]
    assert examples[0].source == "Long, quoted\ntext."
    assert read_table(tsv_path, "document", "summary") == [Example("Long text.", "Short.", 0)]


# --- malformed input: errors name the file and the line or entry ----------------------------------------

BROKEN_XML = "<benchmark><entries>\n<entry eid='Id1'>\n<lex>text</entry>\n</entries></benchmark>\n"
ENTRY = "<entry category='Food' eid='Id{n}'><modifiedtripleset>{triples}</modifiedtripleset>{lexes}</entry>"


def webnlg_xml(*entries: tuple[str, str]) -> str:
    body = "".join(ENTRY.format(n=n, triples=t, lexes=lx) for n, (t, lx) in enumerate(entries, start=1))
    return f"<benchmark><entries>{body}</entries></benchmark>"


GOOD = ("<mtriple>A | p | B</mtriple>", "<lex comment='good'>A p B.</lex>")


@pytest.mark.parametrize(
    ("name", "content", "read", "message"),
    [
        ("broken.xml", BROKEN_XML, read_webnlg, r"line 3, column \d+: broken XML"),
        ("no_text.xml", webnlg_xml(GOOD, (GOOD[0], "")), read_webnlg, r"entry 2 \(eid='Id2'.*no reference text"),
        ("empty_lex.xml", webnlg_xml((GOOD[0], "<lex/>")), read_webnlg, r"entry 1 .*no reference text"),
        ("bad_triple.xml", webnlg_xml(GOOD, ("<mtriple>A | B</mtriple>", GOOD[1])), read_webnlg, r"entry 2 .*'A \| B'"),
        ("no_triples.xml", webnlg_xml(("", GOOD[1])), read_webnlg, r"entry 1 .*no <modifiedtripleset>"),
        ("dart.xml", BROKEN_XML, read_dart, r"line 3, column \d+: broken XML"),
        ("dart.json", '[\n{"tripleset": [["a", "p", "b"]],\n "annotations": [}]', read_dart, r"line 3, column 18"),
        ("dart.json", '[{"tripleset": [["a", "p", "b"]]}]', read_dart, r"entry 1: expected .*'annotations'"),
        ("dart.json", '[{"tripleset": [["a", "p"]], "annotations": []}]', read_dart, r"entry 1: a triple must be"),
        ("dart.json", '[{"tripleset": [["a", "p", "b"]], "annotations": [{"text": ""}]}]', read_dart, "no reference"),
        (
            "x.txt",
            "==1==\nDocument-Full\nText.\n\nSummary\nS.\n",
            read_xsum_sample,
            r"line 1 \(article 1\).*'Reference'",
        ),
        ("x.txt", "==1==\nDocument-Full\nText.\n\nReference\n\n", read_xsum_sample, r"line 1 .*empty 'Reference'"),
        ("x.txt", "Document-Full\nText.\n", read_xsum_sample, r"line 1: text before the first ==ID== line"),
    ],
)
def test_malformed_dataset_files(tmp_path, name, content, read, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        read(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("d.csv", "source,text\na,b\n", r"line 1: missing column\(s\) \['target'\]"),
        ("d.csv", "source,target\na,b\nc,\n", r"line 3: empty target"),
        ("d.csv", "source,target\na,b\n,d\n", r"line 3: empty source"),
        ("d.csv", "source,target\na,b\n\n\nc,\n", r"line 5: empty target"),  # blank lines hold no row
        ("d.csv", "source,target\na,b\nc,  \n", r"line 3: empty target"),  # spaces alone hold no text
        ("d.tsv", "source\ttarget\na\tb\n\nc\td\te\n", r"line 4: 3 cells, but the header has 2 columns"),
        ("d.csv", "source,target\na\n", r"line 2: missing field 'target'"),
        ("d.csv", "source,target,source\na,b,c\n", r"line 1: the header names column\(s\) \['source'\] more than"),
        ("d.jsonl", '{"source": "a", "target": NaN}\n', r"line 1: 'target' is nan \(a missing value\?\), not text"),
        ("d.jsonl", '{"source": "a", "target": "b"}\n{"source": "c"}\n', r"line 2: missing field 'target'"),
        ("d.jsonl", '{"source": "a", "target": "b"}\n{"source": "c", "target": \n', r"line 2: not valid JSON"),
        ("d.jsonl", '{"source": "a", "target": ["b"]}\n', r"line 1: 'target' must be text"),
        ("d.jsonl", '["a", "b"]\n', r"line 1: expected a JSON object"),
        ("d.json", '[{"source": "a", "target": "b"}, ["c", "d"]]', r"item 2: expected a JSON object"),
        ("d.xlsx", "PK", r"unsupported file type '.xlsx'; use .jsonl, .json, .csv or .tsv \(save a spreadsheet as CSV"),
    ],
)
def test_malformed_custom_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        read_table(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("excel.csv", "\ufeffsource,target\r\na,b\r\nc,d\r\n".encode()),  # Excel's "CSV UTF-8": a BOM, CRLF
        ("unicode.tsv", "source\ttarget\na\tb\nc\td\n".encode("utf-16")),  # Excel's "Unicode text"
        ("records.json", b'[{"source": "a", "target": "b"},\n {"source": "c", "target": "d"}]'),  # pandas records
        ("lines.json", b'{"source": "a", "target": "b"}\r\n{"source": "c", "target": "d"}\r\n'),  # datasets to_json
        ("spaced.csv", b"source,target\n a , b\nc,d \n"),  # spaces around a cell's text are no part of it
    ],
)
def test_custom_files_as_common_tools_save_them(tmp_path, name, payload):
    path = tmp_path / name
    path.write_bytes(payload)
    assert [(e.source, e.target) for e in read_table(path)] == [("a", "b"), ("c", "d")]


def test_a_csv_cell_may_hold_a_long_document(tmp_path):
    """Longer than the csv module's default cap on a cell (131,072 characters): XSum-like sources."""
    document = " ".join(["word"] * 40_000)
    path = tmp_path / "long.csv"
    path.write_text(f'source,target\n"{document}",summary\n')
    assert [(e.source, e.target) for e in read_table(path)] == [(document, "summary")]


def test_custom_rows_with_more_cells_than_the_header_are_refused(tmp_path):
    """An unquoted comma inside a cell would otherwise shift the rest of the row out of its column, silently."""
    path = tmp_path / "d.csv"
    path.write_text('source,target\n"name : A, area : B",A is in B.\nname : C, area : D,C is in D.\n')
    with pytest.raises(ValueError, match=r"d.csv, line 3: 3 cells, but the header has 2 columns; quote cells"):
        read_table(path)
    with pytest.raises(ValueError, match=r"data.source_column must name a column .* got None"):
        read_table(path, source_column=None)


@pytest.mark.parametrize(
    ("name", "content", "line", "said"),
    [  # a quote that opens a cell and is never closed would take in the rows after it
        ("stray.tsv", 'source\ttarget\nname : A\tA.\n"name : B\tB.\nname : C\tC.\n', 3, "unexpected end of data"),
        # text after a quoted cell's closing quote would be glued to it, the quotes lost
        ("glued.csv", 'source,target\n"multi\nline",A.\n"Hi" he said,B.\n', 4, "',' expected after '\"'"),
        ("glued.tsv", 'source\ttarget\n"Hi" he said\tB.\n', 2, "'\\t' expected after '\"'"),
    ],
)
def test_custom_cells_with_broken_quoting_are_refused_at_their_line(tmp_path, name, content, line, said):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as refused:
        read_table(path)
    assert str(refused.value) == (
        f'{path}, line {line}: a cell that begins with a quote (") must end with one ({said}); quote a cell whole '
        '("a ""b"" c": quotes inside doubled) or not at all'
    )


def test_validation_held_out_of_the_training_file_however_it_is_spelled(tmp_path, gpt2_tokenizer):
    rows = [{"source": f"s{i}", "target": f"t{i}"} for i in range(6)]
    (tmp_path / "custom").mkdir()
    (tmp_path / "custom" / "all.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for val_file in ("custom/all.jsonl", str(tmp_path / "custom" / "all.jsonl"), "custom/../custom/all.jsonl"):
        module = TextToTextDataModule(
            gpt2_tokenizer,
            tmp_path,
            "custom",
            " =",
            "<|endoftext|>",
            train_file="custom/all.jsonl",
            val_file=val_file,
            test_file="custom/all.jsonl",
            val_size=2,
            download=False,
        )
        module.setup("fit")
        assert [example.source for example in module.train_examples] == ["s0", "s1", "s2", "s3"]
        assert [group.source for group in module.val_groups] == ["s4", "s5"]


def test_custom_group_must_share_its_source(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("source,target,id\na,b,1\nc,d,2\ne,f,1\n")
    with pytest.raises(ValueError, match=r"line 4: group '1' has a different source than .*, line 2"):
        read_table(path, group_column="id")


@pytest.mark.parametrize("read", [read_table, read_xsum_sample, read_dart])
def test_undecodable_bytes_name_the_line(tmp_path, read):
    path = tmp_path / ("d.csv" if read is read_table else "d.json")
    path.write_bytes(b"source,target\nok,fine\ncaf\xe9,x\n")
    with pytest.raises(ValueError, match=r"line 3: not UTF-8 text \(byte 0xe9\)") as info:
        read(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("read", "name", "hints"),
    [
        (read_webnlg, "webnlg2017/train", ["webnlg_challenge_2017", "PREFIX_LIGHTNING_DATA"]),
        (read_dart, "dart/dart-v1.1.1-full-train.json", ["Yale-LILY/dart", "PREFIX_LIGHTNING_DATA"]),
        (read_xsum_sample, XSUM_SAMPLE, ["xsum-human-evaluation-data.txt", "data=xsum"]),
        (read_table, "custom/train.jsonl", ["data.train_file"]),
    ],
)
def test_missing_files_say_where_and_how(tmp_path, read, name, hints):
    with pytest.raises(FileNotFoundError) as info:
        read(tmp_path / name)
    for needle in [str(tmp_path / name), *hints]:
        assert needle in str(info.value)


# --- data configs -> data module -> loaders ------------------------------------------------------------


def write_custom_data(folder: Path) -> None:
    (folder / "custom").mkdir()
    for split, count in (("train", 12), ("val", 3), ("test", 4)):
        rows = [
            {"source": f"name : Place {i} | food : Dish {i}", "target": f"Place {i} serves dish {i}."}
            for i in range(count)
        ]
        (folder / "custom" / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


CONFIG_CASES = {
    "e2e_devsplit": (["data.train_size=20", "data.val_size=3", "data.test_size=4"], "e2e"),
    "webnlg": (["data.train_size=20", "data.val_size=3", "data.test_size=4"], "webnlg"),
    "dart_devsplit": (["data.train_size=20", "data.val_size=3", "data.test_size=4"], "dart"),
    "xsum_sample": (["data.train_size=4", "data.test_size=4"], "xsum"),
    "custom": (["data.val_size=2"], "bleu"),
}


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_data_config_loaders(name, tmp_path, data_dir, gpt2_tokenizer):
    overrides, metric_suite = CONFIG_CASES[name]
    if name == "custom":
        write_custom_data(tmp_path)
        overrides = [*overrides, f"data.data_dir={tmp_path}"]
    cfg = compose_train(tmp_path, [f"data={name}", "model=tiny_gpt2", f"paths.data_dir={data_dir}", *overrides])
    module = instantiate(cfg.data, tokenizer=gpt2_tokenizer, separator=" =", target_end="<|endoftext|>")
    assert module.metric_suite == metric_suite
    module.prepare_data()
    module.setup("fit")
    module.setup("test")
    train = next(iter(module.train_dataloader()))
    assert set(train) == {"input_ids", "attention_mask", "labels"}
    assert train["input_ids"].shape[0] == min(cfg.data.batch_size, len(module.train_examples))
    loss_loader, generation_loader = module.val_dataloader()
    assert set(next(iter(loss_loader))) == {"input_ids", "attention_mask", "labels"}
    generation = next(iter(generation_loader))
    assert generation["references"] == [group.references for group in module.val_groups][: len(generation["sources"])]
    test = next(iter(module.test_dataloader()))
    assert test["sources"] == [group.source for group in module.test_groups][: len(test["sources"])]
    assert len(module.test_groups) == cfg.data.test_size or cfg.data.test_size is None
    assert all(test["categories"]) == (name == "webnlg")  # only WebNLG has categories
    if metric_suite == "xsum":
        assert cfg.data.max_source_tokens == 512  # the paper's source budget
    held_out = {group.source for group in module.val_groups}
    if module.hparams.val_file == module.hparams.train_file:
        assert not held_out & {example.source for example in module.train_examples}


def _custom_module(folder: Path, tokenizer, *overrides: str) -> TextToTextDataModule:
    write_custom_data(folder)
    cfg = compose_train(folder, ["data=custom", "model=tiny_gpt2", f"data.data_dir={folder}", *overrides])
    return instantiate(cfg.data, tokenizer=tokenizer, separator=" =", target_end="<|endoftext|>")


def test_the_test_file_is_checked_before_training_where_the_run_tests(tmp_path, gpt2_tokenizer):
    """A missing test file stopped a run only after it had trained; a run without a test never reads one."""
    module = _custom_module(tmp_path, gpt2_tokenizer)
    (tmp_path / "custom" / "test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        module.setup("fit")
    cfg = compose_train(tmp_path, ["data=custom", "model=tiny_gpt2", f"data.data_dir={tmp_path}", "data.test_size=4"])
    untested = instantiate(cfg.data, tokenizer=gpt2_tokenizer, separator=" =", target_end="<|endoftext|>", tested=False)
    untested.setup("fit")
    assert len(untested.train_examples) == 12
    cfg = compose_train(tmp_path, ["data=custom", "model=tiny_gpt2", f"data.data_dir={tmp_path}", "test=false"])
    model, tokenizer = build_model(cfg)
    assert build_datamodule(cfg, tokenizer, model).hparams.tested is False  # run.py test=false


@pytest.mark.parametrize(("split", "stage"), [("train", "fit"), ("val", "fit"), ("test", "test")])
def test_a_data_file_without_rows_is_refused(split, stage, tmp_path, gpt2_tokenizer):
    """Not a run that "finishes" without a training step (and records a result a sweep would then skip)."""
    module = _custom_module(tmp_path, gpt2_tokenizer)
    (tmp_path / "custom" / f"{split}.jsonl").write_text("")
    with pytest.raises(ValueError, match=rf"custom/{split}.jsonl holds no examples"):
        module.setup(stage)


def test_a_data_file_given_as_a_folder_is_said_to_be_one(tmp_path, gpt2_tokenizer):
    """It was "not found: looked for <the folder>", though the path exists."""
    module = _custom_module(tmp_path, gpt2_tokenizer)
    (tmp_path / "custom" / "train.jsonl").unlink()
    (tmp_path / "custom" / "train.jsonl").mkdir()
    with pytest.raises(IsADirectoryError, match=r"custom/train.jsonl is a folder; give the data file in it"):
        module.setup("fit")


def test_a_test_size_beyond_the_split_is_refused_before_training(tmp_path, gpt2_tokenizer):
    module = _custom_module(tmp_path, gpt2_tokenizer, "data.test_size=5")  # the test file holds 4
    with pytest.raises(
        ValueError, match=r"test_size=5, but .*test.jsonl has 4 groups \(inputs; data.test_size=null takes all\)"
    ):
        module.setup("fit")


def test_every_data_config_has_a_loader_test_or_needs_the_network():
    shipped = {path.stem for path in (CONF / "data").glob("*.yaml")}
    # e2e, dart and xsum read the official training sets (not shipped here); their offline twins are tested.
    # default is the base of the others; multi mixes them (tests/test_multitask.py loads it).
    assert shipped == set(CONFIG_CASES) | {"e2e", "dart", "xsum", "default", "multi"}


@pytest.mark.parametrize(("subset", "count"), [("all", 1862), ("seen", 971), ("unseen", 891)])
def test_webnlg_test_subsets(subset, count, data_dir, gpt2_tokenizer):
    module = TextToTextDataModule(gpt2_tokenizer, data_dir, "webnlg", " =", "<|endoftext|>", test_subset=subset)
    module.setup("test")
    assert len(module.test_groups) == count
    assert module.seen_categories and not module.seen_categories & UNSEEN_2017
    categories = {group.category for group in module.test_groups}
    if subset != "all":
        assert (categories <= module.seen_categories) == (subset == "seen")
        assert (categories <= UNSEEN_2017) == (subset == "unseen")
    assert next(iter(module.test_dataloader()))["categories"][0] == module.test_groups[0].category


def test_webnlg_reads_its_training_split_once(data_dir, gpt2_tokenizer, monkeypatch):
    """The test split's seen categories came from a second read of the training split, the largest file."""
    module = TextToTextDataModule(
        gpt2_tokenizer, data_dir, "webnlg", " =", "<|endoftext|>", val_size=3, test_size=4, test_subset="unseen"
    )
    read_files: list[str] = []

    def counted(location: Path, **options: object) -> list:
        read_files.append(Path(location).name)
        return read_webnlg(location, **options)

    monkeypatch.setattr(module, "spec", dataclasses.replace(module.spec, read=counted))
    module.setup("fit")
    module.setup("test")
    assert sorted(read_files) == ["dev", "testdata_with_lex.xml", "train"]
    alone = TextToTextDataModule(gpt2_tokenizer, data_dir, "webnlg", " =", "<|endoftext|>", test_subset="unseen")
    alone.setup("test")  # an evaluation reads the training split for the categories
    assert module.seen_categories == alone.seen_categories
    assert module.test_groups == alone.test_groups[:4]


def test_a_webnlg_test_is_also_scored_on_its_seen_and_unseen_inputs():
    right = "the airport is in the city of aarhus"
    outputs = [
        {"category": "Airport", "generation": right, "references": [right]},
        {"category": "Food", "generation": "nothing like it at all", "references": [right]},
    ]
    webnlg = SimpleNamespace(metric_suite="bleu", seen_categories=frozenset({"Airport"}))
    metrics = _split_metrics("test", webnlg, outputs)
    assert (metrics["seen/BLEU"], metrics["unseen/BLEU"]) == (pytest.approx(100), 0)


def test_test_subset_needs_categories(data_dir, gpt2_tokenizer):
    with pytest.raises(ValueError, match="only webnlg"):
        TextToTextDataModule(gpt2_tokenizer, data_dir, "dart", " =", "<|endoftext|>", test_subset="unseen")


def test_unknown_dataset_names_the_choices(data_dir, gpt2_tokenizer):
    with pytest.raises(ValueError, match=r"unknown dataset 'webnlg2020'.*'custom', 'dart', 'e2e'"):
        TextToTextDataModule(gpt2_tokenizer, data_dir, "webnlg2020", " =", "<|endoftext|>")


def test_missing_official_files_without_download(tmp_path, gpt2_tokenizer):
    module = TextToTextDataModule(gpt2_tokenizer, tmp_path, "dart", " =", "<|endoftext|>", download=False)
    module.prepare_data()
    with pytest.raises(FileNotFoundError, match="dart-v1.1.1-full-train.json"):
        module.setup("fit")


# --- decoding configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["table_to_text", "summarization"])
def test_generation_configs_are_generate_options(name):
    from transformers import GenerationConfig

    settings = OmegaConf.to_container(OmegaConf.load(CONF / "generation" / f"{name}.yaml"))
    assert isinstance(settings.pop("ban_newline"), bool)  # wired into bad_words_ids by the training code
    config = GenerationConfig(**settings)
    config.validate(strict=True)
    assert all(getattr(config, key) == value for key, value in settings.items())
