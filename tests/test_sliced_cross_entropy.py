"""The loss's cross-entropy, upcast a slice of rows at a time, against ``cross_entropy(logits.float())``."""

from __future__ import annotations

import pytest
import torch

from prefix_lightning.methods import IGNORE_INDEX
from prefix_lightning.methods import sliced_cross_entropy as sliced
from prefix_lightning.methods.sliced_cross_entropy import sliced_cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_gradient_equal_cross_entropy_in_float32(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sliced, "SLICE_ELEMENTS", 3 * 50)  # slices of 3 rows: 7 rows end in a partial slice
    torch.manual_seed(0)
    logits = (torch.randn(7, 50) * 4).to(dtype)
    targets = torch.tensor([3, IGNORE_INDEX, 49, 0, 3, IGNORE_INDEX, 17])
    ours_input, their_input = (logits.clone().requires_grad_() for _ in range(2))
    ours = sliced_cross_entropy(ours_input, targets, IGNORE_INDEX)
    theirs = torch.nn.functional.cross_entropy(their_input.float(), targets, reduction="sum")
    (ours * 0.5).backward()  # an upstream gradient other than 1
    assert torch.equal(ours_input, logits)  # worked on copies: a float32 slice is a view of the logits
    (theirs * 0.5).backward()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)
    assert ours_input.grad.dtype == dtype
    torch.testing.assert_close(ours_input.grad, their_input.grad)
    assert not ours_input.grad[[1, 5]].any()  # rows left out get no gradient


def test_keeps_no_float32_copy_of_the_logits_for_the_backward() -> None:
    logits = torch.randn(6, 40, dtype=torch.bfloat16, requires_grad=True)
    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        sliced_cross_entropy(logits, torch.arange(6), IGNORE_INDEX)
    assert max(t.numel() for t in kept if t.dtype == torch.float32) == 6  # one float per row
    assert any(t is logits for t in kept)


def test_no_rows_make_a_loss_of_zero() -> None:
    logits = torch.randn(0, 40, requires_grad=True)
    loss = sliced_cross_entropy(logits, torch.zeros(0, dtype=torch.long), IGNORE_INDEX)
    loss.backward()
    assert loss.item() == 0 and logits.grad.shape == (0, 40)
