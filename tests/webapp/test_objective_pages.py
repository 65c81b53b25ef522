"""The pages of preference training: the New run form asks the objective first and marks each setting with the
objectives it applies to, a run's page draws the curves its objective logs, a dataset page shows pairs side by side."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest

from tests.webapp.team import login, make
from webapp.jobs.ledger import record_events
from webapp.training.models import RunEvent, TrainingRun

pytestmark = pytest.mark.django_db
HOSTILE = "<img src=x onerror=alert(1)>"


def wrapper_of(page: str, name: str) -> str:
    """The opening tag of the field wrapper around the input named `name`."""
    at = page.index(f'name="{name}"')
    return page[page.rindex('<div class="field', 0, at):].split(">", 1)[0]


def figure_of(page: str, title: str) -> str:
    """The chart titled `title`, from its <figure> to its end."""
    start = page.rindex("<figure", 0, page.index(f"<strong>{title}</strong>"))
    return page[start:page.index("</figure>", start)]


def pair_rows(n: int, answer: str = "") -> bytes:
    return "".join(json.dumps({"prompt": f"What is {i} + 2?\n", "chosen": str(i + 2), "rejected": answer or str(i + 3)})
                   + "\n" for i in range(n)).encode()


# ---- the New run form -----------------------------------------------------------------------------

def test_the_form_asks_the_objective_first_and_marks_the_settings_and_datasets_it_takes(team, client) -> None:  # type: ignore[no-untyped-def]
    from webapp.catalog.models import Dataset

    pairs = Dataset.objects.create(name="pairs", uri="file:///p", original_filename="p.jsonl", format="preference",
                                   row_count=10, size_bytes=100, sha256="0" * 64)
    login(client, "owner")
    page = client.get("/runs/new/").content.decode()
    assert page.index('name="objective"') < page.index('name="base_model"') < page.index('name="learning_rate"')
    assert page.count('name="objective"') == 1
    assert re.search(r'<option value="dpo" data-formats="preference"[^>]*>dpo: Direct preference optimization', page)
    assert re.search(r'<option value="sft"[^>]* data-formats="text prompt_completion alpaca messages sharegpt"', page)
    assert 'id="objective-formats">text, prompt_completion, alpaca, messages, sharegpt</span>' in page
    # Each setting of some objectives only says which; the shared ones say nothing (they always show).
    assert 'data-objectives="dpo kto orpo simpo"' in wrapper_of(page, "beta")
    assert 'data-objectives="dpo"' in wrapper_of(page, "dpo_loss")
    assert 'data-objectives="grpo"' in wrapper_of(page, "num_generations")
    assert 'data-objectives="sft"' in wrapper_of(page, "completion_only_loss")
    assert "data-objectives" not in wrapper_of(page, "learning_rate") + wrapper_of(page, "max_seq_length")
    # The dataset selects say each dataset's format, for the script and in the option's text.
    assert re.search(rf'<option value="{pairs.pk}" data-format="preference"[^>]*>pairs \(preference rows\)', page)
    assert page.count('data-format="preference"') == 2  # training and eval datasets
    assert "tunedeck/run_form.js" in page and "<script>" not in page
    # Another base model swaps the settings in: they still carry their objectives.
    partial = client.get("/runs/new/", {"base_model": team[1][1].pk}, headers={"HX-Request": "true"}).content.decode()
    assert "<html" not in partial and 'data-objectives="dpo kto orpo simpo"' in wrapper_of(partial, "beta")


def test_settings_of_another_objective_are_left_at_their_defaults_and_the_run_says_so(  # type: ignore[no-untyped-def]
        tiny_model_dir, store_dir, client) -> None:
    import dataclasses

    from tests.webapp.factories import demo_objects
    from webapp.catalog.services import register_dataset
    from webapp.training.services import RunRefused, RunRequest, queue_run
    from workers.contract.spec import TrainParams, suggest_train_params

    user, base, dataset, config = demo_objects(tiny_model_dir)
    params = {k: v for k, v in dataclasses.asdict(suggest_train_params(base.num_parameters)).items()
              if not isinstance(v, bool)}
    client.login(username="owner", password="owner-pass-123")
    # The page posts the settings it hides too: a DPO beta of 0 (refused under dpo) does not stop a supervised run.
    sft = client.post("/runs/new/", {"base_model": base.pk, "dataset": dataset.pk, "lora_config": config.pk,
                                     **params, "completion_only_loss": "on", "beta": 0, "dpo_loss": "ipo"})
    assert sft.status_code == 302, sft.content.decode()[-1500:]
    run = TrainingRun.objects.get()
    assert (run.hyperparameters["beta"], run.hyperparameters["dpo_loss"]) == (0.1, "sigmoid")
    assert run.hyperparameters["completion_only_loss"] is True
    notes = list(RunEvent.objects.filter(run=run).values_list("message", flat=True))
    assert "Settings sft does not use, left at their defaults: beta, dpo_loss" in notes
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert ">completion_only_loss<" in page and ">beta<" not in page and ">dpo_loss<" not in page

    # The same through the service every other front end calls: a DPO run keeps the supervised switch's default.
    pairs = register_dataset("pairs", "pairs.jsonl", pair_rows(12))
    hp = dataclasses.replace(suggest_train_params(base.num_parameters), objective="dpo", beta=0.3,
                             completion_only_loss=False)
    dpo = queue_run(user, RunRequest(base_model=base, dataset=pairs, lora_config=config, hyperparameters=hp))
    assert (dpo.hyperparameters["beta"], dpo.hyperparameters["completion_only_loss"]) == (0.3, True)
    assert dpo.job_spec().train == dataclasses.replace(hp, completion_only_loss=True)
    page = client.get(f"/runs/{dpo.pk}/").content.decode()
    assert ">beta<" in page and ">completion_only_loss<" not in page
    # A setting of the run's own objective is still checked.
    with pytest.raises(RunRefused, match=r"hyperparameters\.beta: must be positive"):
        queue_run(user, RunRequest(base_model=base, dataset=pairs, lora_config=config,
                                   hyperparameters=dataclasses.replace(hp, beta=0.0)))
    assert TrainParams(objective="sft", beta=0.5).ignored_settings() == ["beta"]


# ---- the run page's charts --------------------------------------------------------------------------

def dpo_metrics(steps: int) -> list[dict[str, object]]:
    events = []
    for step in range(1, steps + 1):
        events.append({"seq": step, "kind": "metric", "data": {
            "step": step, "total_steps": steps, "epoch": step / steps, "loss": 0.69 - step / 100,
            "learning_rate": 1e-3, "grad_norm": 1.0, "num_tokens": 100.0 * step,
            "rewards/chosen": step / 50, "rewards/rejected": -step / 50, "rewards/margins": step / 25,
            "rewards/accuracies": min(1.0, 0.5 + step / 20), "logps/chosen": -20 + step, "logps/rejected": -20 - step,
            "rewards/exact/mean": step / 10, "rewards/exact/std": 0.1, f"{HOSTILE}/x": 1.0}})
        if step % 5 == 0:
            events.append({"seq": 1000 + step, "kind": "metric", "data": {
                "step": step, "eval_loss": 0.7, "eval_rewards/chosen": step / 60, "eval_rewards/rejected": -step / 60}})
    return events


def test_a_dpo_run_page_draws_its_reward_charts_from_the_stored_metrics(team, client) -> None:  # type: ignore[no-untyped-def]
    run = make(team, state="running", attempt=1, step=10, total_steps=10)
    run.hyperparameters = {"objective": "dpo", "beta": 0.1}
    run.save()
    record_events(run, 1, dpo_metrics(10))
    run.refresh_from_db()
    assert run.metric_points[-1]["rewards/margins"] == pytest.approx(0.4)
    # Tokens seen are kept, an axis of the charts; the epoch is progress, not a curve.
    assert run.metric_points[-1]["num_tokens"] == 1000 and "epoch" not in run.metric_points[-1]
    login(client, "mate")
    page = client.get(f"/runs/{run.pk}/").content.decode()
    titles = re.findall(r"<figcaption><strong>(.*?)</strong>", page)
    assert titles[:4] == ["Loss", "Rewards", "Reward margin", "Preference accuracy"]
    assert titles[-3:] == ["Learning rate", "Grad norm", "Throughput"]
    # Metrics no chart knows get one a family, grader rewards included; their names are escaped.
    assert {"rewards/exact", "logps", "&lt;img src=x onerror=alert(1)&gt;"} <= set(titles)
    assert HOSTILE not in page
    rewards = figure_of(page, "Rewards")
    assert rewards.count('<span class="legend') == 4  # chosen and rejected, each with its eval twin
    assert 'class="legend series chosen"' in rewards and 'class="legend series rejected twin"' in rewards
    assert "chosen: 0.2" in rewards and "rejected: -0.2" in rewards
    assert "pairs preferred: 1" in figure_of(page, "Preference accuracy")
    assert "<strong>KL</strong>" not in page  # a chart of an objective shows once the run logs its metric
    # The live charts (charts.js, fed by metrics.json as metrics arrive) draw the same charts, eval twins dashed.
    live = client.get(f"/runs/{run.pk}/metrics.json").json()
    assert [chart["title"] for chart in live["charts"]] == [html.unescape(title) for title in titles]
    live_rewards = next(chart for chart in live["charts"] if chart["title"] == "Rewards")
    assert [(s["key"], s["dashed"]) for s in live_rewards["series"]] == [
        ("rewards/chosen", False), ("eval_rewards/chosen", True), ("rewards/rejected", False),
        ("eval_rewards/rejected", True)]


def test_the_runner_forwards_every_number_trl_logs_and_the_page_charts_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A real DPO run on the tiny model: trl's own figures reach the metrics and become the reward charts."""
    from tests.workers.test_dpo import dpo_spec, write_rows
    from webapp.training.charts import run_charts
    from webapp.training.metrics import merge_points
    from workers.contract.reporter import MemoryReporter
    from workers.contract.store import ArtifactStore
    from workers.training.demo import preference_rows
    from workers.training.train import run_training

    store = ArtifactStore(tmp_path / "store")
    write_rows(store.path("store://datasets/pairs.jsonl"), preference_rows(64, seed=0))
    spec = dpo_spec(tiny_model_dir)
    spec.train.num_epochs, spec.train.eval_steps = 1, 4
    reporter = MemoryReporter()
    assert run_training(spec, reporter, store) is not None, reporter.logs[-5:]
    trained = [m for m in reporter.metrics if "loss" in m]
    evaluated = [m for m in reporter.metrics if "eval_loss" in m]
    assert trained and evaluated
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert all(isinstance(m[key], float) for m in trained), key
        assert all(isinstance(m[f"eval_{key}"], float) for m in evaluated), key
    assert not any(k.endswith(("_runtime", "_per_second")) for m in reporter.metrics for k in m)
    margins = [m["rewards/margins"] for m in trained]
    print(f"DPO reward margin by logged step: {[round(x, 3) for x in margins]}; "
          f"pairs preferred: {[round(m['rewards/accuracies'], 2) for m in trained]}")

    charts = {chart.title: chart for chart in run_charts(merge_points([], reporter.metrics))}
    assert [s.name for s in charts["Rewards"].series] == ["chosen", "eval chosen", "rejected", "eval rejected"]
    assert charts["Reward margin"].series[0].count == len(trained)
    assert charts["Preference accuracy"].series[0].last == pytest.approx(trained[-1]["rewards/accuracies"])


