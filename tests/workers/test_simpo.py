"""SimPO through the train runner on a tiny random Llama, and DPO's label-smoothed losses.

The toy preference (workers.training.demo.preference_rows): to "What is a + b?", the chosen answer is written with
even digits only, the rejected one with odd digits only. SimPO learns it with no reference model, measured on
held-out pairs it never trained on.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.workers.test_dpo import dpo_spec, learned_preference, preference_spec, write_rows
from tests.workers.test_objectives import SHAPE
from workers.contract.reporter import MemoryReporter
from workers.contract.spec import TrainParams, TrainSpec
from workers.contract.store import ArtifactStore
from workers.training.demo import preference_rows


def simpo_spec(model_dir: Path) -> TrainSpec:
    spec = preference_spec(model_dir, "simpo")
    spec.train.beta, spec.train.simpo_gamma, spec.train.eval_fraction = 2.0, 0.5, 0.0
    return spec


def test_simpo_makes_the_adapter_prefer_the_chosen_answers_of_held_out_pairs(tiny_model_dir: Path,
                                                                            tmp_path: Path) -> None:
    reporter, _ = learned_preference(tiny_model_dir, tmp_path, simpo_spec(tiny_model_dir), preference_rows(128, seed=0))

    losses = [m["loss"] for m in reporter.metrics if "loss" in m]
    assert losses and losses[-1] < losses[0]


def test_the_simpo_objective_builds_trls_cpo_trainer_with_the_simpo_loss_and_no_reference(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.cpo import CPOTrainer

    from workers.training.engine import resolve_plan
    from workers.training.objectives import objective_for
    from workers.training.train import make_trainer

    spec = simpo_spec(tiny_model_dir)
    simpo = objective_for("simpo")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plan = resolve_plan(spec.train, spec.lora, device="cpu", dtype="float32", num_layers=2)
    args = simpo.config(spec, plan, tmp_path / "trainer", has_eval=False)
    trainer = make_trainer(spec, plan, model, AutoTokenizer.from_pretrained(tiny_model_dir),
                           Dataset.from_list(preference_rows(8, seed=1)), None, [], args)

    assert isinstance(trainer, CPOTrainer)
    assert (args.loss_type, args.cpo_alpha, args.simpo_gamma, args.beta) == ("simpo", 0.0, 0.5, 2.0)
    assert simpo.row_formats == ("preference",)
    terms = simpo.memory_terms({"weights": 100, "activations": 10, "logits": 4}, SHAPE, TrainParams(), 2)
    assert terms == {"activations": 10, "logits": 4}  # the second answer, no reference


def test_label_smoothing_and_simpo_gamma_are_validated_on_their_fields() -> None:
    assert TrainParams(objective="dpo", dpo_loss="robust", label_smoothing=0.1).validate() == {}
    assert TrainParams(objective="simpo", beta=2.0, simpo_gamma=0.0).validate() == {}
    errors = TrainParams(objective="dpo", dpo_loss="exo_pair").validate()
    assert errors == {"label_smoothing": "must be above 0 for the exo_pair loss (its log of the flipped share)"}
    errors = TrainParams(objective="dpo", dpo_loss="robust", label_smoothing=0.5, simpo_gamma=-1).validate()
    assert errors == {"label_smoothing": "must be in [0, 0.5)", "simpo_gamma": "must be 0 or more"}


@pytest.mark.parametrize("loss", ["robust", "exo_pair"])
def test_dpos_label_smoothed_losses_train_on_pairs(tiny_model_dir: Path, tmp_path: Path, loss: str) -> None:
    from workers.training.train import run_training

    store = ArtifactStore(tmp_path / "store")
    write_rows(store.path("store://datasets/pairs.jsonl"), preference_rows(32, seed=0))
    spec = dpo_spec(tiny_model_dir)
    spec.train.dpo_loss, spec.train.label_smoothing, spec.train.max_steps = loss, 0.1, 4
    spec.train.eval_fraction, spec.train.logging_steps = 0.0, 1
    reporter = MemoryReporter()

    result = run_training(spec, reporter, store)

    assert result is not None, reporter.states[-1]
    losses = [m["loss"] for m in reporter.metrics if "loss" in m]
    assert losses and all(math.isfinite(x) for x in losses)
    # At the first step the adapter is the reference: the smoothed loss of a zero margin, not the plain log 2.
    first = losses[0]
    expected = {"robust": math.log(2), "exo_pair": 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)}[loss]
    assert first == pytest.approx(expected, abs=1e-3), (loss, first)
