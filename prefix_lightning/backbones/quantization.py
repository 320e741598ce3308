"""A quantized frozen LM: its linear layers stored in 8 or 4 bits, so that a larger LM fits in memory while the
prefix trains in float32. The prefix's gradient reaches it through the quantized layers, which must therefore
compute a gradient for their input without keeping a float copy of their weight: bitsandbytes' layers
dequantize in the backward pass (CPU and CUDA), the way QLoRA trains adapters on a 4-bit LM.

- ``int8``: LLM.int8() (``bitsandbytes.nn.Linear8bitLt``): int8 weights with one scale per output channel;
  activation columns with outliers beyond 6 (transformers' default threshold) are computed in 16 bits. Its
  backward keeps nothing of the layer's input (``frozen_int8.py``).
- ``int4``: NF4 (``bitsandbytes.nn.Linear4bit``, QLoRA's format): 4-bit NormalFloat weights in blocks of 64, the
  blocks' scales quantized too; computed in the LM's dtype.

torchao (0.18 with torch 2.13) was measured and not taken: its int8 weight-only layer saves the dequantized
float weight for the backward pass (a training step then holds float32 and int8 weights at once), and its
4-bit layouts compute through kernels without a backward (``_weight_int4pack_mm*``).

Only the transformer blocks are quantized: the embeddings and the output layer (often tied to the embeddings;
quantizing it would untie and duplicate them) stay in the LM's dtype, and so do the layers the model itself keeps
in float32 (``_keep_in_fp32_modules``: T5's feed-forward output ``wo``). GPT-2's ``Conv1D`` layers become
``nn.Linear`` first (the same product, weight transposed). bitsandbytes is optional (extra ``quant``) and
imported only when a model is quantized.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import cast

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

QUANTIZATIONS = {
    "int8": "LLM.int8() weights, one scale per output channel (bitsandbytes Linear8bitLt)",
    "int4": "NF4 weights in blocks of 64 (bitsandbytes Linear4bit)",
}
LIBRARY = "bitsandbytes"
REQUIREMENT = "bitsandbytes>=0.46"  # layers that run on CPU (tested: 0.46.0, 0.50.2)
OUTLIER_THRESHOLD = 6.0  # LLM.int8(): activation columns beyond it are computed in 16 bits

logger = logging.getLogger(__name__)


def check_quantization(quantization: str | None) -> None:
    """A known scheme whose library is installed (or None: the LM in its own dtype)."""
    if quantization is None:
        return
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; allowed: {', '.join(QUANTIZATIONS)} or null (none)")
    if importlib.util.find_spec(LIBRARY) is None:
        raise ModuleNotFoundError(
            f"quantization={quantization} needs {LIBRARY}, which is not installed: pip install '{REQUIREMENT}' "
            "(or the extra: pip install 'prefix-lightning[quant]')"
        )


def quantize(model: PreTrainedModel, quantization: str) -> PreTrainedModel:
    """Replace ``model``'s transformer-block linear layers by frozen quantized ones, in place; returns ``model``."""
    check_quantization(quantization)
    replace = _int8 if quantization == "int8" else _nf4
    output_layer = model.get_output_embeddings()
    kept_float = getattr(model, "_keep_in_fp32_modules", None) or []
    count = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if child is output_layer or type(child) not in (nn.Linear, Conv1D):
                continue
            if _kept_float(f"{parent_name}.{name}".lstrip("."), kept_float):
                continue
            linear = _conv1d_as_linear(child) if isinstance(child, Conv1D) else cast(nn.Linear, child)
            setattr(parent, name, replace(linear).requires_grad_(False))
            count += 1
    if count == 0:
        raise ValueError(
            f"quantization={quantization}: {type(model).__name__} has no nn.Linear or Conv1D layer besides its "
            "output layer to quantize"
        )
    _own_memory(model)
    if quantization == "int8" and model.dtype != torch.float16:
        logger.info("int8: bitsandbytes casts the inputs of each quantized layer to float16 to quantize them")
    return model