# ---- the dataset page -----------------------------------------------------------------------------

def test_the_dataset_page_shows_pairs_side_by_side_with_their_answers_escaped(  # type: ignore[no-untyped-def]
        tiny_model_dir, store_dir, client) -> None:
    from tests.webapp.factories import demo_objects
    from webapp.catalog.services import register_dataset

    _, base, toy, _ = demo_objects(tiny_model_dir)
    pairs = register_dataset("pairs", "pairs.jsonl", pair_rows(6, answer=HOSTILE))
    client.login(username="owner", password="owner-pass-123")
    page = client.get(f"/datasets/{pairs.pk}/").content.decode()
    first = page[page.index('<article class="preview-row"'):page.index("</article>")]
    assert first.index("Prompt") < first.index("Chosen") < first.index("Rejected")
    assert "What is 0 + 2?" in first and "masked" in first and "trained" in first
    assert '<div class="answers">' in first and first.count('<pre class="text">') == 3
    assert "&lt;img src=x onerror=alert(1)&gt;" in first and HOSTILE not in page

    # With a base model: the pairs as DPO tokenizes them, with token counts.
    analysis = client.get(f"/datasets/{pairs.pk}/", {"base_model": base.pk, "row": 2, "max_length": 64, "batching": "pad"},
                          headers={"HX-Request": "true"}).content.decode()
    assert "Pairs 2–4 as DPO trains them" in analysis and analysis.count('<article class="pair rendered-pair">') == 3
    assert re.search(r"Prompt <small class=\"muted\">\d+ tokens, masked", analysis)
    assert re.search(r"Chosen <small class=\"muted\">\d+ tokens trained", analysis)
    assert re.search(r"Rejected <small class=\"muted\">\d+ tokens trained", analysis)
    assert "&lt;" in analysis and "<img" not in analysis
    short = client.get(f"/datasets/{pairs.pk}/", {"base_model": base.pk, "row": 1, "max_length": 10, "batching": "pad"},
                       headers={"HX-Request": "true"}).content.decode()
    assert 'class="tok cut"' in short  # the long rejected answer passes max length

    # Rows of another format: each field by its name.
    other = client.get(f"/datasets/{toy.pk}/").content.decode()
    assert "<dt>instruction</dt>" in other and "<dt>output</dt>" in other and '<div class="answers">' not in other


