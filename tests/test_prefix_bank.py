"""DESIGN.md invariant 6: row i of a batch that mixes prefixes (of different lengths, and rows with none) gives
the logits, greedy and beam-search outputs of a ``PrefixModel`` holding row i's prefix, on row i alone; rows
without a prefix give the plain LM's. On tiny random GPT-2, Llama with grouped-query attention and BART (and T5,
a sliding window whose cache cannot take the prefix, and a model whose attention sites differ in key/value heads
and head size, each site holding its own per-row prefixes)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from prefix_lightning import PrefixBank, PrefixConfig, PrefixModel
from prefix_lightning.decoding.steps import StaticSteps
from prefix_lightning.prefix.rows import RowPrefixes
from tests.helpers.decoding import static_steps
from tests.helpers.families import DECODERS, ENCODER_DECODERS, GQA
from tests.helpers.tiny import PAD, pad_batch, tiny_lm

FAMILIES = {**DECODERS, **ENCODER_DECODERS, "mistral_window": ("mistral", dict(GQA, sliding_window=3))}
MIXED_FAMILIES = ["gpt2", "llama_gqa", "bart", "pegasus", "t5", "umt5", "mistral_window", "gemma4_per_layer_heads"]
ROWS = [
    torch.tensor([10, 11, 12, 13, 14]),
    torch.tensor([20, 21]),
    torch.tensor([30, 31, 32]),
    torch.tensor([40, 41, 42, 43]),
]
PREFIXES = ["short", "long", None, "short"]
LENGTHS = {"short": 2, "long": 5}
TARGET = torch.tensor([[PAD, 50, 51, 52]])
EOS = 2


def export(family: str, folder: Path, seed: int, **fields) -> Path:
    """A random prefix (MLP reparametrization, dropped at export) of ``family``, saved to ``folder``."""
    model_type, model_fields = FAMILIES[family]
    torch.manual_seed(seed)
    return PrefixModel(tiny_lm(model_type, **model_fields), PrefixConfig(hidden_dim=16, **fields)).save(folder)


@pytest.fixture(scope="module")
def banks(tmp_path_factory: pytest.TempPathFactory):
    """Per family: the bank with two exported prefixes of different lengths, and a single-prefix model (or the
    plain LM) for each row's prefix name."""
    made = {}

    def make(family: str) -> tuple[PrefixBank, dict]:
        if family not in made:
            model_type, fields = FAMILIES[family]
            folders = {
                name: export(family, tmp_path_factory.mktemp(f"{family}_{name}"), seed, length=length)
                for seed, (name, length) in enumerate(LENGTHS.items())
            }
            bank = PrefixBank(tiny_lm(model_type, **fields))
            for name, folder in folders.items():
                bank.add(name, folder)
            singles = {name: PrefixModel.from_prefix(tiny_lm(model_type, **fields), f) for name, f in folders.items()}
            singles[None] = tiny_lm(model_type, **fields)
            made[family] = (bank.eval(), {name: model.eval() for name, model in singles.items()})
        return made[family]

    return make


def _is_encoder_decoder(family: str) -> bool:
    return family in ENCODER_DECODERS


@pytest.mark.parametrize("family", MIXED_FAMILIES)
def test_mixed_batch_logits_equal_each_rows_own_model(family: str, banks) -> None:
    bank, singles = banks(family)
    _assert_rows_as_alone(bank, PREFIXES, singles.__getitem__, _is_encoder_decoder(family))


@pytest.mark.parametrize("family", ["t5", "umt5"])
def test_t5_mixed_left_padded_rows_give_each_rows_logits_alone(family: str, banks) -> None:
    """T5's prefix bias counts each row's positions from its first real token, so a batch of left-padded encoder
    inputs gives each row its logits alone (BART's learned positions count the pads: BART pads on the right)."""
    bank, singles = banks(family)
    _assert_rows_as_alone(bank, PREFIXES, singles.__getitem__, encoder_decoder=True, left=True)


