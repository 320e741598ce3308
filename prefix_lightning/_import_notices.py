"""Notices that optional libraries log when they are merely imported, dropped so that every command's output stays
readable (a one-line error stays one line). The filters are installed when the package is imported, before
transformers imports the libraries (it imports torchao whenever torchao is installed, quantized LM or not).

- torchao (0.18, the ``quant`` extra) on a torch built without CUDA tries to load its CUDA kernels and logs
  "Failed to load .../torchao/_C...so" for each, and "Detected no triton": expected on such a machine.
- torch (2.13) logs a deprecation note each time torchao registers one of its Enums with pytree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch


class _Drop(logging.Filter):
    def __init__(self, expected: Callable[[str], bool]) -> None:
        super().__init__()
        self.expected = expected

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.expected(record.getMessage())


def quiet_import_notices() -> None:
    if torch.version.cuda is None and torch.version.hip is None:
        logging.getLogger("torchao").addFilter(_Drop(lambda m: m.startswith("Failed to load") and "torchao/_C" in m))
        logging.getLogger("torchao.kernel.intmm").addFilter(_Drop(lambda m: "Detected no triton" in m))
    logging.getLogger("torch.utils._pytree").addFilter(
        _Drop(lambda m: "is an Enum subclass and is now natively supported by torch.compile" in m)
    )


quiet_import_notices()
