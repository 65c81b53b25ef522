"""Kernels from the Hugging Face Hub are code: none is downloaded and run unless an admin allows it.

bitsandbytes 0.50 asks the Hub for `kernels-community/quantization-bitsandbytes` as it is imported on a CPU with
AVX512-BF16 (`backends/cpu/ops.py`: `from kernels import get_kernel` in a try), GPU machines included, and runs
what it gets; transformers fetches hub kernels too (`use_kernels`, hub attention implementations). All of it
goes through the `kernels` package, so the data plane refuses that import: bitsandbytes then uses its own
built-in CPU kernel, as wherever `kernels` is not installed. `TUNEDECK_ALLOW_HUB_KERNELS=1` lifts the refusal.
"""

from __future__ import annotations

import logging
import sys

from workers.config import env_bool

ALLOW_SETTING = "TUNEDECK_ALLOW_HUB_KERNELS"
# What bitsandbytes logs when the import fails: expected once refused, so it stays out of the jobs' logs.
REFUSAL_NOTICE = "Failed to load CPU gemm_4bit_forward"
NOTICE_LOGGER = "bitsandbytes.backends.cpu.ops"


def hub_kernels_allowed() -> bool:
    return env_bool(ALLOW_SETTING, False)


def refuse_hub_kernels() -> None:
    """Make `import kernels` fail in this process (and the processes it forks), unless an admin allowed it."""
    if hub_kernels_allowed():
        return
    sys.modules["kernels"] = None  # type: ignore[assignment]  # Python's way to make an import raise ImportError
    logging.getLogger(NOTICE_LOGGER).addFilter(_drop_refusal_notice)


def _drop_refusal_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(REFUSAL_NOTICE)