def _assert_rows_as_alone(
    bank: PrefixBank,
    names: list[str | None],
    alone: Callable[[str | None], torch.nn.Module],
    encoder_decoder: bool,
    left: bool = False,
) -> None:
    """Each row's logits in a batch of ROWS reading ``names`` equal those of ``alone(name)`` on the row alone
    (rows padded on the left for a decoder, or where ``left`` says so)."""
    ids, mask = pad_batch(ROWS, left=left or not encoder_decoder)
    extra = {"decoder_input_ids": TARGET.expand(len(ROWS), -1)} if encoder_decoder else {}
    with torch.no_grad():
        logits = bank(input_ids=ids, attention_mask=mask, prefixes=names, **extra).logits
        for i, (row, name) in enumerate(zip(ROWS, names, strict=True)):
            single = alone(name)(input_ids=row[None], **({"decoder_input_ids": TARGET} if encoder_decoder else {}))
            got = logits[i] if encoder_decoder else logits[i][mask[i].bool()]
            torch.testing.assert_close(got, single.logits[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("beams", [1, 5], ids=["greedy", "beam5"])
@pytest.mark.parametrize("family", MIXED_FAMILIES)
def test_mixed_batch_decodes_each_row_as_its_own_model(family: str, beams: int, banks) -> None:
    decodes_each_row_as_its_own_model(family, beams, banks)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "mistral_window"])
def test_static_steps_decode_each_row_as_its_own_model(family: str, banks, monkeypatch: pytest.MonkeyPatch) -> None:
    """The beam search's route on CUDA (static steps, eager here): each row's prefix columns in the static mask.
    A sliding window's cache cannot be made static: its steps stay growing."""
    static_calls = []
    step = StaticSteps.__call__
    monkeypatch.setattr(StaticSteps, "__call__", lambda self, *args: static_calls.append(1) or step(self, *args))
    with static_steps(monkeypatch):
        decodes_each_row_as_its_own_model(family, 5, banks)
    assert bool(static_calls) == (family != "mistral_window")


