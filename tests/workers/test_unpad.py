"""Padding-free preference batches (workers/training/unpad.py): the same numbers as the padded forward, fewer tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from workers.contract.spec import DatasetRef, LoraParams, ModelRef, TrainSpec, suggest_train_params
from workers.training.demo import preference_rows


def _fused_peft_model(tiny_model_dir: Path) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
    return peft_model.eval()


def test_an_unpadded_forward_scores_every_token_as_the_padded_one(tiny_model_dir: Path) -> None:
    import torch

    from workers.training.unpad import unpad_forward

    model = _fused_peft_model(tiny_model_dir)
    lengths = [11, 3, 7, 1, 11]
    torch.manual_seed(1)
    input_ids = torch.randint(3, 200, (len(lengths), max(lengths)))
    attention_mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    completion = attention_mask.clone()
    completion[:, :2] = 0  # a two-token prompt
    labels = input_ids.masked_fill(completion == 0, -100)
    batch = {"input_ids": input_ids.masked_fill(attention_mask == 0, 0), "attention_mask": attention_mask}

    with torch.no_grad():
        padded = model(**batch, labels=labels, fused_lm_head=True)
        unpadder = unpad_forward(model)
        unpadded = model(**batch, labels=labels, fused_lm_head=True)
        generated = model(**batch)  # no fused head: a plain call is left alone

    assert unpadded.log_probs.shape == padded.log_probs.shape == (5, 10)
    assert padded.log_probs.abs().sum() > 0
    torch.testing.assert_close(unpadded.log_probs, padded.log_probs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unpadded.entropy, padded.entropy, rtol=1e-4, atol=1e-5)
    assert torch.equal(unpadded.label_mask, padded.label_mask)
    assert (unpadder.real_tokens, unpadder.padded_tokens) == (sum(lengths), 5 * 11)
    assert generated.logits.shape == (5, 11, model.config.vocab_size)


def _dpo_trainer(tiny_model_dir: Path, tmp_path: Path, batching: str) -> Any:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.training.engine import resolve_plan
    from workers.training.objectives import objective_for
    from workers.training.train import make_trainer

    train = suggest_train_params(100_000)
    train.objective, train.batching, train.batch_size = "dpo", batching, 8
    spec = TrainSpec(
        run_id=1, attempt=1, base_model=ModelRef(source=str(tiny_model_dir)),
        dataset=DatasetRef(uri="store://datasets/pairs.jsonl", format="preference"),
        lora=LoraParams(dropout=0.0, init="gaussian"), train=train, output_uri="store://runs/1/attempt-1/adapter",
    )
    import torch

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    plan = resolve_plan(train, spec.lora, device="cpu", dtype="float32", num_layers=model.config.num_hidden_layers)
    assert plan.batching == batching
    args = objective_for("dpo").config(spec, plan, tmp_path / batching, has_eval=False)
    return make_trainer(spec, plan, model, tokenizer, Dataset.from_list(preference_rows(8, seed=3)), None, [], args)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_padding_free_dpo_computes_the_padded_loss_and_metrics(tiny_model_dir: Path, tmp_path: Path, loss: str) -> None:
    import torch

    trainers = {b: _dpo_trainer(tiny_model_dir, tmp_path, b) for b in ("pad", "padding_free")}
    assert trainers["padding_free"].model._forward_pre_hooks and not trainers["pad"].model._forward_pre_hooks
    results = {}
    for batching, trainer in trainers.items():
        trainer.loss_types = [loss]
        batch = next(iter(trainer.get_train_dataloader()))
        assert batch["attention_mask"].sum() < batch["attention_mask"].numel()  # the pairs' lengths differ
        trainer.model.train()
        value = trainer.compute_loss(trainer.model, batch)
        value.backward()
        grads = [p.grad.detach().clone() for p in trainer.model.parameters() if p.grad is not None]
        results[batching] = (value.detach(), dict(trainer._metrics["train"]), grads)

    (pad_loss, pad_metrics, pad_grads), (free_loss, free_metrics, free_grads) = results["pad"], results["padding_free"]
    torch.testing.assert_close(free_loss, pad_loss, rtol=1e-4, atol=1e-5)
    for name in ("logps/chosen", "logps/rejected", "rewards/margins", "entropy"):
        assert free_metrics[name] == pytest.approx(pad_metrics[name], rel=1e-4, abs=1e-5), name
    assert pad_grads and len(free_grads) == len(pad_grads)
    for free, pad in zip(free_grads, pad_grads, strict=True):
        torch.testing.assert_close(free, pad, rtol=1e-3, atol=1e-5)
