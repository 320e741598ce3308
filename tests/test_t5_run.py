"""A tiny T5 from the command line: trains a few steps, and its export reloads to the trained model's logits and
beam-search outputs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from prefix_lightning import PrefixModel
from prefix_lightning.training.build import build_model, load_configured_backbone
from tests.helpers.cli import run_cli
from tests.helpers.config import compose_train

OVERRIDES = ["model=tiny_t5", "debug=fast", "export=last"]


@pytest.mark.integration
def test_tiny_t5_trains_from_run_py_and_its_export_reloads(tmp_path: Path, data_dir: Path) -> None:
    run_cli(tmp_path, *OVERRIDES)
    with (tmp_path / "csv" / "metrics.csv").open() as file:
        losses = [float(row["train/loss"]) for row in csv.DictReader(file) if row["train/loss"]]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)

    cfg = compose_train(tmp_path / "cfg", OVERRIDES)
    trained, tokenizer = build_model(cfg)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    trained.load_state_dict({key.removeprefix("model."): value for key, value in state.items()}, strict=False)
    loaded = PrefixModel.from_prefix(load_configured_backbone(cfg)[0], tmp_path / "prefix")
    trained.eval(), loaded.eval()
    sources = tokenizer(["name : The Eagle | area : riverside", "name : Blue Spice"], return_tensors="pt", padding=True)
    targets = tokenizer(["The Eagle is", "Blue Spice is a pub"], return_tensors="pt", padding=True).input_ids
    beams = dict(num_beams=3, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        logits = trained(**sources, decoder_input_ids=targets).logits
        torch.testing.assert_close(loaded(**sources, decoder_input_ids=targets).logits, logits, atol=1e-6, rtol=0)
        assert torch.equal(loaded.generate(**sources, **beams), trained.generate(**sources, **beams))
        with trained.prefix_disabled():
            plain = trained.lm(**sources, decoder_input_ids=targets).logits
    assert (plain - logits).abs().max() > 1e-2, "the trained prefix must change the logits"
