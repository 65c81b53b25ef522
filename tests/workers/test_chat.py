"""The chat session runner with real PEFT adapters on the tiny random Llama: multi-turn answers per column,
streamed deltas that add up to the final texts, the user's stop, and the release after the idle timeout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workers.adapters.chat import run_chat
from workers.adapters.inference import load_for_inference
from workers.contract.jobspecs import BASE_KEY, AdapterRef, ChatSpec, GenerationParams, LoadParams, PromptRow
from workers.contract.reporter import MemoryReporter
from workers.contract.spec import ModelRef
from workers.contract.store import ArtifactStore
from workers.generation.engine import generate_grid

Adapters = tuple[ArtifactStore, dict[str, str]]
COLUMNS = [BASE_KEY, "add", "double"]
GREEDY = {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "seed": 0}


def chat_spec(model_dir: Path, uris: dict[str, str], idle: int = 600, include_base: bool = True) -> ChatSpec:
    return ChatSpec(job_id=1, attempt=1, base_model=ModelRef(source=str(model_dir)),
                    adapters=[AdapterRef(key=task, label=f"{task} adapter", uri=uri) for task, uri in uris.items()],
                    idle_timeout_s=idle, include_base=include_base)


def turn(index: int, conversations: dict[str, list[dict[str, str]]], **generation: Any) -> dict[str, Any]:
    return {"index": index, "conversations": conversations, "generation": {**GREEDY, **generation}}


def streamed(reporter: MemoryReporter) -> dict[tuple[int, str], str]:
    texts: dict[tuple[int, str], str] = {}
    for event in reporter.events:
        if event["kind"] == "output":
            key = (event["data"]["row"], event["data"]["column"])
            texts[key] = texts.get(key, "") + event["data"]["text"]
    return texts


def answered(reporter: MemoryReporter) -> list[dict[str, Any]]:
    return [e["data"] for e in reporter.events if e["kind"] == "chat" and e["data"].get("state") == "answered"]


def test_every_column_answers_each_turn_from_its_own_conversation(  # type: ignore[no-untyped-def]
    tiny_model_dir: Path, task_adapters: Adapters
) -> None:
    store, uris = task_adapters
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 23 + 41?"}]
    reporter = MemoryReporter(turns=[turn(1, {c: first for c in COLUMNS})])
    result = run_chat(chat_spec(tiny_model_dir, uris), reporter, store)
    assert result is not None and result["turns"] == 1 and result["closed"] == "closed", reporter.logs
    states = [e["data"].get("state") for e in reporter.events if e["kind"] == "chat"]
    assert states == ["loading", "ready", "answered", "closed"]
    answers = answered(reporter)[0]["answers"]

    # The second message: each column's history holds its own first answer, so the conversations differ.
    conversations = {c: [*first, {"role": "assistant", "content": answers[c]["text"]},
                         {"role": "user", "content": "Double 17"}] for c in COLUMNS}
    assert len({str(v) for v in conversations.values()}) > 1
    reporter = MemoryReporter(turns=[turn(1, {c: first for c in COLUMNS}), turn(2, conversations)])
    run_chat(chat_spec(tiny_model_dir, uris), reporter, store)
    turns = answered(reporter)
    assert [t["turn"] for t in turns] == [1, 2]

    # Batched (the adapters stacked, one row per column) answers as each column alone would, greedy in float32.
    model, tokenizer, _ = load_for_inference(ModelRef(source=str(tiny_model_dir)),
                                             [AdapterRef(key=t, uri=u) for t, u in uris.items()], LoadParams(), store)
    for column in COLUMNS:
        alone = generate_grid(model, tokenizer, [PromptRow(turns=conversations[column])], [column],
                              GenerationParams(max_new_tokens=8), batched=False)
        assert turns[1]["answers"][column]["text"] == alone[(0, column)], column
    # Each column is its own model: the adapters answer otherwise than the base.
    assert len({turns[0]["answers"][c]["text"] for c in COLUMNS}) > 1
    # What streamed adds up to the final texts, turn by turn and column by column.
    deltas = streamed(reporter)
    for t in turns:
        for column, answer in t["answers"].items():
            assert deltas.get((t["turn"], column), "") == answer["text"]
            assert answer["first_token_s"] is not None and answer["first_token_s"] <= answer["seconds"] + 1e-3
            assert not answer["stopped"]


class StoppingReporter(MemoryReporter):
    """The control plane's reply asks to stop turn 1 once its first text has streamed."""

    def _send_events(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        reply = super()._send_events(batch)
        return {**reply, "stop_turn": 1 if any(e["kind"] == "output" for e in self.events) else 0}


def test_the_users_stop_ends_the_answers_early_and_the_session_goes_on(  # type: ignore[no-untyped-def]
    tiny_model_dir: Path, task_adapters: Adapters
) -> None:
    store, _ = task_adapters
    # The base (random weights) never stops by itself: it would write all 400 tokens.
    ask = [{"role": "user", "content": "Tell me a long story"}]
    reporter = StoppingReporter(turns=[turn(1, {BASE_KEY: ask}, max_new_tokens=400),
                                       turn(2, {BASE_KEY: ask}, max_new_tokens=4)])
    reporter.flush_interval = 0.0
    spec = chat_spec(tiny_model_dir, {})
    result = run_chat(spec, reporter, store)
    assert result is not None and result["turns"] == 2
    first, second = answered(reporter)
    stopped = first["answers"][BASE_KEY]
    assert stopped["stopped"] and 1 <= stopped["tokens"] < 400
    # 400 new tokens do not fit beside the message in the tiny model's 256 positions: they are capped, said so.
    assert any(line.startswith("Turn 1: at most ") and "256-token context" in line for line in reporter.logs)
    assert streamed(reporter)[(1, BASE_KEY)] == stopped["text"]
    # The next message is answered in full: a stop holds for its own turn only.
    assert not second["answers"][BASE_KEY]["stopped"] and second["answers"][BASE_KEY]["tokens"] == 4


def test_an_idle_session_releases_its_model(tiny_model_dir: Path, task_adapters: Adapters) -> None:
    store, uris = task_adapters
    reporter = MemoryReporter(turns=[])
    result = run_chat(chat_spec(tiny_model_dir, {"add": uris["add"]}, idle=1), reporter, store)
    assert result is not None and result["closed"] == "idle" and result["turns"] == 0
    assert reporter.states[-1][0] == "succeeded"
    assert any("Released after 1 s without a message" in e["message"] for e in reporter.events if e["kind"] == "chat")


def test_a_session_with_too_many_columns_is_refused(tiny_model_dir: Path, task_adapters: Adapters) -> None:
    store, uris = task_adapters
    spec = chat_spec(tiny_model_dir, {f"a{i}": uris["add"] for i in range(5)})
    reporter = MemoryReporter(turns=[])
    assert run_chat(spec, reporter, store) is None
    state, _, error = reporter.states[-1]
    assert state == "failed" and "at most 5 columns" in error


def test_a_conversation_longer_than_the_context_leaves_out_its_oldest_exchanges(  # type: ignore[no-untyped-def]
    tiny_model_dir: Path, task_adapters: Adapters
) -> None:
    store, uris = task_adapters
    # The tiny model holds 256 positions: ten earlier exchanges do not fit beside 16 new tokens.
    history = [{"role": "system", "content": "Be brief."}]
    for i in range(10):
        history += [{"role": "user", "content": f"What is {i} + {i}? Say it twice, then once more."},
                    {"role": "assistant", "content": f"{2 * i} {2 * i} {2 * i}"}]
    long = [*history, {"role": "user", "content": "What is 23 + 41?"}]
    huge = [{"role": "user", "content": " ".join(["seven"] * 400)}]
    reporter = MemoryReporter(turns=[turn(1, {"add": long}, max_new_tokens=16),
                                     turn(2, {"add": huge}, max_new_tokens=16),
                                     turn(3, {"add": [{"role": "user", "content": "What is 2 + 3?"}]})])
    result = run_chat(chat_spec(tiny_model_dir, {"add": uris["add"]}, include_base=False), reporter, store)
    assert result is not None and result["turns"] == 3, reporter.logs
    first, second, third = answered(reporter)
    left_out = [line for line in reporter.logs if line.startswith("Turn 1: the ")]
    assert left_out and "oldest exchanges left out to fit the model's 256-token context" in left_out[0]
    assert first["answers"]["add"]["first_token_s"] is not None and not first["answers"]["add"].get("error")
    assert "does not fit the model's 256-token context" in second["answers"]["add"]["error"]
    assert second["answers"]["add"]["text"] == ""
    assert third["answers"]["add"]["first_token_s"] is not None  # the session goes on