def test_the_preview_of_a_row_is_generic_on_its_fields() -> None:
    from webapp.catalog.views import preview_row

    feedback = preview_row({"prompt": "Add 2 and 2.", "completion": "4", "label": True})
    assert feedback == {"pair": None, "fields": [("prompt", "Add 2 and 2."), ("completion", "4"), ("label", "true")]}
    graded = preview_row({"prompt": [{"role": "user", "content": "2+2?"}], "answer": "4", "tags": ["math"]})
    assert graded["fields"] == [("prompt", "user: 2+2?"), ("answer", "4"), ("tags", '[\n  "math"\n]')]
    pair = preview_row({"prompt": "p", "chosen": [{"role": "assistant", "content": "yes"}], "rejected": "no", "id": 7})
    assert pair == {"pair": {"prompt": "p", "chosen": "assistant: yes", "rejected": "no"}, "fields": [("id", "7")]}


def test_each_setting_of_some_objectives_lists_every_objective_its_help_names() -> None:
    """OBJECTIVE_SETTINGS is what hides a setting and resets it to its default: a setting whose help says it is
    one objective's ("DPO only: …") must be declared, and one declared must list each objective its help names
    (an objective left out would train with the default instead of the value asked for)."""
    import dataclasses

    from workers.contract.spec import OBJECTIVE_NAMES, OBJECTIVE_SETTINGS, TrainParams

    for f in dataclasses.fields(TrainParams):
        text = str(f.metadata["help"])
        only = re.match(r"([A-Z]+) only:", text)
        if only:
            assert only.group(1).lower() in OBJECTIVE_SETTINGS.get(f.name, ()), f.name
        if f.name in OBJECTIVE_SETTINGS:
            named = {name for name in OBJECTIVE_NAMES if re.search(rf"\b{name.upper()}\b", text)}
            assert named <= set(OBJECTIVE_SETTINGS[f.name]) <= set(OBJECTIVE_NAMES), f.name
