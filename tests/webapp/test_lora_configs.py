"""LoRA configs in the control plane: one JSON `params` column, its migration, presets, forms and the run cross-check."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.webapp.factories import demo_objects, make_run
from webapp.catalog.models import LoraConfig
from webapp.training.models import TrainingRun
from workers.contract.spec import LoraParams


@pytest.mark.django_db(transaction=True)
def test_the_migration_carries_the_old_columns_into_params() -> None:
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    latest = executor.loader.graph.leaf_nodes()  # every app: going back unapplies the apps that depend on catalog
    executor.migrate([("catalog", "0001_initial")])
    try:
        old = MigrationExecutor(connection).loader.project_state([("catalog", "0001_initial")]).apps
        old.get_model("catalog", "LoraConfig").objects.create(
            name="legacy", r=8, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"], bias="lora_only",
            quantization="4bit", quant_type="fp4", double_quant=False, compute_dtype="bfloat16",
        )
        executor = MigrationExecutor(connection)
        executor.migrate(latest)
    finally:
        MigrationExecutor(connection).migrate(latest)
    config = LoraConfig.objects.get(name="legacy")
    assert config.method == "lora"
    assert config.lora_params() == LoraParams(
        r=8, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"], bias="lora_only", quantization="4bit",
        quant_type="fp4", double_quant=False, compute_dtype="bfloat16",
    )


@pytest.mark.django_db
def test_params_are_stored_whole_and_a_typo_is_refused() -> None:
    config = LoraConfig.objects.create(name="ia3", params={"method": "ia3", "target_modules": ["attention+mlp"]})
    config.refresh_from_db()
    assert config.method == "ia3" and config.params == dataclasses.asdict(config.lora_params())
    assert config.params["r"] == 16  # defaults written out: the config keeps its meaning if they change
    config.params["method"] = "prompt_tuning"
    config.save(update_fields=["params"])
    assert LoraConfig.objects.get(pk=config.pk).method == "prompt_tuning"
    with pytest.raises(ValueError, match="unknown field"):
        LoraConfig.objects.create(name="typo", params={"rank": 8})


@pytest.mark.django_db
def test_demo_presets_fit_the_demo_model(tiny_model_dir: Path, store_dir: Path) -> None:
    from webapp.catalog.demo import LORA_PRESETS, ensure_demo_content
    from webapp.catalog.models import BaseModel
    from workers.training.modelinfo import check_adapter

    ensure_demo_content()
    base = BaseModel.objects.get()
    configs = {c.name: c for c in LoraConfig.objects.all()}
    assert set(configs) == set(LORA_PRESETS)
    assert configs["lora-attention-only"].lora_params().target_modules == ["attention"]
    assert configs["qlora-4bit-nf4"].lora_params().quantization == "4bit"
    for config in configs.values():
        assert check_adapter(config.lora_params(), base.linear_modules, base.model_type) == {}, config.name


@pytest.mark.django_db
def test_the_config_form_builds_params_from_fields_and_names_the_bad_one() -> None:
    from webapp.catalog.forms import LoraConfigForm

    fields = {
        name: value for name, value in dataclasses.asdict(LoraParams()).items() if not isinstance(value, bool)
    } | {"name": "dora-attn", "target_modules": "q_proj, v_proj", "modules_to_save": "", "feedforward_modules": ""}
    form = LoraConfigForm({**fields, "use_dora": "on"})
    assert form.is_valid(), form.errors
    config = form.save()
    assert config.lora_params().use_dora and config.lora_params().target_modules == ["q_proj", "v_proj"]

    form = LoraConfigForm({**fields, "name": "bad", "init": "loftq"})
    assert not form.is_valid()
    assert form.errors["init"] == ["loftq initialises the adapter from the 4-bit quantization error: set quantization to 4bit"]


def _run_form(run: TrainingRun, **overrides: object) -> dict[str, object]:
    return {
        "base_model": run.base_model.pk, "dataset": run.dataset.pk, "lora_config": run.lora_config.pk,
        **{k: v for k, v in run.hyperparameters.items() if not isinstance(v, bool)}, **overrides,
    }


@pytest.mark.django_db
def test_a_run_with_an_adapter_that_cannot_work_on_the_base_is_refused_before_queueing(
    tiny_model_dir: Path, store_dir: Path, client
) -> None:  # type: ignore[no-untyped-def]
    user, base, dataset, config = demo_objects(tiny_model_dir)
    run = make_run(user, base, dataset, config)
    client.login(username="owner", password="owner-pass-123")

    config.params.update(method="ia3", target_modules=["attention"], feedforward_modules=["down_proj"])
    config.save()
    response = client.post("/runs/new/", _run_form(run))
    assert response.status_code == 400
    assert "feedforward_modules: down_proj not among the targets (q_proj, k_proj, v_proj, o_proj)" in response.content.decode()

    config.params.update(method="prefix_tuning", feedforward_modules=[])
    config.save()
    response = client.post("/runs/new/", _run_form(run, batching="pack"))
    assert response.status_code == 400 and "prepends virtual tokens" in response.content.decode()
    assert TrainingRun.objects.count() == 1

    response = client.post("/runs/new/", _run_form(run, batching="pad"))
    assert response.status_code == 302 and TrainingRun.objects.count() == 2
