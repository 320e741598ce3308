"""The frozen LM's linear layers through oneDNN with weights packed once, for decoding on CPU.

torch's float32 linear layer on CPU calls MKL's GEMM, which lays the weight matrix out anew on every call;
oneDNN with weights packed in advance into its own blocked layout runs decoding's small products several times
faster (docs/performance.md has the numbers). The LM is frozen, so its weights are packed once and reused by every
step of every ``generate`` call, and packed again only where a weight tensor changed. Packing costs a copy of the
weights while they are kept.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from functools import partial
from typing import SupportsIndex

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

Packed = tuple[tuple[int, int], torch.Tensor]


class PackedWeights(dict[str, Packed]):
    """The packed copies kept between decoding calls: module name -> (the weight it was packed from: storage
    address and version counter, the packed weight). Copies (pickled for spawned processes, deep-copied) start
    empty: oneDNN tensors can be neither pickled nor copied, and are packed again when needed."""

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[type, tuple[()]]:
        return type(self), ()


def can_pack() -> bool:
    """oneDNN is in this torch build and the CPU is an x86 one (the kind it was measured on)."""
    return (
        platform.machine().lower() in ("x86_64", "amd64")
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def _packable(module: nn.Module) -> bool:
    """A frozen float32 CPU ``nn.Linear`` or GPT-2 ``Conv1D`` (subclasses may compute something else) whose
    weight is a whole matrix (FSDP's sharded parameters are flat shards outside its forward)."""
    weight = getattr(module, "weight", None)
    return (
        type(module) in (nn.Linear, Conv1D)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and not weight.requires_grad
    )


def _packed_forward(weight: torch.Tensor, bias: torch.Tensor | None, inputs: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(inputs, weight, bias, "none", [], "")


@contextmanager
def packed_linears(model: nn.Module, packed: MutableMapping[str, Packed]) -> Iterator[int]:
    """Inside the block, ``model``'s frozen float32 CPU linear layers compute through oneDNN with packed weights
    (yields how many); ``packed`` keeps them between blocks (clear it to free them). Nothing changes under
    autocast (which must keep choosing the dtype) or where :func:`can_pack` says no. (Compiled blocks decode
    eager, so they see the swapped forwards: see decoding.routes.)

    Results equal torch's up to float32 rounding (another summation order), as between two BLAS libraries.
    """
    if not can_pack() or torch.is_autocast_enabled("cpu"):
        yield 0
        return
    patched = []
    try:
        for name, module in model.named_modules():
            if not _packable(module):
                continue
            weight = module.weight
            source = (weight.data_ptr(), weight._version)
            kept = packed.get(name)
            if kept is None or kept[0] != source:
                matrix = weight.detach() if isinstance(module, nn.Linear) else weight.detach().t().contiguous()
                kept = packed[name] = (source, torch.ops.mkldnn._reorder_linear_weight(matrix))
            module.forward = partial(_packed_forward, kept[1], module.bias)
            patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
