"""Supervised fine-tuning: the loss of the rows' text (or of their completions alone), with trl's SFTTrainer."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.contract.spec import EXAMPLE_FORMATS, TrainParams, TrainSpec
from workers.training.engine import Plan, padding_free_collator
from workers.training.objectives.base import trainer_inputs
from workers.training.trainargs import one_gpu_per_process, training_arguments

if TYPE_CHECKING:
    from workers.training.modelshape import ModelShape


class SupervisedFineTuning:
    name: str = "sft"
    label: str = "Supervised fine-tuning"
    row_formats: tuple[str, ...] = EXAMPLE_FORMATS  # plain text, prompt/completion and every chat format: not pairs

    def config(self, spec: TrainSpec, plan: Plan, output_dir: Path, has_eval: bool) -> Any:
        from trl import SFTConfig

        hp = spec.train
        config = SFTConfig(
            max_length=hp.max_seq_length,
            completion_only_loss=hp.completion_only_loss,
            **training_arguments(spec, plan, output_dir, has_eval),
        )
        return one_gpu_per_process(config, hp)

    def trainer(
        self, spec: TrainSpec, plan: Plan, model: Any, tokenizer: Any, train_dataset: Any, eval_dataset: Any,
        callbacks: list[Any], args: Any,
    ) -> Any:
        from trl import SFTTrainer

        trainer = SFTTrainer(**trainer_inputs(spec, model, tokenizer, train_dataset, eval_dataset, callbacks, args))
        if plan.batching == "padding_free":
            trainer.data_collator = padding_free_collator(tokenizer)
        return trainer

    def memory_terms(self, parts: Mapping[str, int], shape: ModelShape, train: TrainParams,
                     dtype_bytes: int) -> dict[str, int]:
        return {}  # the estimate models this objective: one pass over each row, no reference model
