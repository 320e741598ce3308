"""E2E on the real files: reading the official CSVs, collating batches, the data module's splits and loaders."""

import dataclasses
import io
import logging
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn

from prefix_lightning.data import (
    IGNORE_INDEX,
    Example,
    Group,
    TextToTextCollator,
    dart,
    download_e2e,
    group_references,
    linearize_mr,
    read_e2e,
    reference_groups,
)
from tests.helpers.data import GPT2_LAYOUT, offline_datamodule, rows_and_padded_tokens


@pytest.fixture(scope="module")
def devset(data_dir):
    return read_e2e(data_dir / "e2e" / "devset.csv")


# --- reading -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "refs", "mrs"), [("devset.csv", 4672, 547), ("testset_w_refs.csv", 4693, 630)])
def test_counts(data_dir, name, refs, mrs):
    examples = read_e2e(data_dir / "e2e" / name)
    assert len(examples) == refs
    assert len(group_references(examples)) == mrs
    assert sorted({e.group_id for e in examples}) == list(range(mrs))


def test_linearized_example(devset):
    first = devset[0]
    assert first.source == "name : Alimentum | area : city centre | familyFriendly : no"
    assert first.target == "There is a place in the city centre, Alimentum, that is not family-friendly."
    assert first.group_id == 0


def test_values_may_contain_commas():
    mr = "name[The Eagle], priceRange[less than £20], food[Fish, Chips]"
    assert linearize_mr(mr) == "name : The Eagle | priceRange : less than £20 | food : Fish, Chips"
    assert linearize_mr(" name [ The Eagle ] ,food[Fish ]") == "name : The Eagle | food : Fish"  # spaces dropped


def test_group_references_keeps_first_seen_order():
    examples = [Example("b", "1", 0), Example("a", "2", 1), Example("b", "3", 0)]
    assert group_references(examples) == [("b", ["1", "3"]), ("a", ["2"])]
    assert reference_groups(examples) == [Group(0, "b", ["1", "3"]), Group(1, "a", ["2"])]


