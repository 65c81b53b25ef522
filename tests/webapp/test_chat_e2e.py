"""Chat sessions over the REST API with a real worker process on the tiny model: a session created, a message
answered by every column as Server-Sent Events, the model released after the idle timeout (and loaded again by
the next message), closed on request; and the worker API's fencing of the long poll for messages."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest

from tests.webapp.factories import make_worker
from tests.webapp.test_adapter_jobs_e2e import adapters  # noqa: F401
from tests.webapp.test_end_to_end import WORKER_NAME, WORKER_TOKEN, worker_process  # noqa: F401
from webapp.api.models import ApiKey
from webapp.fleet.scheduler import schedule_once
from webapp.playground.models import AdapterJob, ChatAnswer, ChatSession
from workers.contract.jobspecs import BASE_KEY

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]


def events_of(response: httpx.Response) -> list[tuple[str, Any]]:
    out = []
    for block in response.text.split("\n\n"):
        lines = block.split("\n")
        kind = next((line[7:] for line in lines if line.startswith("event: ")), None)
        data = "\n".join(line[6:] for line in lines if line.startswith("data: "))
        if kind:
            out.append((kind, json.loads(data) if data else None))
    return out


class Dispatcher:
    """The scheduler's loop in a thread: queued chat jobs reach the worker while a stream is open."""

    def __enter__(self) -> Dispatcher:
        self.stop = threading.Event()

        def loop() -> None:
            from django.db import OperationalError, connection

            try:
                while not self.stop.is_set():
                    try:
                        schedule_once()
                    except OperationalError:
                        pass
                    self.stop.wait(0.3)
            finally:
                connection.close()

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def wait_job(job_id: int, timeout: float = 120) -> AdapterJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = AdapterJob.objects.get(pk=job_id)
        if job.is_final:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {AdapterJob.objects.get(pk=job_id).state}")


def test_a_chat_over_the_api_streams_releases_when_idle_and_reloads(  # type: ignore[no-untyped-def]
    adapters, live_server, settings  # noqa: F811
) -> None:
    _, _, rows = adapters
    settings.TUNEDECK_CHAT_IDLE_S = 3
    raw = ApiKey.issue(rows["add"].owner, "chat", ["read", "write"])[1]
    api = httpx.Client(base_url=live_server.url + "/api/v1", headers={"Authorization": f"Bearer {raw}"}, timeout=120)
    with Dispatcher():
        created = api.post("/playground/sessions/", json={"adapters": [rows["add"].pk, rows["double"].pk],
                                                           "temperature": 0, "max_new_tokens": 6})
        assert created.status_code == 201, created.text
        session = created.json()
        keys = [c["key"] for c in session["columns"]]
        assert keys == [BASE_KEY, rows["add"].key, rows["double"].key]
        assert session["status"]["state"] in ("queued", "loading")

        answer = api.post(f"/playground/sessions/{session['id']}/messages/",
                          json={"content": "What is 23 + 41?", "stream": True})
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
        events = events_of(answer)
        assert events[-1][0] == "done", events
        streamed: dict[str, str] = {}
        for kind, data in events:
            if kind == "delta":
                streamed[data["column"]] = data.get("replace", streamed.get(data["column"], "") + data.get("text", ""))
        finals = {data["column"]: data for kind, data in events if kind == "answer"}
        assert set(finals) == set(keys)
        for key in keys:
            assert streamed.get(key, "") == finals[key]["text"] and finals[key]["done"]
        assert finals[rows["add"].key]["text"].strip().isdigit()  # the adapter trained on sums answers a number

        # A second message while none is pending is answered by the same job, its model still loaded.
        detail = api.get(f"/playground/sessions/{session['id']}/").json()
        first_job = detail["status"]["job"]
        assert detail["status"]["state"] == "ready" and detail["status"]["load_s"] is not None
        assert [m["index"] for m in detail["messages"]] == [1]

        # Idle for longer than the timeout: the worker ends the job and the GPU is free again.
        job = wait_job(first_job)
        assert job.state == "succeeded" and job.result["closed"] == "idle" and job.result["turns"] == 1
        detail = api.get(f"/playground/sessions/{session['id']}/").json()
        assert detail["status"]["state"] == "released" and "loads the model again" in detail["status"]["text"]

        # The next message loads the model again, in a new job, and the conversation goes on from its history.
        sent = api.post(f"/playground/sessions/{session['id']}/messages/", json={"content": "Double 17"})
        assert sent.status_code == 201 and sent.json()["index"] == 2, sent.text
        busy = api.post(f"/playground/sessions/{session['id']}/messages/", json={"content": "again"})
        assert busy.status_code == 409 and "still being answered" in busy.json()["detail"]
        streamed_again = events_of(api.get(f"/playground/sessions/{session['id']}/messages/2/stream/"))
        assert streamed_again[-1][0] == "done"
        session_row = ChatSession.objects.get(pk=session["id"])
        assert session_row.job_id != first_job
        assert ChatAnswer.objects.filter(message__session=session_row, done=True).count() == 6

        closed = api.post(f"/playground/sessions/{session['id']}/close/")
        assert closed.status_code == 200 and closed.json()["closed"] is True
        job = wait_job(session_row.job_id)
        assert job.state == "succeeded" and job.result["closed"] == "closed"


