"""The score_model grader: a language model as judge. Its `input` messages (templates over the row and the
completion) go through the judge's chat template; it answers greedily, and the first number of its answer,
within `range`, is the score normalised into [0, 1]. An answer without a number, or with one outside the
range, scores 0 and is reported in `errors`.

The judge is a base model (a local folder or a Hub id, safetensors only) with an optional PEFT adapter folder,
loaded on first use and kept for the grader's life; completions are judged in batches of `batch_size`.
"""

from __future__ import annotations

import math
import re
from typing import Any

from workers.contract.hubids import repo_id_problem
from workers.data.bounds import json_type
from workers.data.prompts import FALLBACK_CHAT_TEMPLATE, chat_ids
from workers.grading.base import BaseGrader
from workers.grading.checks import Checker
from workers.grading.templates import render, template_problem

ROLES = ("system", "user", "assistant")
FIRST_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
DEFAULT_RANGE = (0.0, 1.0)
DEFAULT_MAX_NEW_TOKENS = 16
DEFAULT_BATCH_SIZE = 8
ANSWER_SHOWN = 80  # characters of an unreadable judgement kept in `errors`


def is_local_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~"))


def judgement(text: str, low: float, high: float) -> float | None:
    """The judge's answer normalised into [0, 1] by `range`; None when its first number is missing or outside."""
    found = FIRST_NUMBER.search(text)
    if found is None:
        return None
    value = float(found.group(0))
    if not low <= value <= high:
        return None
    return (value - low) / (high - low)


class ScoreModel(BaseGrader):
    kind = "score_model"

    def __init__(
        self,
        name: str,
        model: str,
        adapter: str | None,
        messages: list[dict[str, str]],
        score_range: tuple[float, float],
        max_new_tokens: int,
        batch_size: int,
    ):
        super().__init__(name)
        self.model_source, self.adapter = model, adapter
        self.messages, self.range = messages, score_range
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.loaded: tuple[Any, Any] | None = None  # (model, tokenizer), on first use

    @staticmethod
    def check(c: Checker) -> None:
        c.known("model", "adapter", "input", "range", "max_new_tokens", "batch_size")
        model = c.text("model")
        if model is not None and not is_local_path(model) and (problem := repo_id_problem(model)):
            c.error("model", f"neither a local folder (an absolute path) nor a Hub id: {problem}")
        if "adapter" in c.definition:
            c.text("adapter")
        _check_messages(c)
        _check_range(c)
        for key, limit in (("max_new_tokens", 512), ("batch_size", 256)):
            value = c.number(key, minimum=1, maximum=limit)
            if value is not None and not value.is_integer():
                c.error(key, "must be a whole number")

    @classmethod
    def from_definition(cls, name: str, definition: dict[str, Any]) -> ScoreModel:
        low, high = definition.get("range", DEFAULT_RANGE)
        return cls(
            name,
            definition["model"],
            definition.get("adapter"),
            definition["input"],
            (float(low), float(high)),
            int(definition.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
            int(definition.get("batch_size", DEFAULT_BATCH_SIZE)),
        )

    @staticmethod
    def describe(definition: dict[str, Any]) -> str:
        low, high = definition.get("range", DEFAULT_RANGE)
        adapter = f" + {definition['adapter']}" if definition.get("adapter") else ""
        return f"{definition['model']}{adapter} judges on a {low:g}–{high:g} scale"

    def prompt(self, completion: str, item: dict) -> list[dict[str, str]]:
        """The judge's conversation for one completion: the input messages with their templates filled."""
        return [{"role": m["role"], "content": render(m["content"], completion, item)} for m in self.messages]

    def score_batch(self, completions: list[str], items: list[dict]) -> list[float]:
        self.errors = []
        conversations = [self.prompt(c, item) for c, item in zip(completions, items, strict=True)]
        answers = [
            answer
            for start in range(0, len(conversations), self.batch_size)
            for answer in self.generate(conversations[start : start + self.batch_size])
        ]
        return [self.read(index, answer) for index, answer in enumerate(answers)]

    def read(self, index: int, answer: str) -> float:
        """One answer's score; 0, with the answer kept in `errors`, when it holds no number within range."""
        score = judgement(answer, *self.range)
        if score is None:
            low, high = self.range
            self.note(
                f"completion {index + 1}: the judge gave no number in {low:g}–{high:g}: {answer[:ANSWER_SHOWN]!r}"
            )
            return 0.0
        return score

    def generate(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        """The judge's greedy answers to one batch, through the generation engine of compare and evaluate jobs
        (workers.generation.engine: the decode loop, answers ending at EOS or the template's turn end)."""
        from workers.contract.jobspecs import BASE_KEY, GenerationParams
        from workers.generation.engine import generate_token_grid
        from workers.generation.stops import stop_tokens

        model, tokenizer = self.load()
        stops = stop_tokens(tokenizer, model)
        ids = generate_token_grid(
            model, [chat_ids(tokenizer, turns, add_generation_prompt=True) for turns in conversations], [BASE_KEY],
            GenerationParams(max_new_tokens=self.max_new_tokens), pad_token_id=tokenizer.pad_token_id, stops=stops,
            batch_size=max(1, len(conversations)),
        )  # fmt: skip
        return [stops.text(ids[(row, BASE_KEY)]) for row in range(len(conversations))]

    def load(self) -> tuple[Any, Any]:
        """The judge and its tokenizer, loaded once: on the GPU in bf16 where there is one, else on the CPU."""
        if self.loaded is not None:
            return self.loaded
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_source)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if not tokenizer.chat_template:
            tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        cuda = torch.cuda.is_available()
        model: Any = AutoModelForCausalLM.from_pretrained(
            self.model_source, dtype=torch.bfloat16 if cuda else torch.float32, use_safetensors=True
        )
        if self.adapter:
            from peft import PeftModel

            # Merged: the judge only answers, and a plain model generates faster than one with LoRA side paths.
            model = PeftModel.from_pretrained(model, self.adapter, autocast_adapter_dtype=False).merge_and_unload()
        model = model.to("cuda" if cuda else "cpu").eval()
        self.loaded = (model, tokenizer)
        return self.loaded


def _check_messages(c: Checker) -> None:
    messages = c.definition.get("input")
    if not isinstance(messages, list) or not messages:
        c.error("input", 'must be a non-empty list of messages ({"role": …, "content": …})')
        return
    for index, message in enumerate(messages):
        where = f"input[{index}]"
        if not isinstance(message, dict):
            c.error(where, f"must be an object with role and content, got {json_type(message)}")
            continue
        if message.get("role") not in ROLES:
            c.error(f"{where}.role", f"must be one of {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            c.error(f"{where}.content", "must be a non-empty string")
        elif problem := template_problem(content, c.fields):
            c.error(f"{where}.content", problem)
        for key in message:
            if key not in ("role", "content"):
                c.error(f"{where}.{key}", "unknown field (a message takes role, content)")


def _check_range(c: Checker) -> None:
    bounds = c.definition.get("range", list(DEFAULT_RANGE))
    numbers = isinstance(bounds, list) and len(bounds) == 2
    if not numbers or any(
        isinstance(b, bool) or not isinstance(b, int | float) or not math.isfinite(b) for b in bounds
    ):
        c.error("range", "must be [min, max], two numbers")
    elif not bounds[0] < bounds[1]:
        c.error("range", "min must be below max")
