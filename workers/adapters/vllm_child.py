"""vLLM's side of a vLLM export's check, in a process of its own (workers.adapters.vllm_check starts it).

    python -m workers.adapters.vllm_child REQUEST.json ANSWERS.json

REQUEST holds the model, vLLM's engine options, the LoRA module (name and folder) or null, the prompts' token ids,
max_tokens and stop_token_ids. ANSWERS gets each prompt's generated token ids (greedy). A process of its own: vLLM
asks for most of the GPU's memory at its start and checks that it is free, which the job's process, that loaded
Tunedeck's model first, cannot promise; and its exit gives everything back. Nothing but vLLM is imported here.
On failure the last line on stderr says what failed, and the exit status is 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def answer(request: dict[str, Any]) -> list[list[int]]:
    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except Exception as exc:  # a broken install raises what its own imports raise
        raise SystemExit(f"vLLM could not be imported on this worker: {type(exc).__name__}: {exc}") from None
    lora = request["lora"]
    what = "the merged folder" if lora is None else "the base"
    try:
        llm = LLM(model=request["model"], **request["options"])
    except Exception as exc:  # vLLM raises many kinds for a folder it cannot load: that is what the check is for
        raise SystemExit(f"vLLM could not load {what}: {type(exc).__name__}: {exc}") from None
    sampling = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"],
                              stop_token_ids=request["stop_token_ids"])
    lora_request = LoRARequest(lora["name"], 1, lora["path"]) if lora is not None else None
    try:
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in request["prompts"]], sampling,
                               lora_request=lora_request)
    except Exception as exc:
        with_what = "the adapter" if lora is not None else "the merged model"
        raise SystemExit(f"vLLM could not generate with {with_what}: {type(exc).__name__}: {exc}") from None
    return [[int(token) for token in output.outputs[0].token_ids] for output in outputs]


def main(argv: list[str]) -> None:
    request_path, answers_path = (Path(arg) for arg in argv)
    answers = answer(json.loads(request_path.read_text()))
    answers_path.write_text(json.dumps(answers))


if __name__ == "__main__":
    main(sys.argv[1:])
