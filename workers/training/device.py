"""Where a job's model runs: the GPU when there is one, in the compute dtype it asked for (or the best it has)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Device:
    kind: str  # "cuda" or "cpu"
    dtype_name: str  # "bfloat16", "float16" or "float32"


def pick_device(compute_dtype: str) -> Device:
    import torch

    if torch.cuda.is_available():
        if compute_dtype == "auto":
            compute_dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return Device("cuda", compute_dtype)
    return Device("cpu", "float32" if compute_dtype == "auto" else compute_dtype)
