"""Direct preference optimization: from pairs of a chosen and a rejected answer to one prompt, with trl's DPOTrainer.

The loss raises the chosen answer's log-probability over the rejected one's, each measured against a reference:
the policy as it started, from the same base (`ref_model=None` with a PEFT adapter), so no second copy of the base
is ever loaded. That is the base with the adapter switched off for a new adapter, and the parent adapter, frozen,
for a warm start (objectives.base.trainer_inputs). `beta` (TrainParams.beta) bounds how far the adapter moves from
that reference; TrainParams.dpo_loss picks trl's loss. With batching padding_free (auto on GPUs) the padded pairs
run as one row of their real tokens (workers/training/unpad.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.contract.spec import TrainParams, TrainSpec
from workers.training.engine import Plan
from workers.training.objectives.base import trainer_inputs
from workers.training.trainargs import one_gpu_per_process, training_arguments
from workers.training.unpad import unpad_forward

if TYPE_CHECKING:
    from workers.training.modelshape import ModelShape


class DirectPreference:
    name: str = "dpo"
    label: str = "Direct preference optimization"
    row_formats: tuple[str, ...] = ("preference",)

    def config(self, spec: TrainSpec, plan: Plan, output_dir: Path, has_eval: bool) -> Any:
        from trl import DPOConfig

        hp = spec.train
        config = DPOConfig(
            max_length=hp.max_seq_length,  # prompt and answer together, cut at the end like SFT's rows
            beta=hp.beta,
            loss_type=[hp.dpo_loss],
            label_smoothing=hp.label_smoothing,
            **training_arguments(spec, plan, output_dir, has_eval),
        )
        return one_gpu_per_process(config, hp)

    def trainer(
        self, spec: TrainSpec, plan: Plan, model: Any, tokenizer: Any, train_dataset: Any, eval_dataset: Any,
        callbacks: list[Any], args: Any,
    ) -> Any:
        from trl import DPOTrainer

        trainer = DPOTrainer(
            ref_model=None,  # the reference is the policy as it started (see the module docstring), never a second base
            **trainer_inputs(spec, model, tokenizer, train_dataset, eval_dataset, callbacks, args),
        )
        if plan.batching == "padding_free":
            unpad_forward(trainer.model)  # the padded pairs run as one row of real tokens
        return trainer

    def memory_terms(self, parts: Mapping[str, int], shape: ModelShape, train: TrainParams,
                     dtype_bytes: int) -> dict[str, int]:
        """Each row is two sequences (the chosen and the rejected answer, one batch of twice the rows), so the
        per-row parts double; then the reference forward, without gradients, adds its logits for both."""
        return {
            "activations": parts.get("activations", 0),
            "logits": 3 * parts.get("logits", 0),  # the pair's second sequence, and the reference's two
        }
