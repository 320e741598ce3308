"""Frozen linear layers computed by oneDNN on CPU, in training and in decoding.

torch's float32 linear layer on CPU calls MKL's GEMM. On the project's AMD EPYC machine, oneDNN computes the
same products 2-2.5x faster, for the few dozen rows of a decoding step as for the hundreds of a training batch,
and for the product of the backward pass (the input's gradient, through the transposed weight) as well. A frozen
layer needs no weight gradient, so forward and backward are two oneDNN calls on the layer's own weight: no copy.

Each ``nn.Linear`` and GPT-2 ``Conv1D`` gets a forward that takes this path only where it is exact in kind: a
float32 CPU input, frozen weight and bias, no autocast (which must keep choosing the dtype); anything else runs
the layer's own forward. Results equal torch's up to float32 rounding (another summation order).
"""

from __future__ import annotations

import platform
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LAYERS = (nn.Linear, Conv1D)


def can_use_onednn() -> bool:
    """oneDNN is in this torch build and the CPU is an x86 one (the kind it was measured on)."""
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()


def route_frozen_linears(model: nn.Module) -> int:
    """Give every ``nn.Linear`` / ``Conv1D`` of ``model`` (exactly those types: subclasses may compute something
    else) the oneDNN forward; returns how many. The forward is a partial of a module-level function, so that the
    model still pickles."""
    if not can_use_onednn():
        return 0
    layers = [module for module in model.modules() if type(module) in LAYERS and "forward" not in vars(module)]
    for module in layers:
        module.forward = partial(_forward, module)
    return len(layers)


def _linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``inputs @ weight.T + bias`` by oneDNN, for any float32 weight layout (the transpose is read in place)."""
    return torch.ops.mkldnn._linear_pointwise(inputs, weight, bias, "none", [], "")


class _FrozenLinear(torch.autograd.Function):
    """Gradient for the input only: the weight (out, in) and bias are frozen."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return _linear(inputs, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        return _linear(grad, weight.t(), None), None, None


def _forward(module: nn.Module, inputs: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    weight, bias = module.weight, module.bias
    exact = (
        not args
        and not kwargs
        and inputs.numel() > 0
        and inputs.device.type == "cpu"
        and inputs.dtype == weight.dtype == torch.float32
        and not weight.requires_grad
        and (bias is None or not bias.requires_grad)
        and not torch.is_autocast_enabled("cpu")
    )
    if not exact:
        return type(module).forward(module, inputs, *args, **kwargs)
    if isinstance(module, Conv1D):  # stored (in, out)
        weight = weight.t()
    if torch.is_grad_enabled() and inputs.requires_grad:
        return _FrozenLinear.apply(inputs, weight, bias)
    return _linear(inputs, weight, bias)