def test_groups_follow_ids_not_source_text():
    # Two WebNLG/DART entries may share a triple set; each is scored against its own references.
    examples = [Example("s", "1", 0, "Airport"), Example("s", "2", 1, "Airport")]
    assert reference_groups(examples) == [Group(0, "s", ["1"], "Airport"), Group(1, "s", ["2"], "Airport")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("mr,text\nname[A],Hello\n", r"line 1: missing column\(s\) \['ref'\]"),
        ('mr,ref\nname[A],Hello\n"name[A]",\n', "line 3: empty ref"),
        ("mr,ref\nname[A],Hello\n,Hi\n", "line 3: empty mr"),
        ('mr,ref\nname[A],Hello\n"name[A], area city centre",Hi\n', "line 3: meaning representation"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "broken.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        read_e2e(path)
    assert str(path) in str(info.value)


def test_missing_file_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        read_e2e(tmp_path / "e2e" / "trainset.csv")
    message = str(info.value)
    assert str(tmp_path / "e2e" / "trainset.csv") in message and "PREFIX_LIGHTNING_DATA" in message


def test_failed_download_says_what_is_missing_and_how_to_fix(tmp_path):
    url = "http://127.0.0.1:9/x.zip"
    with pytest.raises(FileNotFoundError) as info:
        download_e2e(tmp_path, url=url)
    message = str(info.value)
    for needle in ("trainset.csv", str(tmp_path / "e2e"), url, "paths.data_dir=", "PREFIX_LIGHTNING_DATA"):
        assert needle in message
    assert not (tmp_path / "e2e").exists()


# --- collation -----------------------------------------------------------------------------------------


def test_causal_training_batch(gpt2_tokenizer, devset):
    collator = TextToTextCollator(gpt2_tokenizer, **GPT2_LAYOUT)
    examples = [devset[0], devset[100], devset[200]]
    batch = collator.train_batch(collator.encode_pairs(examples, "test"))
    assert gpt2_tokenizer.pad_token is None and collator.pad_id == gpt2_tokenizer.eos_token_id
    for row, example in enumerate(examples):
        ids, mask, labels = batch["input_ids"][row], batch["attention_mask"][row], batch["labels"][row]
        prompt = gpt2_tokenizer(example.source + GPT2_LAYOUT["separator"], add_special_tokens=False)["input_ids"]
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # right padding
        assert ids[: len(prompt)].tolist() == prompt
        is_masked = labels == IGNORE_INDEX
        assert is_masked[: len(prompt)].all() and not is_masked[len(prompt) : length].any() and is_masked[length:].all()
        assert labels[len(prompt) : length].tolist() == ids[len(prompt) : length].tolist()
        assert gpt2_tokenizer.decode(labels[~is_masked]) == " " + example.target + GPT2_LAYOUT["target_end"]


def test_causal_generation_batch_is_left_padded(gpt2_tokenizer, devset):
    collator = TextToTextCollator(gpt2_tokenizer, separator="\nDescription:", target_end="<|endoftext|>")
    groups = reference_groups(devset)[:3]
    batch = collator.generation_batch(collator.encode_prompts(groups, "test"))
    assert set(batch) == {"input_ids", "attention_mask", "group_ids", "sources", "references", "categories"}
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][:, 0].all()
    assert batch["categories"] == ["", "", ""]
    for row, (source, references) in enumerate(group_references(devset)[:3]):
        mask = batch["attention_mask"][row]
        length = int(mask.sum())
        assert mask[-length:].all() and not mask[:-length].any()
        assert gpt2_tokenizer.decode(batch["input_ids"][row][-length:]) == source + "\nDescription:"
        assert batch["references"][row] == references and batch["sources"][row] == source
    assert batch["group_ids"] == [0, 1, 2]


def test_truncation_is_counted_and_warned_once(gpt2_tokenizer, devset, caplog):
    collator = TextToTextCollator(gpt2_tokenizer, **GPT2_LAYOUT, max_source_tokens=8, max_target_tokens=6)
    with caplog.at_level(logging.WARNING, logger="prefix_lightning.data"):
        pairs = collator.encode_pairs(devset[:20], "tiny")
    warnings = [r for r in caplog.records if r.name == "prefix_lightning.data"]
    assert len(warnings) == 1 and "tiny: truncated 20 of 20 sources" in warnings[0].getMessage()
    separator = gpt2_tokenizer(GPT2_LAYOUT["separator"], add_special_tokens=False)["input_ids"]
    for pair in pairs:
        prompt_length = pair.labels.count(IGNORE_INDEX)
        assert prompt_length == 8 and pair.input_ids[prompt_length - len(separator) : prompt_length] == separator
        assert len(pair.labels) - prompt_length == 6 and pair.labels[-1] == gpt2_tokenizer.eos_token_id


def test_no_truncation_no_warning(gpt2_tokenizer, devset, caplog):
    collator = TextToTextCollator(gpt2_tokenizer, **GPT2_LAYOUT)
    with caplog.at_level(logging.WARNING, logger="prefix_lightning.data"):
        collator.encode_pairs(devset[:20], "full")
    assert not caplog.records


def test_seq2seq_batches(tokenizer_dir, devset):
    from transformers import BartTokenizer

    # BART's byte-level BPE on the GPT-2 files: <s>, </s> and <pad> become added tokens, enough for the layout.
    tokenizer = BartTokenizer.from_pretrained(tokenizer_dir)
    collator = TextToTextCollator(tokenizer, is_encoder_decoder=True)
    examples = [devset[0], devset[300]]
    batch = collator.train_batch(collator.encode_pairs(examples, "test"))
    assert collator.pad_id == tokenizer.pad_token_id
    for row, example in enumerate(examples):
        source = tokenizer(example.source)["input_ids"]
        target = tokenizer(example.target)["input_ids"]
        assert source[0] == tokenizer.bos_token_id and source[-1] == target[-1] == tokenizer.eos_token_id
        assert batch["input_ids"][row, : len(source)].tolist() == source
        assert batch["input_ids"][row, len(source) :].eq(tokenizer.pad_token_id).all()
        assert batch["labels"][row, : len(target)].tolist() == target
        assert batch["labels"][row, len(target) :].eq(IGNORE_INDEX).all()
    generation = collator.generation_batch(collator.encode_prompts(reference_groups(examples), "test"))
    assert generation["input_ids"][:, 0].eq(tokenizer.bos_token_id).all()  # encoder inputs: right padding


# --- data module ---------------------------------------------------------------------------------------


def test_train_subset_is_seeded_and_disjoint_from_held_out_validation(gpt2_tokenizer, data_dir, devset):
    def train_pairs(seed, size=200):
        module = offline_datamodule(gpt2_tokenizer, data_dir, subset_seed=seed, train_size=size)
        module.setup("fit")
        return module

    first, again, other, smaller = train_pairs(0), train_pairs(0), train_pairs(1), train_pairs(0, size=50)
    assert len(first.train_examples) == 200
    assert first.train_examples == again.train_examples
    assert first.train_examples != other.train_examples
    assert smaller.train_examples == first.train_examples[:50]  # one seed: smaller subsets nest in larger ones
    assert first.val_groups == reference_groups(devset)[-50:]
    val_sources = {group.source for group in first.val_groups}
    assert not val_sources & {example.source for example in first.train_examples + other.train_examples}


def test_the_training_order_follows_shuffle_seed_over_the_same_subset(gpt2_tokenizer, data_dir):
    def first_batch(shuffle_seed):
        module = offline_datamodule(gpt2_tokenizer, data_dir, train_size=50, shuffle_seed=shuffle_seed)
        module.setup("fit")
        return next(iter(module.train_dataloader()))["input_ids"]

    again = first_batch(1)
    assert torch.equal(first_batch(1), again) and not torch.equal(first_batch(2), again)


def test_train_size_larger_than_available_names_the_count(gpt2_tokenizer, data_dir, devset):
    held_out_pairs = sum(len(refs) for _, refs in group_references(devset)[-50:])
    module = offline_datamodule(gpt2_tokenizer, data_dir, train_size=10_000)
    with pytest.raises(ValueError, match=f"has {len(devset) - held_out_pairs} training pairs available"):
        module.setup("fit")
    every_pair = offline_datamodule(gpt2_tokenizer, data_dir, train_size=len(devset) - held_out_pairs)
    every_pair.setup("fit")  # all that are available is a valid size
    assert len(every_pair.train_examples) == len(devset) - held_out_pairs


def test_held_out_validation_needs_val_size(gpt2_tokenizer, data_dir):
    with pytest.raises(ValueError, match="set val_size"):
        offline_datamodule(gpt2_tokenizer, data_dir, val_size=None).setup("fit")


def test_missing_data_without_download(gpt2_tokenizer, tmp_path):
    module = offline_datamodule(gpt2_tokenizer, tmp_path)
    module.prepare_data()
    with pytest.raises(FileNotFoundError, match="devset.csv"):
        module.setup("fit")


def test_a_missing_file_of_ones_own_is_named_not_downloaded(gpt2_tokenizer, data_dir, monkeypatch):
    module = offline_datamodule(gpt2_tokenizer, data_dir, test_file="nosuch.csv", download=True)
    refused = dataclasses.replace(module.spec, download=lambda *_: pytest.fail("the official release was fetched"))
    monkeypatch.setattr(module, "spec", refused)
    module.prepare_data()  # devset.csv, the one official file configured, is there
    with pytest.raises(FileNotFoundError, match=r"E2E file nosuch.csv not found: looked for .*e2e/nosuch.csv"):
        module.setup("test")


def test_a_download_says_what_is_missing_and_where_it_goes(gpt2_tokenizer, tmp_path, monkeypatch, caplog):
    module = offline_datamodule(gpt2_tokenizer, tmp_path, test_file="testset_w_refs.csv", download=True)
    fetched = []

    def download(*arguments: object) -> None:
        fetched.append(arguments)

    monkeypatch.setattr(module, "spec", dataclasses.replace(module.spec, download=download))
    with caplog.at_level(logging.INFO, logger="prefix_lightning"):
        module.prepare_data()
    assert fetched == [(tmp_path, ["devset.csv", "testset_w_refs.csv"])]
    expected = f"e2e: devset.csv, testset_w_refs.csv missing in {tmp_path / 'e2e'}, downloading the official files"
    assert expected in caplog.messages


def test_an_evaluation_downloads_only_the_test_split(gpt2_tokenizer, tmp_path, monkeypatch):
    """evaluate (and Lightning's test, which calls prepare_data without a stage) fetched the training and
    validation splits too."""
    official = dict(train_file="trainset.csv", val_file="devset.csv", test_file="testset_w_refs.csv")
    module = offline_datamodule(gpt2_tokenizer, tmp_path, download=True, **official)
    fetched: list[list[str]] = []
    recording = dataclasses.replace(module.spec, download=lambda _, names: fetched.append(names))
    monkeypatch.setattr(module, "spec", recording)
    module.prepare_data()  # no stage, no trainer: what a training run reads
    module.prepare_data("test")
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module.trainer = trainer
    for running in (TrainerFn.TESTING, TrainerFn.VALIDATING):
        trainer.state.fn = running
        module.prepare_data()
    every_split = ["devset.csv", "testset_w_refs.csv", "trainset.csv"]
    assert fetched == [every_split, ["testset_w_refs.csv"], ["testset_w_refs.csv"], every_split]


@pytest.mark.parametrize("tested", [True, False])
def test_a_failed_download_names_only_the_files_the_run_reads(gpt2_tokenizer, tmp_path, monkeypatch, tested):
    """The dev split (devset.csv, testset_w_refs.csv to test) needs no trainset.csv: the error said all three were
    missing."""
    module = offline_datamodule(gpt2_tokenizer, tmp_path, download=True, tested=tested)
    offline = partial(download_e2e, url="http://127.0.0.1:9/x.zip")
    monkeypatch.setattr(module, "spec", dataclasses.replace(module.spec, download=offline))
    with pytest.raises(FileNotFoundError) as info:
        module.prepare_data()
    message = str(info.value)
    needed = "devset.csv, testset_w_refs.csv" if tested else "devset.csv"
    assert message.startswith(f"E2E file(s) {needed} missing") and f"put {needed} in" in message
    assert "trainset.csv" not in message


def test_a_failed_download_names_the_files_still_missing(tmp_path):
    (tmp_path / "e2e").mkdir()
    (tmp_path / "e2e" / "devset.csv").write_text("mr,ref\n")
    with pytest.raises(FileNotFoundError) as info:
        download_e2e(tmp_path, ["devset.csv", "testset_w_refs.csv"], url="http://127.0.0.1:9/x.zip")
    message = str(info.value)
    assert message.startswith("E2E file(s) testset_w_refs.csv missing") and "put testset_w_refs.csv in" in message


def test_dart_downloads_and_names_only_the_files_the_run_reads(tmp_path, monkeypatch):
    fetched = []
    monkeypatch.setattr(dart, "fetch", lambda urls, folder, how_to_get: fetched.append((list(urls), how_to_get)))
    dart.download_dart(tmp_path, ["dart-v1.1.1-full-dev.json"])
    [(names, how_to_get)] = fetched
    assert names == ["dart-v1.1.1-full-dev.json"] and how_to_get.startswith("Download dart-v1.1.1-full-dev.json from")


def test_an_official_file_not_found_is_named_alone_in_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="put devset.csv in") as info:
        read_e2e(tmp_path / "devset.csv")
    assert "trainset.csv" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="Download dart-v1.1.1-full-dev.json from") as info:
        dart.read_dart(tmp_path / "dart-v1.1.1-full-dev.json")
    assert "full-train" not in str(info.value)


