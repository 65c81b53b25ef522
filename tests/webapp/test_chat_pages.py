"""The chat pages and their rules without a worker: who may send, what is refused and how it is said, escaping,
the worker's view of a session (its turns, the stop and close in its replies), and the pages around a chat job."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from tests.webapp.factories import make_worker
from tests.webapp.team import login
from tests.webapp.test_adapter_jobs import adapter, api
from webapp.playground import chat
from webapp.playground.models import AdapterJob, ChatAnswer, ChatSession
from workers.contract.jobspecs import BASE_KEY

pytestmark = pytest.mark.django_db


def new_chat(client: Client, team: Any, **fields: Any) -> ChatSession:
    a = adapter(team, name="<i>helper</i>")
    body = {"adapters": [a.pk], "include_base": "on", "system_prompt": "Be brief.", "temperature": "0",
            "top_p": "1", "max_new_tokens": "32", "base_precision": "auto", "title": "<script>x</script>", **fields}
    response = client.post("/chat/", body)
    assert response.status_code == 302, response.content.decode()[:2000]
    return ChatSession.objects.get(pk=int(response["Location"].rstrip("/").rsplit("/", 1)[1]))


def test_a_new_chat_starts_loading_and_its_page_escapes_what_people_typed(team: Any, client: Client) -> None:
    login(client, "owner")
    session = new_chat(client, team)
    assert session.job is not None and session.job.kind == "chat" and session.job.state == "queued"
    assert session.job.params["session_id"] == session.pk and session.job.params["include_base"] is True
    sent = client.post(f"/chat/{session.pk}/send/", {"content": "<b>hi</b>"})
    assert sent.status_code == 201 and sent.json()["message"]["index"] == 1
    page = client.get(f"/chat/{session.pk}/").content.decode()
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "<script>x</script>" not in page
    assert "&lt;b&gt;hi&lt;/b&gt;" in page and "<b>hi</b>" not in page
    assert "&lt;i&gt;helper&lt;/i&gt;" in page and "Waiting for a GPU worker" in client.get(
        f"/chat/{session.pk}/state.json").json()["status"]["text"]
    # The job's own pages know the new kind.
    assert client.get(f"/jobs/{session.job_id}/").status_code == 200
    assert "chat" in client.get("/jobs/").content.decode().lower()
    assert client.get("/chat/").status_code == 200
    # An adapter's page leads to a new chat with it chosen.
    a = session.adapters.get()
    assert f'href="/chat/?adapters={a.pk}"' in client.get(f"/adapters/{a.pk}/").content.decode()
    assert f'<option value="{a.pk}" selected>' in client.get(f"/chat/?adapters={a.pk}").content.decode()


def test_refusals_name_what_is_wrong_and_keep_what_was_stored(team: Any, client: Client) -> None:
    login(client, "owner")
    session = new_chat(client, team)
    empty = client.post(f"/chat/{session.pk}/send/", {"content": "   "})
    assert empty.status_code == 400 and empty.json()["errors"] == {"content": "type a message"}
    client.post(f"/chat/{session.pk}/send/", {"content": "first"})
    busy = client.post(f"/chat/{session.pk}/send/", {"content": "second"})
    assert busy.status_code == 409 and "still being answered" in busy.json()["errors"]["content"]
    bad = client.post(f"/chat/{session.pk}/settings/", {"temperature": "hot", "max_new_tokens": "0"})
    assert bad.status_code == 400 and "number" in bad.json()["errors"]["temperature"]
    session.refresh_from_db()
    assert session.generation["temperature"] == 0.0  # nothing of a refused change is kept
    unfinished = client.post(f"/chat/{session.pk}/thumb/", {"index": 1, "column": BASE_KEY, "value": "up"})
    assert unfinished.status_code == 400 and "still being written" in unfinished.json()["errors"]["index"]
    assert session.messages.count() == 1 and ChatAnswer.objects.count() == 2
    # A teammate reads the chat but cannot send in it; staff can.
    client.logout()
    login(client, "mate")
    assert client.get(f"/chat/{session.pk}/").status_code == 200
    assert client.post(f"/chat/{session.pk}/stop/").status_code == 403
    too_many = client.post("/chat/", {"adapters": [adapter(team, name=f"a{i}").pk for i in range(5)]})
    assert "at most 4 adapters" in too_many.content.decode()


def test_the_worker_gets_each_columns_own_conversation_and_the_stop_and_close(team: Any, client: Client) -> None:
    login(client, "owner")
    session = new_chat(client, team)
    worker, token = make_worker()
    job = session.job
    AdapterJob.objects.filter(pk=job.pk).update(state="running", worker=worker, attempt=1)
    key = session.columns()[1][0]
    chat.send(session, "What is 2 + 2?")
    # The worker streams both answers, then ends the turn with the final texts.
    events = [{"seq": 1, "kind": "output", "data": {"row": 1, "column": BASE_KEY, "text": "fo"}},
              {"seq": 2, "kind": "output", "data": {"row": 1, "column": key, "text": "4"}},
              {"seq": 3, "kind": "output", "data": {"row": 1, "column": BASE_KEY, "text": "ur"}}]
    reply = api(client, token, job, "events", {"attempt": 1, "events": events}).json()
    assert reply["stop_turn"] == 0 and reply["close"] is False
    assert {a.column: a.text for a in ChatAnswer.objects.all()} == {BASE_KEY: "four", key: "4"}
    done = {"seq": 4, "kind": "chat", "data": {"state": "answered", "turn": 1, "answers": {
        BASE_KEY: {"text": "four", "tokens": 2, "first_token_s": 0.2, "seconds": 0.5, "stopped": False},
        key: {"text": "4", "tokens": 1, "first_token_s": 0.2, "seconds": 0.3, "stopped": False}}}}
    api(client, token, job, "events", {"attempt": 1, "events": [done]})
    assert all(a.done for a in ChatAnswer.objects.all())

    chat.send(session, "And 3 + 3?")
    turn = chat.next_turn(AdapterJob.objects.get(pk=job.pk), after=1)["turn"]
    assert turn["index"] == 2 and turn["generation"]["max_new_tokens"] == 32
    assert turn["conversations"][BASE_KEY] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "four"}, {"role": "user", "content": "And 3 + 3?"}]
    assert turn["conversations"][key][2] == {"role": "assistant", "content": "4"}  # its own answer
    client.post(f"/chat/{session.pk}/stop/")
    reply = api(client, token, job, "events", {"attempt": 1, "events": []}).json()
    assert reply["stop_turn"] == 2
    client.post(f"/chat/{session.pk}/close/")
    assert api(client, token, job, "events", {"attempt": 1, "events": []}).json()["close"] is True
    assert chat.next_turn(AdapterJob.objects.get(pk=job.pk), after=1) == {"close": True, "cancel": False}
    assert json.loads(client.get(f"/chat/{session.pk}/state.json").content)["closed"] is True


def test_an_answer_left_by_a_failed_job_does_not_block_the_chat(team: Any, client: Client) -> None:
    login(client, "owner")
    session = new_chat(client, team)
    chat.send(session, "hello")
    AdapterJob.objects.filter(pk=session.job_id).update(state="failed", error="CUDA out of memory")
    session.refresh_from_db()
    assert chat.status(session)["state"] == "failed" and "CUDA out of memory" in chat.status(session)["text"]
    again = client.post(f"/chat/{session.pk}/send/", {"content": "hello again"})
    assert again.status_code == 201
    session.refresh_from_db()
    assert session.job.state == "queued" and AdapterJob.objects.filter(kind="chat").count() == 2
    first = ChatAnswer.objects.filter(message__index=1)
    assert all(a.done and a.stopped for a in first)  # never answered: closed, not waiting for ever


def test_a_nul_in_model_output_is_stored_as_a_replacement_character_and_refused_in_typed_text(
    team: Any, client: Client
) -> None:
    """PostgreSQL's text and jsonb hold no NUL, and a model may write any byte: the worker API stores U+FFFD in its
    place (in events and in a job's result) instead of refusing the batch; people are told not to type one."""
    login(client, "owner")
    session = new_chat(client, team)
    worker, token = make_worker()
    job = session.job
    AdapterJob.objects.filter(pk=job.pk).update(state="running", worker=worker, attempt=1)
    chat.send(session, "hi")
    events = [{"seq": 1, "kind": "output", "data": {"row": 1, "column": BASE_KEY, "text": "a\x00b"}},
              {"seq": 2, "kind": "log", "message": "line with \x00 in it"},
              {"seq": 3, "kind": "chat", "data": {"state": "answered", "turn": 1, "answers": {
                  BASE_KEY: {"text": "a\x00bc", "tokens": 3, "first_token_s": 0.1, "seconds": 0.2, "stopped": False}}}}]
    reply = api(client, token, job, "events", {"attempt": 1, "events": events})
    assert reply.status_code == 200, reply.content[:500]
    answer = ChatAnswer.objects.get(column=BASE_KEY)
    assert answer.text == "a\ufffdbc" and answer.done
    assert job.events.get(seq=2).message == "line with \ufffd in it"
    done = api(client, token, job, "status", {"attempt": 1, "state": "succeeded",
                                             "result": {"turns": 1, "closed": "idle\x00"}, "error": ""})
    assert done.status_code == 200, done.content[:500]
    assert AdapterJob.objects.get(pk=job.pk).result["closed"] == "idle\ufffd"
    typed = client.post(f"/chat/{session.pk}/send/", {"content": "bad \x00 byte"})
    assert typed.status_code == 400 and "NUL" in typed.json()["errors"]["content"]
    assert client.post(f"/chat/{session.pk}/settings/", {"system_prompt": "\x00"}).json()["errors"]["system_prompt"]
