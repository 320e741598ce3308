"""Slow: prefixes of different lengths mixed in one batch on the real SmolLM2-135M (30 layers, 9 query / 3
key-value heads) decode every row as its own prefix alone does (DESIGN.md invariant 6 at full size)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prefix_lightning import PrefixBank, PrefixModel, load_backbone
from prefix_lightning.data import read_e2e, reference_groups

pytestmark = pytest.mark.slow


def test_mixed_prefixes_on_smollm2_decode_as_each_alone(tmp_path: Path, data_dir: Path) -> None:
    singles = {}
    for seed, (name, length) in enumerate([("short", 4), ("long", 9)]):
        torch.manual_seed(seed)
        lm, tokenizer = load_backbone("embedded", "smollm2-135m-instruct")
        singles[name] = PrefixModel(lm, length=length, reparam="none", init_vocab=True).eval()
        singles[name].save(tmp_path / name)
    bank = PrefixBank(load_backbone("embedded", "smollm2-135m-instruct")[0]).eval()
    for name in singles:
        bank.add(name, tmp_path / name)
    groups = reference_groups(read_e2e(data_dir / "e2e" / "testset_w_refs.csv"))[:4]
    prompts = [group.source + "\nDescription:" for group in groups]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    names = ["short", "long", None, "long"]
    settings = dict(num_beams=5, max_new_tokens=20, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    settings["pad_token_id"] = tokenizer.pad_token_id
    with torch.no_grad():
        logits = bank(**batch, prefixes=names).logits
        mixed = bank.generate(**batch, prefixes=names, **settings)
        for i, (prompt, name) in enumerate(zip(prompts, names, strict=True)):
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
            model = singles[name or "short"]
            with model.prefix_disabled() if name is None else torch.no_grad():
                alone = model(input_ids=ids).logits[0]
                output = model.generate(input_ids=ids, **settings)[0, ids.shape[1] :]
            real = batch["attention_mask"][i].bool()
            torch.testing.assert_close(logits[i][real], alone, atol=1e-4, rtol=0)
            got = mixed[i, batch["input_ids"].shape[1] :]
            assert torch.equal(got[: len(output)], output), (i, name)
            assert bool((got[len(output) :] == tokenizer.pad_token_id).all())
