"""Simple preference optimization (SimPO): from pairs of a chosen and a rejected answer to one prompt, with trl's
CPOTrainer (trl.experimental.cpo) and its simpo loss.

Reference-free: each answer's reward is its average log-probability per token, scaled by `beta`
(TrainParams.beta; SimPO's paper uses 2 to 2.5), and the loss asks the chosen answer's reward to beat the rejected
one's by a target margin (TrainParams.simpo_gamma). No reference model and no supervised term (CPO's alpha is 0):
nothing is forwarded twice, and answers are not favoured for their length.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.contract.spec import TrainParams, TrainSpec
from workers.training.engine import Plan
from workers.training.objectives.base import trainer_inputs
from workers.training.objectives.orpo import paired_trainer
from workers.training.trainargs import one_gpu_per_process, training_arguments

if TYPE_CHECKING:
    from workers.training.modelshape import ModelShape


class SimplePreference:
    name: str = "simpo"
    label: str = "Simple preference optimization (reference-free)"
    row_formats: tuple[str, ...] = ("preference",)

    def config(self, spec: TrainSpec, plan: Plan, output_dir: Path, has_eval: bool) -> Any:
        from trl.experimental.cpo import CPOConfig

        hp = spec.train
        shared = training_arguments(spec, plan, output_dir, has_eval)
        shared.pop("activation_offloading")  # not a CPOConfig field: the trainer applies it (paired_trainer)
        config = CPOConfig(max_length=hp.max_seq_length, beta=hp.beta, loss_type="simpo", cpo_alpha=0.0,
                           simpo_gamma=hp.simpo_gamma, **shared)
        return one_gpu_per_process(config, hp)

    def trainer(
        self, spec: TrainSpec, plan: Plan, model: Any, tokenizer: Any, train_dataset: Any, eval_dataset: Any,
        callbacks: list[Any], args: Any,
    ) -> Any:
        from trl.experimental.cpo import CPOTrainer

        trainer = CPOTrainer(**trainer_inputs(spec, model, tokenizer, train_dataset, eval_dataset, callbacks, args))
        return paired_trainer(trainer, plan)

    def memory_terms(self, parts: Mapping[str, int], shape: ModelShape, train: TrainParams,
                     dtype_bytes: int) -> dict[str, int]:
        """Each row is two sequences (the chosen and the rejected answer, both with gradients), so the per-row parts
        double; no reference forward."""
        return {"activations": parts.get("activations", 0), "logits": parts.get("logits", 0)}
