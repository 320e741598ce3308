"""Cross-entropy over a large vocabulary without a float32 copy of every row's logits kept for the backward.

``cross_entropy(logits.float())`` keeps the float32 log-softmax of every row for the backward, and the backward
makes two more tensors of that size: 4 bytes x rows x vocabulary each (190 MB for the targets of a batch of 32 E2E
pairs over GPT-2's vocabulary), alive while every layer's activations are. Here the logits are upcast a slice of
rows at a time, in the forward and again in the backward, and only the logits themselves (in the LM's dtype, bf16
on GPUs) and one float per row are kept. The values are cross-entropy's in float32: the same loss, and the same
gradient rounded to the logits' dtype, as ``cross_entropy(logits.float())``.
"""

from __future__ import annotations

from typing import Any

import torch

# float32 values upcast at once (16 MB): a slice's copy and logsumexp's difference are alive together at the end of
# the forward, where every layer's activations are. With 64 MB slices the 135M shape's peak on an H200 (batch 32)
# fell from 2,628 MB to 2,433 MB, not the 400 MB that the copies it no longer keeps weigh; 12 slices of that batch's
# 960 target rows instead of 3 add about 150 small kernels to a step.
SLICE_ELEMENTS = 2**22


def sliced_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The summed float32 cross-entropy of ``logits`` (rows x vocabulary) against ``targets`` (one per row), rows
    whose target is ``ignore_index`` left out."""
    return _SlicedCrossEntropy.apply(logits, targets, ignore_index)


def _row_slices(logits: torch.Tensor) -> list[slice]:
    """At least one, empty where there are no rows (a group of rows without a target): its sum is 0."""
    rows = max(1, SLICE_ELEMENTS // logits.shape[-1])
    return [slice(start, start + rows) for start in range(0, max(1, logits.shape[0]), rows)]


class _SlicedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        kept = targets != ignore_index
        picked = targets.masked_fill(~kept, 0)  # any column: the row is left out
        log_normalizers = torch.cat([torch.logsumexp(logits[rows].float(), dim=-1) for rows in _row_slices(logits)])
        target_logits = logits.gather(1, picked[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, picked, kept, log_normalizers)
        return ((log_normalizers - target_logits) * kept).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, picked, kept, log_normalizers = ctx.saved_tensors
        scale = grad * kept  # d loss / d row's loss
        grad_logits = torch.empty_like(logits)
        for rows in _row_slices(logits):
            probabilities = logits[rows].to(torch.float32, copy=True).sub_(log_normalizers[rows, None]).exp_()
            probabilities[torch.arange(probabilities.shape[0], device=logits.device), picked[rows]] -= 1
            grad_logits[rows] = probabilities.mul_(scale[rows, None])
        return grad_logits, None, None
