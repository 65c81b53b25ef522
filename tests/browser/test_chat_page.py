"""The chat playground in a real Chromium with a real worker: a chat started from its page, the model loaded once
and kept, two columns (the base and an adapter) streaming their answers, the stop button, a reload that resumes
the conversation, thumbs on an answer, and the conversation saved as a prompt set."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.webapp.factories import make_run
from webapp.playground.models import AdapterJob, ChatAnswer, ChatSession, ChatThumb, PromptSet, VoteDataset
from webapp.training.models import Adapter, TrainingRun
from workers.contract.jobspecs import BASE_KEY
from workers.contract.store import ArtifactStore

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def random_adapter(model_dir: Path, store: Path) -> str:
    """A LoRA of the tiny model with random A and B (PEFT's zero B would answer exactly as the base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    uri = "store://adapters/chatty"
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM",
                        init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(ArtifactStore(store).path(uri))
    return uri


def long_context_copy(model_dir: Path) -> Path:
    """The tiny model with a 4,096-token context (rotary positions: the weights are unchanged), so that an answer
    stopped by the user is still being written when Stop is clicked, however fast the machine."""
    folder = model_dir.parent / "tiny-llama-4k"
    if not folder.exists():
        shutil.copytree(model_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        config["max_position_embeddings"] = 4096
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def answers_of(session: ChatSession, index: int) -> dict[str, ChatAnswer]:
    return {a.column: a for a in ChatAnswer.objects.filter(message__session=session, message__index=index)}


def test_two_columns_stream_stop_and_a_reload_resumes(  # type: ignore[no-untyped-def]
    page, demo, worker_process, scheduler, screenshot, tiny_model_dir, shared_store
) -> None:
    user, base, dataset, config = demo
    base.source, base.max_positions = str(long_context_copy(tiny_model_dir)), 4096
    base.save()
    run = make_run(user, base, dataset, config)
    TrainingRun.objects.filter(pk=run.pk).update(state="succeeded")
    adapter = Adapter.objects.create(name="chatty", owner=user, base_model=base, run=run, rank=8,
                                     uri=random_adapter(tiny_model_dir, shared_store), size_bytes=4096,
                                     sha256="0" * 64, trainable_params=10, total_params=100)

    page.goto("/chat/")
    page.get_by_label("Adapters (up to 4, same base)").select_option(str(adapter.pk))
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max new tokens").fill("12")
    page.get_by_role("button", name="Start chatting").click()
    page.wait_for_url(re.compile(r"/chat/\d+/$"))
    session = ChatSession.objects.get()
    status = page.get_by_role("status")
    # The model starts loading at once; its load time is shown once it is ready.
    expect(status).to_contain_text(re.compile(r"Ready · loaded in \d+\.\d s"), timeout=120_000)
    first_job = session.job_id

    box = page.get_by_label("Message")
    box.fill("<b>Hello</b> there")
    box.press("Enter")
    turn = page.locator('.turn[data-index="1"]')
    # Typed text is shown as text, never as markup.
    expect(turn.locator(".user-message .text")).to_have_text("<b>Hello</b> there")
    columns = turn.locator(".answer")
    expect(columns).to_have_count(2)
    for i in range(2):
        expect(columns.nth(i).locator(".figures")).to_contain_text("token", timeout=60_000)
    answers = answers_of(session, 1)
    assert set(answers) == {BASE_KEY, adapter.key} and all(a.done and not a.stopped for a in answers.values())
    assert answers[BASE_KEY].text != answers[adapter.key].text  # two models, two answers
    for i, column in enumerate((BASE_KEY, adapter.key)):
        expect(columns.nth(i).locator(".text")).to_have_text(answers[column].text)
        assert answers[column].first_token_s is not None and answers[column].first_token_s > 0

    # A long answer (up to ~4,000 tokens), stopped while it streams: the random base never ends by itself.
    page.locator("summary", has_text="Settings").click()
    page.locator(".settings-form").get_by_label("Max new tokens").fill("4096")
    page.get_by_role("button", name="Save settings").click()
    expect(page.locator(".settings-saved")).to_be_visible()
    box.fill("Tell me a long story")
    box.press("Enter")
    turn2 = page.locator('.turn[data-index="2"]')
    expect(turn2.locator(".answer.writing").first).to_be_visible(timeout=30_000)
    expect(turn2.locator(".answer .text").first).not_to_have_text("", timeout=60_000)  # text streams in
    page.get_by_role("button", name="Stop").click()
    expect(turn2.locator(".answer.writing")).to_have_count(0, timeout=60_000)
    expect(turn2.locator(".figures").first).to_contain_text("stopped")
    expect(page.get_by_role("button", name="Stop")).to_be_hidden()  # nothing is being written any more
    stopped = answers_of(session, 2)
    assert all(a.done and a.stopped and 0 < a.tokens < 4096 for a in stopped.values()), stopped
    screenshot(page, "chat-two-columns")

    # A reload draws the same conversation, final texts included, and the same model answers the next message.
    page.reload()
    expect(page.locator(".turn")).to_have_count(2)
    for index, saved in ((1, answers), (2, stopped)):
        for i, column in enumerate((BASE_KEY, adapter.key)):
            expect(page.locator(f'.turn[data-index="{index}"] .answer').nth(i).locator(".text")).to_have_text(
                saved[column].text)
    page.locator("summary", has_text="Settings").click()
    page.locator(".settings-form").get_by_label("Max new tokens").fill("12")
    page.get_by_role("button", name="Save settings").click()
    expect(page.locator(".settings-saved")).to_be_visible()
    page.get_by_label("Message").fill("And now?")
    page.get_by_label("Message").press("Enter")
    expect(page.locator('.turn[data-index="3"] .figures').nth(1)).to_contain_text("token", timeout=60_000)
    session.refresh_from_db()
    assert session.job_id == first_job  # the model stayed loaded: no second load
    assert AdapterJob.objects.filter(kind="chat").count() == 1

    # Thumbs on an answer, and the conversation kept as a prompt set for comparisons and evaluations.
    page.get_by_role("button", name=f"thumbs up for {adapter}").first.click()
    expect(page.get_by_role("button", name=f"thumbs up for {adapter}").first).to_have_text("▲ 1")
    assert ChatThumb.objects.get().up is True
    page.get_by_role("button", name=f"thumbs down for {base} (base)").nth(1).click()
    expect(page.get_by_role("button", name=f"thumbs down for {base} (base)").nth(1)).to_have_text("▼ 1")
    # The thumbs feed the same feedback data as a comparison's: rows for KTO, with the conversation answered.
    page.get_by_role("button", name="Make a feedback dataset of the thumbs").click()
    page.wait_for_url(re.compile(r"/datasets/\d+/$"))
    made = VoteDataset.objects.get()
    assert made.chat_id == session.pk and made.kind == "feedback" and made.judgements == 2
    assert made.figures["desirable"] == 1 and made.figures["undesirable"] == 1
    rows = [json.loads(line) for line in ArtifactStore(shared_store).path(made.dataset.uri).read_text().splitlines()]
    assert [(r["label"], r["completion"][0]["content"]) for r in rows] == [
        (True, answers[adapter.key].text), (False, stopped[BASE_KEY].text)]
    assert rows[1]["prompt"][-1] == {"role": "user", "content": "Tell me a long story"}
    page.goto(f"/chat/{session.pk}/")
    page.locator(".save-form select").select_option(adapter.key)
    page.get_by_role("button", name="Save as a prompt set").click()
    page.wait_for_url(re.compile(r"/compare/new/\?prompt_set=\d+"))
    saved_set = PromptSet.objects.get()
    assert saved_set.rows[0]["prompt"] == "<b>Hello</b> there"
    third = saved_set.rows[2]["turns"]
    assert [t["role"] for t in third] == ["user", "assistant", "user", "assistant", "user"]
    assert third[1]["content"] == answers[adapter.key].text

    # Closing unloads the model: the worker ends the job.
    page.goto(f"/chat/{session.pk}/")
    page.get_by_role("button", name="Close (unload the model)").click()
    expect(page.get_by_role("status")).to_contain_text("Closed", timeout=60_000)
    job = AdapterJob.objects.get(pk=first_job)
    assert job.state == "succeeded" and job.result["closed"] == "closed" and job.result["turns"] == 3
