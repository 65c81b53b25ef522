"""A row's prompt, one way for every job: the whole conversation before the answer, or a typed prompt.

Comparisons and evaluations take a dataset row's prompt with `prompt_row`: every turn before its last assistant
turn, a system prompt and earlier exchanges included (what training conditioned that answer on), with that turn's
text as the reference; a plain prompt/completion row keeps its prompt text. `prompt_ids` gives the tokens a model
continues from: a conversation through the chat template, typed text as a user turn (or raw, template off).
"""

from __future__ import annotations

from typing import Any

from workers.contract.jobspecs import PromptRow

Turns = list[dict[str, str]]
# A tokenizer without a chat template gets this ChatML-style one, alike in training, previews and generation.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def prompt_row(row: dict[str, Any], number: int = 1) -> PromptRow:
    """The prompt and reference answer of a trl row (workers.data.datasets.to_trl_row), a preference pair's chosen
    answer its reference, a feedback row's answer only when it is labelled desirable (an undesirable one is no
    reference: none is given); ValueError for a row whose conversation has no turn before its answer."""
    if "prompt" in row and "chosen" in row:
        row = {"prompt": row["prompt"], "completion": row["chosen"]}
    if "prompt" not in row or "completion" not in row:
        raise ValueError(f"row {number} has no prompt before its answer (a chat must open with a user turn)")
    prompt, completion = row["prompt"], row["completion"]
    reference = completion if isinstance(completion, str) else completion[-1]["content"]
    if row.get("label") is False:
        reference = ""
    if isinstance(prompt, str):
        return PromptRow(prompt=prompt, reference=reference)
    turns = [{"role": str(t["role"]), "content": str(t["content"])} for t in prompt]
    return PromptRow(prompt=shown_prompt(turns), reference=reference, turns=turns)


def shown_prompt(turns: Turns) -> str:
    """A conversation as people read it: a lone user turn as its text, else every turn with its role."""
    if len(turns) == 1 and turns[0]["role"] == "user":
        return turns[0]["content"]
    return "\n".join(f"{turn['role']}: {turn['content']}" for turn in turns)


def prompt_ids(tokenizer: Any, row: PromptRow, chat_template: bool) -> list[int]:
    """The token ids a model answers `row` from: with `chat_template`, its turns (or its text as a user turn)
    followed by the assistant's opening; without, its text as it is."""
    if not chat_template:
        return list(tokenizer(row.prompt)["input_ids"])
    return chat_ids(tokenizer, row.turns or [{"role": "user", "content": row.prompt}], add_generation_prompt=True)


def chat_ids(tokenizer: Any, turns: Turns, add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(turns, add_generation_prompt=add_generation_prompt, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
