"""Kahneman-Tversky optimization: from single answers labelled desirable or not (the feedback format), with trl's
KTOTrainer.

The loss raises the desirable answers' log-probability and lowers the undesirable ones', each measured against a
reference (the same base with the adapter switched off, `ref_model=None` with a PEFT adapter: no second copy of the
base is loaded) and against a KL estimate taken from mismatched answers: each prompt paired with the answer of the
row before it in the micro-batch. `beta` (TrainParams.beta) bounds how far the adapter moves from the reference;
TrainParams.desirable_weight and undesirable_weight weigh the two classes, e.g. to balance a skew.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from workers.contract.spec import TrainSpec
from workers.training.engine import Plan
from workers.training.objectives.base import trainer_inputs
from workers.training.trainargs import one_gpu_per_process, training_arguments


class KahnemanTversky:
    name: str = "kto"
    label: str = "Kahneman-Tversky optimization"
    row_formats: tuple[str, ...] = ("feedback",)

    def config(self, spec: TrainSpec, plan: Plan, output_dir: Path, has_eval: bool) -> Any:
        from trl import KTOConfig

        hp = spec.train
        config = KTOConfig(
            max_length=hp.max_seq_length,  # prompt and answer together, cut at the end like SFT's rows
            beta=hp.beta,
            desirable_weight=hp.desirable_weight,
            undesirable_weight=hp.undesirable_weight,
            **training_arguments(spec, plan, output_dir, has_eval),
        )
        return one_gpu_per_process(config, hp)

    def trainer(
        self, spec: TrainSpec, plan: Plan, model: Any, tokenizer: Any, train_dataset: Any, eval_dataset: Any,
        callbacks: list[Any], args: Any,
    ) -> Any:
        from trl import KTOTrainer

        # KTOTrainer reads the rows in order (its KL term pairs each row with its neighbour's answer), so they are
        # shuffled once, with the run's seed: a file sorted by label would otherwise train one class at a time.
        rows = train_dataset.shuffle(seed=spec.train.seed).flatten_indices()
        return KTOTrainer(
            ref_model=None,  # the reference is the policy with its adapter disabled, never a second base
            **trainer_inputs(spec, model, tokenizer, rows, eval_dataset, callbacks, args),
        )

    def memory_terms(self, parts: Mapping[str, int]) -> dict[str, int]:
        """KTO runs four forwards per row, one with gradients: the policy over the prompt and its own answer, what a
        supervised pass costs. Without gradients (no activations kept): the policy over the KL batch (each prompt
        with another row's answer, about as long) and the reference over both sequences. Counted: the logits of
        those three passes, each about one supervised pass's (trl computes log-probabilities through a chunked
        fused head, so this bounds them from above); no more activations."""
        return {"logits": 3 * parts.get("logits", 0)}
