"""Odds ratio preference optimization: from pairs of a chosen and a rejected answer to one prompt, with trl's
ORPOTrainer (trl.experimental.orpo).

The loss is the chosen answer's negative log-likelihood (as supervised fine-tuning's) plus a penalty on the odds of
the rejected answer against the chosen one's, weighted by `beta` (TrainParams.beta: ORPO's lambda). No reference
model: the adapter is never compared with the base, so nothing is forwarded twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.contract.spec import TrainParams, TrainSpec
from workers.training.engine import Plan
from workers.training.objectives.base import trainer_inputs
from workers.training.trainargs import one_gpu_per_process, training_arguments

if TYPE_CHECKING:
    from workers.training.modelshape import ModelShape


class OddsRatioPreference:
    name: str = "orpo"
    label: str = "Odds ratio preference optimization"
    row_formats: tuple[str, ...] = ("preference",)

    def config(self, spec: TrainSpec, plan: Plan, output_dir: Path, has_eval: bool) -> Any:
        from trl.experimental.orpo import ORPOConfig

        hp = spec.train
        shared = training_arguments(spec, plan, output_dir, has_eval)
        shared.pop("activation_offloading")  # not an ORPOConfig field: the trainer applies it (offloaded)
        config = ORPOConfig(max_length=hp.max_seq_length, beta=hp.beta, **shared)
        return one_gpu_per_process(config, hp)

    def trainer(
        self, spec: TrainSpec, plan: Plan, model: Any, tokenizer: Any, train_dataset: Any, eval_dataset: Any,
        callbacks: list[Any], args: Any,
    ) -> Any:
        from trl.experimental.orpo import ORPOTrainer

        trainer = ORPOTrainer(**trainer_inputs(spec, model, tokenizer, train_dataset, eval_dataset, callbacks, args))
        return paired_trainer(trainer, plan)

    def memory_terms(self, parts: Mapping[str, int], shape: ModelShape, train: TrainParams,
                     dtype_bytes: int) -> dict[str, int]:
        """Each row is two sequences (the chosen and the rejected answer, one batch of twice the rows, both with
        gradients), so the per-row parts double; no reference forward."""
        return {"activations": parts.get("activations", 0), "logits": parts.get("logits", 0)}


def paired_trainer(trainer: Any, plan: Plan) -> Any:
    """trl's ORPO or CPO trainer made to run as the runner expects: a pair whose prompt fills max_length (kept by
    those trainers with an empty answer, a loss of 0/0) dropped, as trl's DPO and KTO trainers do, so the runner
    names it; activations offloaded where the plan says (neither trainer has the setting)."""
    trainer.train_dataset = trainer.train_dataset.filter(both_answers_kept)
    if trainer.eval_dataset is not None:
        trainer.eval_dataset = trainer.eval_dataset.filter(both_answers_kept)
    if plan.activation_offload:
        offloaded(trainer)
    return trainer


def both_answers_kept(row: dict[str, Any]) -> bool:
    """Whether truncation to max_length left both answers of a pair prepared by trl's ORPO or CPO trainer a token
    to learn from."""
    return any(t != -100 for t in row["chosen_labels"]) and any(t != -100 for t in row["rejected_labels"])


def offloaded(trainer: Any) -> None:
    """Run the trainer's steps with activations offloaded to the CPU, as trl's other trainers do with
    activation_offloading (ORPOTrainer has no such setting)."""
    from workers.training import engine
    from workers.training.offload import install

    if engine.PREFETCH_OFFLOAD:
        install(trainer)
    else:
        from trl.models import get_act_offloading_ctx_manager

        install(trainer, get_act_offloading_ctx_manager(model=trainer.model))
