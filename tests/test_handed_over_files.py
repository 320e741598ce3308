"""Files a user hands over — checkpoints and exported prefixes — are read, or refused with one line that names the
file and what is wrong with it (data files: tests/test_datasets.py)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from prefix_lightning import PrefixConfig, PrefixModel
from prefix_lightning.files.checkpoints import DamagedCheckpointError, check_checkpoint, load_checkpoint
from tests.helpers.tiny import tiny_lm


def lightning_checkpoint(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"model.p": torch.randn(64, 64)}, "global_step": step}, path)
    os.utime(path, (step, step))  # older steps written earlier
    return path


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte_inside(path: Path) -> None:
    payload = bytearray(path.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    path.write_bytes(bytes(payload))


def another_kind_of_file(path: Path) -> None:
    torch.save({"weights": torch.zeros(2)}, path)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (truncate, r"it is truncated or not a checkpoint \([\d,]+ bytes, no complete torch archive\)"),
        (flip_a_byte_inside, r"its entry \S+ is damaged"),
        (another_kind_of_file, r"it is not a Lightning checkpoint \(no state_dict / global_step\)"),
        (lambda path: path.write_text("hello"), r"it is truncated or not a checkpoint \(5 bytes"),
    ],
)
def test_a_damaged_checkpoint_is_named_with_the_newest_intact_one(
    damage: Callable[[Path], None], problem: str, tmp_path: Path
) -> None:
    older, newer = (lightning_checkpoint(tmp_path / f"step{step}.ckpt", step) for step in (2, 4))
    last = lightning_checkpoint(tmp_path / "last.ckpt", 6)
    damage(last)
    with pytest.raises(DamagedCheckpointError) as refused:
        check_checkpoint(last)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"checkpoint {last} cannot be used: ")
    assert re.search(problem, message)
    assert message.endswith(f"the newest intact checkpoint there is {newer}")
    assert load_checkpoint(older)["global_step"] == 2


def test_a_missing_checkpoint_is_named_and_a_lone_damaged_one_says_none_is_intact(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"checkpoint {tmp_path / 'nope.ckpt'} does not exist; no intact"):
        check_checkpoint(tmp_path / "nope.ckpt")
    truncate(lightning_checkpoint(tmp_path / "last.ckpt", 3))
    with pytest.raises(DamagedCheckpointError, match=rf"; no intact checkpoint in {tmp_path}$"):
        check_checkpoint(tmp_path / "last.ckpt")


def _description(folder: Path) -> dict:
    return json.loads((folder / "prefix_config.json").read_text())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "prefix.safetensors").unlink(), r"has no prefix\.safetensors"),
        (lambda f: truncate(f / "prefix.safetensors"), r"cannot read .*prefix\.safetensors: .*truncated or corrupted"),
        (lambda f: (f / "prefix_config.json").write_text("{"), r"prefix_config\.json is not valid JSON"),
        (lambda f: (f / "prefix_config.json").write_bytes(b"\xff\xfe{"), r"prefix_config\.json is not valid JSON"),
        (
            lambda f: (f / "prefix_config.json").write_text(json.dumps({**_description(f), "sites": None})),
            r"prefix_config\.json lacks sites: not a complete prefix-lightning export",
        ),
        (
            lambda f: (f / "prefix_config.json").write_text(
                json.dumps({**_description(f), "prefix": {**_description(f)["prefix"], "length": 0}})
            ),
            r"prefix_config\.json: its prefix settings are not valid \(.*length must be a positive integer",
        ),
        (
            lambda f: (f / "prefix_config.json").write_text(json.dumps({**_description(f), "sites": [{"group": 1}]})),
            r"prefix_config\.json: its sites should each give group, kv_heads, head_dim",
        ),
        (lambda f: (f / "prefix_config.json").write_text('{"format": "other"}'), r"not a prefix-lightning export"),
    ],
)
def test_a_damaged_prefix_export_is_refused_naming_the_file(damage, message: str, tmp_path: Path) -> None:
    PrefixModel(tiny_lm("gpt2"), PrefixConfig(length=3)).save(tmp_path)
    damage(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as refused:
        PrefixModel.from_prefix(tiny_lm("gpt2"), tmp_path)
    assert str(tmp_path) in str(refused.value) and "\n" not in str(refused.value)
