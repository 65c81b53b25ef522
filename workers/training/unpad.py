"""Padding-free forward passes for trainers that pad (trl's DPOTrainer): drop the padding before the model, put the
per-token results back where the trainer expects them after.

trl's preference trainers batch each micro-batch as rows padded to the longest (the chosen and the rejected answer of
every pair, 2 x rows), and score them with trl's fused LM head (`model(..., labels=..., fused_lm_head=True)` returns
per-token log-probabilities, not logits). With lengths spread the way real answers are, most of such a batch is
padding. `unpad_forward(model)` hooks the model so that each such call runs the real tokens alone, as one row with
per-sequence positions and cumulative lengths (what varlen FlashAttention, and transformers' packed-sequence masks,
read to keep the sequences apart), then scatters the per-token outputs back into the padded layout. The trainer's
loss, metrics and reference pass read exactly what they read from a padded forward.
"""

from __future__ import annotations

from typing import Any

# FusedCausalLMOutput's per-token fields, (rows, length - 1) each: the positions that predict the next token.
PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


class Unpadder:
    """The forward pre-hook and hook of one model: the pre-hook flattens a padded call and remembers where each
    token came from; the hook puts the per-token outputs of that call back."""

    def __init__(self) -> None:
        self.layout: tuple[Any, Any] | None = None  # (source index of each padded prediction, which are real)
        self.real_tokens = 0  # tokens the model ran (a padded batch's real ones), over the hooked model's life
        self.padded_tokens = 0  # tokens a padded forward would have run

    def before(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        import torch

        self.layout = None
        mask = kwargs.get("attention_mask")
        if args or not kwargs.get("fused_lm_head") or mask is None or kwargs.get("labels") is None:
            return None  # not a padded scoring call (generation, a plain forward): untouched
        mask = mask.bool()
        rows, length = mask.shape
        lengths = mask.sum(dim=1)
        if not bool((mask == (torch.arange(length, device=mask.device) < lengths[:, None])).all()):
            return None  # left padding or holes: not the right-padded layout this undoes
        cu_seq = torch.zeros(rows + 1, dtype=torch.int32, device=mask.device)
        cu_seq[1:] = lengths.cumsum(dim=0)
        total = int(cu_seq[-1])
        labels = kwargs["labels"][mask].clone()
        labels[cu_seq[:-1][lengths > 0].long()] = -100  # a row's first token is no prediction of the previous row's
        max_len = int(lengths.max())
        kwargs.update(
            input_ids=kwargs["input_ids"][mask][None],
            labels=labels[None],
            position_ids=(mask.cumsum(dim=1) - 1)[mask][None],
            cu_seq_lens_q=cu_seq, cu_seq_lens_k=cu_seq, max_length_q=max_len, max_length_k=max_len,
        )
        del kwargs["attention_mask"]
        source = torch.full((rows, length), -1, dtype=torch.long, device=mask.device)
        source[mask] = torch.arange(total, device=mask.device)
        # the padded prediction at (row, j) scores token j + 1 of the row; unpadded, that prediction sits just before it
        self.layout = (source[:, 1:] - 1, mask[:, 1:])
        self.real_tokens += total
        self.padded_tokens += rows * length
        return args, kwargs

    def after(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if self.layout is None:
            return None
        source, real = self.layout
        self.layout = None
        for name in PER_TOKEN_FIELDS:
            flat = getattr(output, name, None)
            if flat is not None:
                padded = flat.new_zeros(real.shape)
                padded[real] = flat[0, source[real]]
                setattr(output, name, padded)
        return output


def unpad_forward(model: Any) -> Unpadder:
    """Hook `model` (the module the trainer calls: the PEFT model) so that its padded fused-head calls run unpadded.
    Returns the hooks' state (it counts the tokens saved)."""
    unpadder = Unpadder()
    model.register_forward_pre_hook(unpadder.before, with_kwargs=True)
    model.register_forward_hook(unpadder.after, with_kwargs=True)
    return unpadder
