"""What a training objective is to the train runner: the rows it trains on, its trl config and trainer, its memory.

The runner loads the data, the model and the plan the same way for every objective; the objective decides what
the trainer optimizes. An objective holds no state: one instance serves every run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from workers.training.peftsetup import build_peft_config

if TYPE_CHECKING:
    from workers.contract.spec import TrainSpec
    from workers.training.engine import Plan


class Objective(Protocol):
    name: str  # the value of TrainParams.objective
    label: str  # how people read it
    row_formats: tuple[str, ...]  # the dataset formats (workers.contract.spec.DATASET_FORMATS) it trains on

    def config(self, spec: TrainSpec, plan: Plan, output_dir: Path, has_eval: bool) -> Any:
        """The trl config (a TrainingArguments) of this run."""
        ...

    def trainer(
        self, spec: TrainSpec, plan: Plan, model: Any, tokenizer: Any, train_dataset: Any, eval_dataset: Any,
        callbacks: list[Any], args: Any,
    ) -> Any:
        """The trl trainer that carries out the plan with `args` (from `config`)."""
        ...

    def memory_terms(self, parts: Mapping[str, int]) -> dict[str, int]:
        """GPU bytes this objective adds to the estimate of one supervised pass (workers.training.estimate), by
        estimate part, given that estimate's parts: a second sequence per row, a reference model's logits. Empty
        when it adds nothing."""
        ...


def trainer_inputs(spec: TrainSpec, model: Any, tokenizer: Any, train_dataset: Any, eval_dataset: Any,
                   callbacks: list[Any], args: Any) -> dict[str, Any]:
    """What every trl trainer of an objective is given: the model with the run's PEFT adapter config, its args,
    data, tokenizer and the runner's callbacks.

    A warm start's model comes already wrapped with its parent adapter (peftsetup.load_parent_adapter), so it gets
    no new adapter config. Given such a model and no reference model, trl's trainers with a reference (DPO, KTO,
    GRPO) copy its adapter, frozen, as a second adapter "ref" and take the reference from it: the reference is the
    parent as it was when the run started, never the bare base, and no second base is loaded. A new adapter's
    reference is the base with the adapter switched off, which is also where a new adapter starts."""
    from peft import PeftModel

    peft_config = None if isinstance(model, PeftModel) else build_peft_config(spec.lora, model)
    return {"model": model, "args": args, "train_dataset": train_dataset, "eval_dataset": eval_dataset,
            "processing_class": tokenizer, "peft_config": peft_config, "callbacks": callbacks}
