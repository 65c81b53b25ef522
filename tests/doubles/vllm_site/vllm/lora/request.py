"""vllm.lora.request.LoRARequest, as vLLM's offline API takes it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str
