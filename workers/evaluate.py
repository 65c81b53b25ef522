"""Held-out scoring: mean loss of the completion tokens given the prompt, through the chat template."""

from __future__ import annotations

from typing import Any


def completion_loss(model: Any, tokenizer: Any, rows: list[dict[str, str]]) -> float:
    """Mean cross-entropy over the answer tokens of instruction/output rows (prompt tokens masked)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt = [{"role": "user", "content": row["instruction"]}]
            prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            full_ids = tokenizer.apply_chat_template(
                [*prompt, {"role": "assistant", "content": row["output"]}], tokenize=True
            )
            if hasattr(prompt_ids, "input_ids"):  # BatchEncoding in newer transformers
                prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
            ids = torch.tensor([full_ids], device=model.device)
            labels = ids.clone()
            labels[0, : len(prompt_ids)] = -100
            out = model(input_ids=ids, labels=labels)
            answer_tokens = int((labels != -100).sum()) - 1  # labels are shifted inside the model
            total += float(out.loss) * answer_tokens
            count += answer_tokens
    return total / max(count, 1)
