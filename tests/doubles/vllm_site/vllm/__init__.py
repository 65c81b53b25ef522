"""A test double of vLLM's offline API (see tests/doubles/README.md): greedy answers through transformers + PEFT."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__version__ = "0.0.0+test"


@dataclass
class SamplingParams:
    temperature: float = 1.0
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


class LLM:
    def __init__(self, model: str, dtype: str = "auto", seed: int = 0, max_model_len: int | None = None,
                 trust_remote_code: bool = False, enable_lora: bool = False, max_lora_rank: int = 16,
                 max_loras: int = 1, revision: str | None = None, **_: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not (Path(model) / "config.json").is_file() and not Path(model).is_dir():
            raise OSError(f"{model} is not a local folder with a config.json")
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, revision=revision,
                                                          trust_remote_code=trust_remote_code).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
        self.enable_lora, self.max_lora_rank, self.max_model_len = enable_lora, max_lora_rank, max_model_len
        self.loras: dict[int, Any] = {}

    def _with_lora(self, request: Any) -> Any:
        from peft import PeftModel

        if not self.enable_lora:
            raise ValueError("LoRA is not enabled! Set enable_lora=True")
        config = json.loads((Path(request.lora_path) / "adapter_config.json").read_text())
        if int(config["r"]) > self.max_lora_rank:
            raise ValueError(f"LoRA rank {config['r']} is greater than max_lora_rank {self.max_lora_rank}")
        if request.lora_int_id not in self.loras:
            self.loras[request.lora_int_id] = PeftModel.from_pretrained(self.model, request.lora_path).eval()
        return self.loras[request.lora_int_id]

    def generate(self, prompts: list[dict[str, list[int]]], sampling_params: SamplingParams,
                 lora_request: Any = None) -> list[RequestOutput]:
        import torch

        if sampling_params.temperature != 0.0:
            raise NotImplementedError("this double answers greedily only")
        model = self._with_lora(lora_request) if lora_request is not None else self.model
        eos = [*sampling_params.stop_token_ids, *([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])]
        results = []
        for prompt in prompts:
            ids = list(prompt["prompt_token_ids"])
            if self.max_model_len is not None and len(ids) + sampling_params.max_tokens > self.max_model_len:
                raise ValueError(f"the prompt's {len(ids)} tokens and {sampling_params.max_tokens} new ones exceed "
                                 f"max_model_len {self.max_model_len}")
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=sampling_params.max_tokens, do_sample=False,
                                     eos_token_id=eos or None, pad_token_id=eos[0] if eos else 0)
            new = out[0, len(ids):].tolist()
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            results.append(RequestOutput(prompt_token_ids=ids, outputs=[CompletionOutput(0, text, new)]))
        return results