def _kept_float(name: str, kept: list[str]) -> bool:
    """The model's own list of modules that must stay in float (``_keep_in_fp32_modules``, e.g. T5's ``wo``, whose
    input T5 casts to the weight's dtype: a 4-bit weight's is uint8). transformers' bitsandbytes loading leaves
    them unquantized too; a name matches as a whole name or a dotted suffix."""
    return any(name == module or name.endswith(f".{module}") for module in kept)


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the modules that hold a quantized weight."""
    return [
        name
        for name, module in model.named_modules()
        if any(cls.__module__.startswith(f"{LIBRARY}.") for cls in type(module).__mro__)  # FrozenLinear8bitLt too
    ]


def refuse_quantized(model: nn.Module, method: str) -> None:
    """Methods that train the LM's own weights cannot train quantized ones."""
    layers = quantized_layers(model)
    if layers:
        raise ValueError(quantized_training_error(method, f"{len(layers)} quantized layers, e.g. {layers[0]}"))


def quantized_training_error(method: str, what: str) -> str:
    return (
        f"{method} trains the LM's own weights, which cannot train in quantized form ({what}): set "
        "model.backbone.quantization=null, or use a method that keeps the LM frozen (prefix, lora, ...)"
    )


def _own_memory(model: nn.Module) -> None:
    """Copy the tensors that stay in float out of the checkpoint file: transformers maps the file into memory and
    the tensors are views of it, so one of them alone keeps the whole file mapped, and quantizing read all of it
    (on SmolLM2: 530 MB of the file resident besides the quantized weights, which take 101 MB)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if type(tensor) in (torch.Tensor, nn.Parameter):
                tensor.data = tensor.data.clone()


def _conv1d_as_linear(conv: Conv1D) -> nn.Linear:
    """GPT-2's Conv1D computes x @ W + b with W of shape (in, out); nn.Linear holds W transposed."""
    inputs, outputs = conv.weight.shape
    linear = nn.Linear(inputs, outputs, device="meta")
    linear.weight = nn.Parameter(conv.weight.detach().t().contiguous())
    linear.bias = conv.bias
    return linear


class _SaidOnce(logging.Filter):
    """bitsandbytes (0.50) logs at every int8 product that its float32 or bfloat16 inputs are cast to float16 to be
    quantized: thousands of identical lines a step. ``quantize`` says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


_SAID_ONCE = _SaidOnce()


class _UnusedKernel(logging.Filter):
    """bitsandbytes (0.50), imported on a CPU with AVX512-BF16 (PEFT imports it wherever it is installed), warns
    that it could not fetch the kernel of its repacked 4-bit CPU layout, which the layers quantized here never use
    (see ``_nf4``): a warning in every command's output about nothing it runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")


# Set before anything imports bitsandbytes: the package's __init__ imports this module first.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_UnusedKernel())


# bitsandbytes quantizes a weight when it is moved to a device: here, to the one it is already on.
def _int8(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    from prefix_lightning.backbones.frozen_int8 import FrozenLinear8bitLt

    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_SAID_ONCE)  # added once however often called

    layer = FrozenLinear8bitLt(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        has_fp16_weights=False,
        threshold=OUTLIER_THRESHOLD,
        device="meta",
    )
    layer.weight = bnb.nn.Int8Params(linear.weight.detach(), requires_grad=False, has_fp16_weights=False)
    layer.bias = linear.bias
    return layer.to(linear.weight.device)


def _nf4(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    weight = linear.weight
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=weight.dtype,
        quant_type="nf4",
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(weight.detach(), requires_grad=False, quant_type="nf4", module=layer)
    layer.bias = linear.bias
    # bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks the weight in place at the first forward in eval mode whose
    # input needs no gradient (in a frozen LM: every forward of decoding, and the first layer's in training), into a
    # layout whose kernel has no backward: the prefix then got no gradient at all, silently (and layers narrower
    # than a block of 64 failed). The layer keeps the layout that both directions compute through.
    layer.support_avx512bf16_for_cpu = False
    return layer.to(weight.device)