def decodes_each_row_as_its_own_model(family: str, beams: int, banks) -> None:
    """Assert that the bank decodes each row of a mixed batch as the row's own model does alone."""
    bank, singles = banks(family)
    encoder_decoder = _is_encoder_decoder(family)
    ids, mask = pad_batch(ROWS, left=not encoder_decoder)
    settings = dict(max_new_tokens=8, num_beams=beams, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    with torch.no_grad():
        batched = bank.generate(input_ids=ids, attention_mask=mask, prefixes=PREFIXES, **settings)
        assert torch.equal(bank.generate(ids, attention_mask=mask, prefixes=PREFIXES, **settings), batched)
        for i, (row, name) in enumerate(zip(ROWS, PREFIXES, strict=True)):
            alone = singles[name].generate(row[None], **settings)[0]  # token ids first, as transformers takes them
            got = batched[i] if encoder_decoder else batched[i, ids.shape[1] - len(row) :]
            assert torch.equal(got[: len(alone)], alone), (i, name)
            assert bool((got[len(alone) :] == PAD).all()), (i, name)


def test_rows_of_one_prefix_take_the_single_prefix_path(banks) -> None:
    """A batch whose rows all read one prefix decodes as PrefixModel does (the shared block, no per-row
    tables), and equals it."""
    bank, singles = banks("llama_gqa")
    ids, mask = pad_batch(ROWS, left=True)
    settings = dict(max_new_tokens=6, num_beams=5, pad_token_id=PAD, eos_token_id=EOS)
    with torch.no_grad():
        got = bank.generate(input_ids=ids, attention_mask=mask, prefixes=["long"] * len(ROWS), **settings)
        assert bank.injector.current.uniform
        assert isinstance(bank.injector.lookup(bank.injector.bindings[0]), torch.Tensor)
        expected = singles["long"].generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(got, expected)


def test_training_loss_and_length_groups_follow_the_rows(banks) -> None:
    """The target-token loss over a mixed batch (rows run in length groups) equals the LM's own loss."""
    bank, _ = banks("llama_gqa")
    ids, mask = pad_batch(ROWS, left=False)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        reference = bank(input_ids=ids, attention_mask=mask, labels=labels, prefixes=PREFIXES).loss
        for groups in (1, 2, 3):
            loss = bank.loss(labels, PREFIXES, length_groups=groups, input_ids=ids, attention_mask=mask)
            torch.testing.assert_close(loss, reference, atol=1e-6, rtol=1e-6)


def test_a_prefix_model_and_its_export_load_alike(tmp_path: Path) -> None:
    model_type, fields = FAMILIES["gpt2"]
    torch.manual_seed(0)
    trained = PrefixModel(tiny_lm(model_type, **fields), PrefixConfig(length=3, hidden_dim=16)).eval()
    bank = PrefixBank(tiny_lm(model_type, **fields)).eval()
    bank.add("model", trained)
    bank.add("folder", trained.save(tmp_path / "prefix"))
    ids, mask = pad_batch(ROWS[:2], left=True)
    with torch.no_grad():
        expected = trained(input_ids=ids, attention_mask=mask).logits
        for name in ("model", "folder"):
            got = bank(input_ids=ids, attention_mask=mask, prefixes=[name, name]).logits
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert bank.names() == ["model", "folder"]
    bank.remove("model")
    assert bank.names() == ["folder"]


def test_embedding_only_prefixes_mix_with_prefixes(tmp_path: Path) -> None:
    """An exported embedding-only prefix (input embeddings) becomes the LM's own keys/values in the bank."""
    model_type, fields = FAMILIES["llama_gqa"]
    embedding = export("llama_gqa", tmp_path / "embedding", seed=3, length=3, kind="embedding", reparam="none")
    prefix = export("llama_gqa", tmp_path / "prefix", seed=4, length=4)
    bank = PrefixBank(tiny_lm(model_type, **fields)).eval()
    bank.add("embedding", embedding)
    bank.add("prefix", prefix)
    ids, mask = pad_batch(ROWS[:2], left=True)
    with torch.no_grad():
        logits = bank(input_ids=ids, attention_mask=mask, prefixes=["embedding", "prefix"]).logits
        for i, folder in enumerate((embedding, prefix)):
            single = PrefixModel.from_prefix(tiny_lm(model_type, **fields), folder).eval()
            expected = single(input_ids=ROWS[i][None]).logits[0]
            torch.testing.assert_close(logits[i][mask[i].bool()], expected, atol=1e-5, rtol=0)


def test_clear_errors(tmp_path: Path, banks) -> None:
    bank, _ = banks("gpt2")
    ids, mask = pad_batch(ROWS, left=True)
    with pytest.raises(ValueError, match="unknown prefix 'webnlg'; the bank holds: short, long"):
        bank(input_ids=ids, attention_mask=mask, prefixes=["webnlg", None, None, None])
    with pytest.raises(ValueError, match="prefixes has 2 names, but the batch has 4 rows"):
        bank.generate(input_ids=ids, attention_mask=mask, prefixes=["short", "long"], max_new_tokens=2)
    with pytest.raises(TypeError, match="one prefix name \\(or None\\) per row"):
        bank(input_ids=ids, attention_mask=mask, prefixes="short")
    with pytest.raises(ValueError, match="attention_mask is \\(1, 5\\), the inputs \\(4, 5\\)"):
        bank(input_ids=ids, attention_mask=mask[:1], prefixes=PREFIXES)
    with pytest.raises(ValueError, match="input_ids must be integer token ids"):
        bank.generate(input_ids=ids.float(), prefixes=PREFIXES, max_new_tokens=2)
    with pytest.raises(ValueError, match="already holds a prefix named 'short'"):
        bank.add("short", tmp_path)
    with pytest.raises(ValueError, match="unknown prefix 'gone'"):
        bank.remove("gone")
    llama = export("llama_gqa", tmp_path / "llama", seed=0, length=2)
    with pytest.raises(ValueError, match="trained for random:llama|trained for .*llama.*does not fit"):
        bank.add("llama", llama)
    wider = FAMILIES["gpt2"][1] | {"n_embd": 64}
    other_gpt2 = PrefixModel(tiny_lm("gpt2", **wider), PrefixConfig(length=2, hidden_dim=8))
    with pytest.raises(ValueError, match="does not fit"):
        bank.add("wider", other_gpt2.save(tmp_path / "wider"))
    with pytest.raises(ValueError, match="differs from the bank's"):
        bank.add("wider_model", other_gpt2)
    infix = export("gpt2", tmp_path / "infix", seed=0, length=2, kind="infix")
    with pytest.raises(ValueError, match="is an infix"):
        bank.add("infix", infix)
    with pytest.raises(ValueError, match="non-empty string without '.'"):
        bank.add("a.b", tmp_path)
    with pytest.raises(FileNotFoundError, match="no exported prefix"):
        bank.add("missing", tmp_path / "nowhere")
    assert bank.names() == ["short", "long"]


def test_rows_past_the_positions_behind_their_prefix_are_refused_by_row() -> None:
    """Each row's real tokens start behind its own prefix: a row without one may use all of GPT-2's 64 positions,
    a row reading a length-10 prefix only 54."""
    lm = tiny_lm("gpt2")
    bank = PrefixBank(lm)
    bank.add("ten", PrefixModel(tiny_lm("gpt2"), PrefixConfig(length=10, hidden_dim=8)))
    ids, mask = pad_batch([torch.randint(3, 100, (60,)), torch.randint(3, 100, (54,))], left=True)
    bank(input_ids=ids, attention_mask=mask, prefixes=[None, "ten"])
    with pytest.raises(ValueError, match="input row 0 needs 60 positions, .* hold only 54 behind the prefix's 10"):
        bank(input_ids=ids, attention_mask=mask, prefixes=["ten", None])
    with pytest.raises(ValueError, match="input row 1 needs 56 positions \\(54 given, up to 3 generated\\)"):
        bank.generate(input_ids=ids, attention_mask=mask, prefixes=[None, "ten"], max_new_tokens=3)
    with pytest.raises(ValueError, match="input row 0 needs 60 positions"):
        bank.loss(ids, input_ids=ids, attention_mask=mask, prefixes=["ten", "ten"])


def test_the_lm_alone_after_a_mixed_call_is_refused_clearly(banks) -> None:
    """The per-row prefixes of a call stay in place (for recomputation); a batch of another size run through the
    LM directly, not the bank, is told so."""
    bank, _ = banks("gpt2")
    ids, mask = pad_batch(ROWS, left=True)
    with torch.no_grad():
        bank(input_ids=ids, attention_mask=mask, prefixes=PREFIXES)
        with pytest.raises(ValueError, match="run the batch through the bank"):
            bank.lm(input_ids=ids[:3], attention_mask=mask[:3])


def test_an_export_of_format_1_loads_into_the_bank(tmp_path: Path) -> None:
    """An export of the earlier format (one stacked tensor per group) mixes like a current one."""
    model_type, fields = FAMILIES["llama_gqa"]
    current = export("llama_gqa", tmp_path / "current", seed=5, length=3)
    single = PrefixModel.from_prefix(tiny_lm(model_type, **fields), current).eval()
    stacked_folder = tmp_path / "stacked"
    stacked_folder.mkdir()
    with torch.no_grad():
        stacked = {group: torch.stack(encoder()).contiguous() for group, encoder in single.encoders.items()}
    save_file(stacked, stacked_folder / "prefix.safetensors")
    description = json.loads((current / "prefix_config.json").read_text())
    site = single.sites[0]
    groups = {g: {"layers": len(b), "kv_heads": site.kv_heads, "head_dim": site.head_dim} for g, b in stacked.items()}
    description.update({"format": "prefix-lightning/1", "sites": groups})
    (stacked_folder / "prefix_config.json").write_text(json.dumps(description))

    bank = PrefixBank(tiny_lm(model_type, **fields)).eval()
    bank.add("stacked", stacked_folder)
    bank.add("other", export("llama_gqa", tmp_path / "other", seed=6, length=5))
    ids, mask = pad_batch(ROWS[:2], left=True)
    with torch.no_grad():
        logits = bank(input_ids=ids, attention_mask=mask, prefixes=["stacked", "other"]).logits
        expected = single(input_ids=ROWS[0][None]).logits[0]
    torch.testing.assert_close(logits[0][mask[0].bool()], expected, atol=1e-5, rtol=0)


def test_a_4d_additive_mask_hides_each_rows_other_prefix_columns(banks) -> None:
    """A caller's own 4-D float mask takes the additive branch of the per-row prefix columns: each row sees its own
    prefix's columns only (right padding, where positions count alike from a 2-D and a 4-D mask)."""
    bank, _ = banks("llama_gqa")
    ids, mask = pad_batch(ROWS, left=False)
    width, hidden = ids.shape[1], torch.finfo(torch.float32).min
    additive = torch.full((width, width), hidden).triu(1).expand(len(ROWS), 1, width, width)
    additive = additive.masked_fill(~mask.bool()[:, None, None, :], hidden)
    real = mask.bool()
    with torch.no_grad():
        expected = bank(input_ids=ids, attention_mask=mask, prefixes=PREFIXES).logits
        got = bank(input_ids=ids, attention_mask=additive, prefixes=PREFIXES).logits
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


def test_a_window_cache_follows_each_rows_prefix_as_inputs_leave_the_search(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beam search over a mixed batch on a model whose cache cannot take the prefix (a sliding window), with inputs
    that end at different steps: the per-row prefixes follow the rows as finished inputs leave the running batch,
    and each row decodes as its own model."""
    model_type, fields = FAMILIES["mistral_window"]

    def ending_lm() -> torch.nn.Module:  # peaked outputs, the end token made likelier (tests.helpers.decoding)
        lm = tiny_lm(model_type, **fields, initializer_range=0.5)
        with torch.no_grad():
            lm.get_output_embeddings().weight[EOS] *= 3.5
        return lm

    folders = {}
    for seed, (name, length) in enumerate(LENGTHS.items()):
        torch.manual_seed(seed)
        folders[name] = PrefixModel(ending_lm(), PrefixConfig(length=length, hidden_dim=16)).save(tmp_path / name)
    bank = PrefixBank(ending_lm()).eval()
    for name, folder in folders.items():
        bank.add(name, folder)
    singles = {name: PrefixModel.from_prefix(ending_lm(), folder).eval() for name, folder in folders.items()}
    singles[None] = ending_lm()
    rows_kept: list[int] = []
    select = RowPrefixes.select
    monkeypatch.setattr(RowPrefixes, "select", lambda self, rows: rows_kept.append(len(rows)) or select(self, rows))
    ids, mask = pad_batch(ROWS, left=True)
    settings = dict(max_new_tokens=12, num_beams=3, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    with torch.no_grad():
        batched = bank.generate(input_ids=ids, attention_mask=mask, prefixes=PREFIXES, **settings)
        for i, (row, name) in enumerate(zip(ROWS, PREFIXES, strict=True)):
            alone = singles[name].generate(row[None], **settings)[0]
            got = batched[i, ids.shape[1] - len(row) :]
            assert torch.equal(got[: len(alone)], alone), (i, name)
    assert len(set(rows_kept)) >= 3, rows_kept  # inputs left the search at two steps at least


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "t5", "umt5"])
def test_unshifted_prefixes_mix_with_shifted_ones(family: str, tmp_path: Path) -> None:
    """A prefix trained with shift_positions=false keeps its rows' positions (and, on T5, gives its columns no
    relative bias) inside a mixed batch, as its own PrefixModel does, and so in a batch of its rows alone (the path
    of one prefix for every row)."""
    model_type, fields = FAMILIES[family]
    folders = {
        "kept": export(family, tmp_path / "kept", seed=7, length=3, shift_positions=False),
        "moved": export(family, tmp_path / "moved", seed=8, length=2),
    }
    bank = PrefixBank(tiny_lm(model_type, **fields)).eval()
    for name, folder in folders.items():
        bank.add(name, folder)

    def alone(name: str | None) -> torch.nn.Module:
        lm = tiny_lm(model_type, **fields)
        return (lm if name is None else PrefixModel.from_prefix(lm, folders[name])).eval()

    _assert_rows_as_alone(bank, ["kept", "moved", None, "kept"], alone, _is_encoder_decoder(family))
    _assert_rows_as_alone(bank, ["kept"] * 4, alone, _is_encoder_decoder(family))
