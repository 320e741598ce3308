"""bitsandbytes, which the quantization tests need: the dev extra installs it wherever it publishes a wheel."""

from __future__ import annotations

import importlib.util
import platform

import pytest

# bitsandbytes (>= 0.46) publishes wheels for Linux (x86-64, ARM64), Windows and Apple-silicon macOS, none for Intel
# Macs; pyproject's dev extra leaves it out there. Anywhere else a missing bitsandbytes fails the tests, which name
# the install command.
NO_WHEEL = platform.system() == "Darwin" and platform.machine() != "arm64"
needs_bitsandbytes = pytest.mark.skipif(
    NO_WHEEL and importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes publishes no wheel for Intel macOS",
)