def test_loaders(gpt2_tokenizer, data_dir):
    module = offline_datamodule(gpt2_tokenizer, data_dir, val_file="testset_w_refs.csv", val_size=4)
    module.setup("fit")
    module.setup("test")
    groups = reference_groups(read_e2e(data_dir / "e2e" / "testset_w_refs.csv"))
    assert module.val_groups == groups[:4] and module.test_groups == groups[:30]  # the first N, in file order
    train = next(iter(module.train_dataloader()))
    assert set(train) == {"input_ids", "attention_mask", "labels"} and train["input_ids"].shape[0] == 10

    loss_loader, generation_loader = module.val_dataloader()
    assert len(loss_loader.dataset) == sum(len(group.references) for group in module.val_groups)
    assert len(generation_loader.dataset) == 4
    generation = next(iter(generation_loader))
    assert generation["references"] == [group.references for group in module.val_groups]
    assert generation["attention_mask"][:, -1].all()

    test_batches = list(module.test_dataloader())
    assert sum(len(batch["sources"]) for batch in test_batches) == 30
    assert test_batches[0]["sources"][0] == module.test_groups[0].source

    buffer = io.BytesIO()
    torch.save(dict(module.hparams), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["data_dir"] == str(data_dir)


def test_batches_grouped_by_length_pad_less_over_the_same_pairs(gpt2_tokenizer, data_dir):
    def batches(grouped: bool) -> list[dict]:
        module = offline_datamodule(gpt2_tokenizer, data_dir, batch_size=8, group_by_length=grouped)
        module.setup("fit")
        return list(module.train_dataloader())

    (plain_rows, plain_padded), (rows, padded) = (rows_and_padded_tokens(batches(g)) for g in (False, True))
    assert rows == plain_rows
    assert padded < 0.8 * plain_padded
