"""Kernels from the Hugging Face Hub are code: none is downloaded and run unless an admin allows it.

Two libraries fetch them through the `kernels` package: bitsandbytes 0.50 asks the Hub for
`kernels-community/quantization-bitsandbytes` as it is imported on a CPU with AVX512-BF16
(`backends/cpu/ops.py`, `from kernels import get_kernel` in a try), GPU machines included, and transformers 5
kernelizes every model `from_pretrained` loads with the Hub's kernels unless `USE_HUB_KERNELS` says no. So the
data plane turns transformers' switch off and makes `import kernels` fail: bitsandbytes then uses its own
built-in CPU kernel, as wherever `kernels` is not installed, and models keep their PyTorch layers.
`TUNEDECK_ALLOW_HUB_KERNELS=1` leaves both libraries as they come.
"""

from __future__ import annotations

import logging
import os
import sys

from workers.config import env_bool

ALLOW_SETTING = "TUNEDECK_ALLOW_HUB_KERNELS"
# What bitsandbytes logs when the import fails: expected once refused, so it stays out of the jobs' logs.
REFUSAL_NOTICE = "Failed to load CPU gemm_4bit_forward"
NOTICE_LOGGER = "bitsandbytes.backends.cpu.ops"


def hub_kernels_allowed() -> bool:
    return env_bool(ALLOW_SETTING, False)


def refuse_hub_kernels() -> None:
    """Keep this process (and the processes it starts) from fetching kernels, unless an admin allowed it."""
    if hub_kernels_allowed():
        return
    os.environ["USE_HUB_KERNELS"] = "NO"  # transformers reads it at each from_pretrained
    sys.modules["kernels"] = None  # type: ignore[assignment]  # Python's way to make an import raise ImportError
    logging.getLogger(NOTICE_LOGGER).addFilter(_drop_refusal_notice)


def _drop_refusal_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(REFUSAL_NOTICE)