def test_the_long_poll_for_messages_is_fenced(adapters, live_server) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    from webapp.playground import chat

    _, base, rows = adapters
    session = chat.start_session(rows["add"].owner, [rows["add"]])
    job = session.job
    intruder, _ = make_worker("intruder", token="intruder-token")
    AdapterJob.objects.filter(pk=job.pk).update(state="running", worker=intruder, attempt=1)
    url = f"{live_server.url}/api/worker/v1/adapter-jobs/{job.pk}/chat-next"

    def ask(token: str, **body: Any) -> httpx.Response:
        return httpx.post(url, json={"attempt": 1, "after": 0, "wait": 0, **body},
                          headers={"Authorization": f"Bearer {token}"}, timeout=30)

    assert ask("not-a-token").status_code == 401
    assert ask(WORKER_TOKEN).status_code == 404  # assigned to another worker
    assert ask("intruder-token", attempt=2).status_code == 409  # a stale attempt
    assert ask("intruder-token").json() == {}  # nothing to answer yet
    chat.send(session, "Hello")
    turn = ask("intruder-token").json()["turn"]
    assert turn["index"] == 1 and turn["conversations"][BASE_KEY][-1] == {"role": "user", "content": "Hello"}
    # A long poll is answered as soon as a message comes.
    assert ask("intruder-token", after=1, wait=0.5).json() == {}
    chat.stop(session)
    chat.close(session)
    assert ask("intruder-token", after=1).json()["close"] is True
    merge = AdapterJob.objects.create(kind="merge", owner=rows["add"].owner, base_model=base, worker=intruder,
                                      state="running", attempt=1)
    other = httpx.post(f"{live_server.url}/api/worker/v1/adapter-jobs/{merge.pk}/chat-next",
                       json={"attempt": 1}, headers={"Authorization": "Bearer intruder-token"}, timeout=30)
    assert other.status_code == 400 and "not a chat session" in other.json()["detail"]


def test_tunedeck_chat_answers_each_message_and_closes_on_exit(  # type: ignore[no-untyped-def]
    adapters, live_server, monkeypatch, capsys  # noqa: F811
) -> None:
    from webapp.cli import main

    _, _, rows = adapters
    monkeypatch.setenv("TUNEDECK_SERVER", live_server.url)
    monkeypatch.setenv("TUNEDECK_API_KEY", ApiKey.issue(rows["add"].owner, "cli", ["read", "write"])[1])
    with Dispatcher():
        code = main(["chat", "--adapter", str(rows["add"].pk), "--adapter", str(rows["double"].pk), "--temperature",
                     "0", "--max-new-tokens", "6", "-m", "What is 23 + 41?", "-m", "Double 17", "--json"])
        out = capsys.readouterr().out
        assert code == 0, out
        turns = [json.loads(line) for line in out.splitlines()]  # one JSON line per message
        session = ChatSession.objects.get()
        assert [t["message"] for t in turns] == ["What is 23 + 41?", "Double 17"]
        for turn in turns:
            assert [a["column"] for a in turn["answers"]] == [BASE_KEY, rows["add"].key, rows["double"].key]
            assert all(a["done"] for a in turn["answers"])
        stored = ChatAnswer.objects.get(message__session=session, message__index=2, column=rows["double"].key)
        assert turns[1]["answers"][2]["text"] == stored.text
        job = wait_job(session.job_id)  # closed on exit: the model is unloaded
        assert job.result["closed"] == "closed" and job.result["turns"] == 2
