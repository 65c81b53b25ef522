"""The compare runner and grid generation, with real PEFT adapters on the tiny random Llama (no mocks, no network).

The `task_adapters` fixture trains two LoRA adapters: "add" ('What is 23 + 41?' -> '64') and "double"
('Double 17' -> '34'). The prompts here come from fresh seeds.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from workers.demo import build_tiny_llama, double_rows, toy_rows
from workers.generate import (
    decode,
    encode_prompts,
    generate_grid,
    generate_token_grid,
    load_for_inference,
    run_compare,
)
from workers.jobspecs import BASE_KEY, AdapterRef, CompareSpec, GenerationParams, LoadParams, PromptRow
from workers.reporter import MemoryReporter
from workers.spec import ModelRef
from workers.store import ArtifactStore

Adapters = tuple[ArtifactStore, dict[str, str]]  # the task_adapters fixture: (store, {task: adapter URI})
Rows = list[dict[str, str]]
Grid = dict[tuple[int, str], list[int]]
Loaded = tuple[Any, Any]  # (model, tokenizer)

GREEDY = GenerationParams(max_new_tokens=8)
COLUMNS = [BASE_KEY, "add", "double"]


@pytest.fixture(scope="module")
def rows() -> Rows:
    """40 prompts of each task; `task` says which."""
    return [{**r, "task": "add"} for r in toy_rows(40, seed=1001)] + [
        {**r, "task": "double"} for r in double_rows(40, seed=1002)
    ]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path, task_adapters: Adapters) -> Loaded:
    store, uris = task_adapters
    refs = [AdapterRef(key=task, label=f"{task} adapter", uri=uri) for task, uri in uris.items()]
    model, tokenizer, device = load_for_inference(ModelRef(source=str(tiny_model_dir)), refs, LoadParams(), store)
    assert (device.kind, device.dtype_name) == ("cpu", "float32")
    return model, tokenizer


@pytest.fixture(scope="module")
def grids(loaded: Loaded, rows: Rows) -> dict[str, Grid]:
    """Greedy answers (token ids) of every prompt and column in batches of 32 prompts: batched with the adapters
    stacked per layer (the default), batched through PEFT's adapter_names, and one column after another."""
    model, tokenizer = loaded
    prompt_ids = encode_prompts(tokenizer, [r["instruction"] for r in rows], chat_template=True)
    modes: dict[str, dict[str, Any]] = {"batched": {}, "peft": {"stacked": False}, "sequential": {"batched": False}}
    return {
        mode: generate_token_grid(
            model, prompt_ids, COLUMNS, GREEDY, pad_token_id=tokenizer.pad_token_id, batch_size=32, **options
        )
        for mode, options in modes.items()
    }


@pytest.fixture(scope="module")
def answers(loaded: Loaded, grids: dict[str, Grid]) -> dict[tuple[int, str], str]:
    _, tokenizer = loaded
    return {cell: decode(tokenizer, ids) for cell, ids in grids["batched"].items()}


def answer_error(text: str, reference: str) -> int:
    """|answer - reference| for an answer that is a number; 100 (more than any numeric miss here) otherwise."""
    match = re.fullmatch(r"\s*(\d{1,4})\s*", text)
    return min(abs(int(match.group(1)) - int(reference)), 100) if match else 100


def test_each_adapter_answers_its_own_task_best(answers: dict[tuple[int, str], str], rows: Rows) -> None:
    grid = answers
    error: dict[tuple[str, str], float] = {}
    for task in ("add", "double"):
        indices = [i for i, r in enumerate(rows) if r["task"] == task]
        for column in COLUMNS:
            error[(task, column)] = sum(answer_error(grid[(i, column)], rows[i]["output"]) for i in indices) / len(
                indices
            )
    table = ", ".join(f"{task} prompts / {column}: {e:.1f}" for (task, column), e in error.items())
    for task in ("add", "double"):
        others = min(e for (t, column), e in error.items() if t == task and column != task)
        # The own adapter's mean error is well under every other column's (base: 100, no numbers at all).
        assert error[(task, task)] < 0.6 * others, f"mean absolute answer error: {table}"
    exact = sum(grid[(i, "double")].strip() == r["output"] for i, r in enumerate(rows) if r["task"] == "double")
    assert exact >= 20, f"the double adapter got {exact}/40 exactly right"


@pytest.mark.parametrize("batched", ["batched", "peft"])
def test_batched_and_sequential_greedy_answers_are_identical(
    grids: dict[str, Grid], rows: Rows, loaded: Loaded, batched: str
) -> None:
    from peft.tuners.lora import LoraLayer

    batched_ids, sequential = grids[batched], grids["sequential"]
    assert set(batched_ids) == set(sequential) == {(i, c) for i in range(len(rows)) for c in COLUMNS}
    differing = [cell for cell in batched_ids if batched_ids[cell] != sequential[cell]]
    assert differing == [], [(cell, batched_ids[cell], sequential[cell]) for cell in differing[:5]]
    # The columns really differ, so one adapter applied to every row would show.
    for a, b in ((BASE_KEY, "add"), (BASE_KEY, "double"), ("add", "double")):
        same = sum(batched_ids[(i, a)] == batched_ids[(i, b)] for i in range(len(rows)))
        assert same < len(rows) // 4, f"{a} and {b} agree on {same} of {len(rows)} prompts"
    model, _ = loaded
    assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, LoraLayer)), "layers restored"


def make_spec(model_dir: Path, adapters: list[AdapterRef], prompts: list[str], **options: Any) -> CompareSpec:
    return CompareSpec(
        job_id=1,
        attempt=1,
        base_model=ModelRef(source=str(model_dir)),
        adapters=adapters,
        prompts=[PromptRow(prompt=p) for p in prompts],
        **options,
    )


def task_refs(uris: dict[str, str]) -> list[AdapterRef]:
    return [AdapterRef(key=task, label=f"{task} adapter", uri=uri, r=8) for task, uri in uris.items()]


def streamed(reporter: MemoryReporter) -> dict[tuple[int, str], list[str]]:
    deltas: dict[tuple[int, str], list[str]] = defaultdict(list)
    for event in reporter.events:
        if event["kind"] == "output":
            deltas[(event["data"]["row"], event["data"]["column"])].append(event["data"]["text"])
    return deltas


def test_run_compare_streams_every_cell_and_reports_the_grid(
    tiny_model_dir: Path, task_adapters: Adapters, rows: Rows
) -> None:
    store, uris = task_adapters
    prompts = [r["instruction"] for r in rows[:3] + rows[40:43]]
    spec = make_spec(tiny_model_dir, task_refs(uris), prompts, generation=GREEDY, batch_size=4)
    reporter = MemoryReporter()
    reporter.flush_interval = 0.0  # every decode step sends its text: the events show the token-by-token stream

    result = run_compare(spec, reporter, store)

    assert result is not None, reporter.states[-1]
    assert [s for s, _, _ in reporter.states] == ["running", "succeeded"]
    assert result["mode"] == "batched" and result["columns"] == COLUMNS
    assert any(line.startswith("Batched") for line in reporter.logs)
    assert [(o["row"], o["column"]) for o in result["outputs"]] == [(i, c) for i in range(6) for c in COLUMNS]
    deltas = streamed(reporter)
    final = {(o["row"], o["column"]): o["text"] for o in result["outputs"]}
    assert set(deltas) <= set(final)
    assert {cell: "".join(deltas.get(cell, [])) for cell in final} == final
    assert max(len(parts) for parts in deltas.values()) > 1, "text came in one piece per cell, not as it appeared"
    assert all(o["tokens"] >= 1 for o in result["outputs"] if o["text"])
    assert result["generated_tokens"] >= sum(o["tokens"] for o in result["outputs"]) > 0
    assert result["tokens_per_s"] > 0 and (result["device"], result["dtype"]) == ("cpu", "float32")


def test_sampling_is_reproducible_with_its_seed(loaded: Loaded, rows: Rows) -> None:
    model, tokenizer = loaded
    prompts = [r["instruction"] for r in rows[::10]]

    def sample(seed: int) -> dict[tuple[int, str], str]:
        params = GenerationParams(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=seed)
        return generate_grid(model, tokenizer, prompts, COLUMNS, params)

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    assert first != generate_grid(model, tokenizer, prompts, COLUMNS, GREEDY)


def test_cancel_stops_generation(tiny_model_dir: Path, task_adapters: Adapters, rows: Rows) -> None:
    store, uris = task_adapters
    spec = make_spec(tiny_model_dir, task_refs(uris), [r["instruction"] for r in rows], generation=GREEDY, batch_size=8)
    reporter = MemoryReporter(cancel_after_events=20)
    reporter.flush_interval = 0.0

    assert run_compare(spec, reporter, store) is None

    assert [s for s, _, _ in reporter.states] == ["running", "cancelled"]
    rows_with_text = {row for row, _ in streamed(reporter)}
    assert 0 < len(rows_with_text) <= 8, "stopped within the first generate() call of 8 prompts"


def test_missing_adapter_folder_fails_naming_the_adapter(tiny_model_dir: Path, task_adapters: Adapters) -> None:
    store, uris = task_adapters
    missing = AdapterRef(key="gone", label="deleted run", uri="store://runs/999/attempt-1/adapter")
    reporter = MemoryReporter()

    assert run_compare(make_spec(tiny_model_dir, [*task_refs(uris), missing], ["Double 3"]), reporter, store) is None

    state, _, error = reporter.states[-1]
    assert state == "failed"
    assert "'deleted run'" in error and "store://runs/999/attempt-1/adapter" in error and "does not exist" in error


def test_adapter_of_another_base_fails_naming_the_adapter(
    tiny_model_dir: Path, task_adapters: Adapters, tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    store, uris = task_adapters
    other = AutoModelForCausalLM.from_pretrained(build_tiny_llama(tmp_path / "other", hidden_size=32))
    foreign = get_peft_model(other, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    foreign.save_pretrained(str(store.path("store://tests/foreign-adapter")))
    ref = AdapterRef(key="foreign", label="narrow model adapter", uri="store://tests/foreign-adapter")
    reporter = MemoryReporter()

    assert run_compare(make_spec(tiny_model_dir, [*task_refs(uris), ref], ["Double 3"]), reporter, store) is None

    state, _, error = reporter.states[-1]
    assert state == "failed"
    assert "'narrow model adapter'" in error and "does not fit the base" in error
    assert "size mismatch" in error and "another base model" in error


@pytest.fixture(scope="module")
def prompt_tuning_uri(tiny_model_dir: Path, task_adapters: Adapters) -> str:
    """An untrained prompt-tuning adapter (random virtual tokens) of the tiny model, saved in the store."""
    import torch
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    store, _ = task_adapters
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init="RANDOM"),
    )
    model.save_pretrained(str(store.path("store://tests/prompt-tuning")))
    return "store://tests/prompt-tuning"


def test_prompt_tuning_adapter_falls_back_to_sequential(
    tiny_model_dir: Path, task_adapters: Adapters, prompt_tuning_uri: str, rows: Rows
) -> None:
    store, _ = task_adapters
    ref = AdapterRef(key="soft", label="soft prompt", uri=prompt_tuning_uri, method="prompt_tuning")
    prompts = [r["instruction"] for r in rows[::8]]
    reporter = MemoryReporter()

    result = run_compare(make_spec(tiny_model_dir, [ref], prompts, generation=GREEDY), reporter, store)

    assert result is not None, reporter.states[-1]
    assert result["mode"] == "sequential"
    assert any("Sequential" in line and "soft prompt" in line for line in reporter.logs)
    texts = {(o["row"], o["column"]): o["text"] for o in result["outputs"]}
    base, _tokenizer, _ = load_for_inference(ModelRef(source=str(tiny_model_dir)), [], LoadParams(), store)
    plain = generate_grid(base, _tokenizer, prompts, [BASE_KEY], GREEDY)
    assert all(texts[(i, BASE_KEY)] == plain[(i, BASE_KEY)] for i in range(len(prompts))), "base column = plain base"
    assert sum(texts[(i, "soft")] != texts[(i, BASE_KEY)] for i in range(len(prompts))) >= len(prompts) // 2


def test_adapters_of_different_peft_types_fail_before_loading(
    tiny_model_dir: Path, task_adapters: Adapters, prompt_tuning_uri: str
) -> None:
    store, uris = task_adapters
    soft = AdapterRef(key="soft", label="soft prompt", uri=prompt_tuning_uri, method="prompt_tuning")
    reporter = MemoryReporter()

    assert run_compare(make_spec(tiny_model_dir, [*task_refs(uris), soft], ["Double 3"]), reporter, store) is None

    error = reporter.states[-1][2]
    assert "lora: add adapter, double adapter" in error and "prompt_tuning: soft prompt" in error


def test_invalid_spec_fails_with_field_named_problems(tiny_model_dir: Path, task_adapters: Adapters) -> None:
    store, uris = task_adapters
    spec = make_spec(tiny_model_dir, task_refs(uris), [], generation=GenerationParams(max_new_tokens=0))
    reporter = MemoryReporter()

    assert run_compare(spec, reporter, store) is None

    error = reporter.states[-1][2]
    assert "max_new_tokens: must be between 1 and 4096" in error and "prompts: the prompt set is empty" in error


def save_random_lora(model_dir: Path, store: ArtifactStore, uri: str, seed: int, **lora: Any) -> str:
    """A LoRA of the tiny model with random (non-zero) B, so that it changes the answers untrained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **lora)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(str(store.path(uri)))
    return uri


def test_stacked_adapters_of_other_ranks_and_targets_match_sequential(
    tiny_model_dir: Path, task_adapters: Adapters, rows: Rows
) -> None:
    store, uris = task_adapters
    narrow = save_random_lora(tiny_model_dir, store, "store://tests/r4-qv", 1, r=4, target_modules=["q_proj", "v_proj"])
    refs = [*task_refs(uris), AdapterRef(key="narrow", uri=narrow, r=4)]
    model, tokenizer, _ = load_for_inference(ModelRef(source=str(tiny_model_dir)), refs, LoadParams(), store)
    prompt_ids = encode_prompts(tokenizer, [r["instruction"] for r in rows[::4]], chat_template=True)
    # The base between adapters: the stacked rows are not one contiguous block (index_select / index_add_).
    columns = ["narrow", BASE_KEY, "add", "double"]

    def grid(**options: Any) -> Grid:
        return generate_token_grid(model, prompt_ids, columns, GREEDY, pad_token_id=tokenizer.pad_token_id, **options)

    stacked, sequential = grid(), grid(batched=False)
    assert stacked == sequential
    assert sum(stacked[(i, "narrow")] != stacked[(i, BASE_KEY)] for i in range(len(prompt_ids))) >= len(prompt_ids) // 2


def test_dora_adapter_falls_back_to_sequential(tiny_model_dir: Path, task_adapters: Adapters, rows: Rows) -> None:
    store, uris = task_adapters
    dora = save_random_lora(tiny_model_dir, store, "store://tests/dora", 2, r=8, use_dora=True)
    refs = [*task_refs(uris), AdapterRef(key="dora", label="DoRA run", uri=dora, r=8)]
    reporter = MemoryReporter()

    result = run_compare(make_spec(tiny_model_dir, refs, [r["instruction"] for r in rows[::10]]), reporter, store)

    assert result is not None, reporter.states[-1]
    assert result["mode"] == "sequential"
    assert any(line.startswith("Sequential") and "DoRA run: DoRA" in line for line in reporter.logs)


def test_a_4bit_base_is_batched_by_stacking_and_matches_sequential(
    tiny_model_dir: Path, task_adapters: Adapters, rows: Rows
) -> None:
    """QLoRA adapters are compared on the 4-bit base they were trained on: the stacked path covers bitsandbytes
    layers too (the base layer runs quantized, the deltas are added), with the same answers as one by one."""
    from workers.generate import stacked_lora

    store, uris = task_adapters
    refs = [AdapterRef(key=task, label=task, uri=uri) for task, uri in uris.items()]
    model, tokenizer, _ = load_for_inference(
        ModelRef(source=str(tiny_model_dir)), refs, LoadParams(quantization="4bit"), store
    )
    with stacked_lora(model, COLUMNS) as stacking:
        assert stacking is True
    prompts = [r["instruction"] for r in rows[::8]]
    batched = generate_grid(model, tokenizer, prompts, COLUMNS, GREEDY, batched=True)
    sequential = generate_grid(model, tokenizer, prompts, COLUMNS, GREEDY, batched=False)
    assert batched == sequential
    assert any(batched[(i, "add")] != batched[(i, BASE_KEY)] for i in range(len(prompts)))


# --- the prompts' pass by length buckets --------------------------------------------------------------


def brute_force_cost(lengths: list[int], step_cost: int) -> int:
    """The least cost over every split of the rows sorted by length (2^(n-1) splits)."""
    ordered = sorted(lengths)
    best = None
    for mask in range(2 ** (len(ordered) - 1)):
        cost, start = 0, 0
        for end in range(1, len(ordered) + 1):
            if end == len(ordered) or mask >> (end - 1) & 1:
                cost += (end - start) * ordered[end - 1] + step_cost
                start = end
        best = cost if best is None else min(best, cost)
    assert best is not None
    return best


@pytest.mark.parametrize("seed", range(6))
def test_length_buckets_cover_every_row_once_at_the_least_padding_cost(seed: int) -> None:
    import itertools
    import random

    from workers.generate import length_buckets

    rng = random.Random(seed)
    lengths = [rng.randint(2, 300) for _ in range(rng.randint(1, 11))]
    step_cost = rng.choice([0, 16, 256, 4096])
    buckets = length_buckets(lengths, step_cost)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    assert all(max(lengths[i] for i in a) <= min(lengths[i] for i in b) for a, b in itertools.pairwise(buckets))
    cost = sum(len(b) * max(lengths[i] for i in b) + step_cost for b in buckets)
    assert cost == brute_force_cost(lengths, step_cost)
    if step_cost == 0:
        assert all(len({lengths[i] for i in b}) == 1 for b in buckets)  # free calls: no padding at all


@pytest.mark.parametrize("batched", [True, False])
def test_the_prompts_pass_by_length_buckets_gives_the_same_answers_as_one_padded_pass(
    loaded: Loaded, rows: Rows, batched: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.generate as generate

    model, tokenizer = loaded
    # Prompts of very different lengths (1 to 6 questions) so that padding would be most of one padded pass.
    prompts = [" ".join(r["instruction"] for r in rows[i : i + 1 + i % 6]) for i in range(0, 48, 2)]
    prompt_ids = encode_prompts(tokenizer, prompts, chat_template=True)
    calls: list[int] = []
    original = generate.prefill_by_length
    monkeypatch.setattr(generate, "BUCKET_COST", 64)  # cheap calls: several buckets

    def counted(model: Any, rows: list[list[int]], columns: int, pad_token_id: int) -> Any:
        calls.append(len(generate.length_buckets([len(r) - 1 for r in rows[: len(rows) // columns]], 64 // columns)))
        return original(model, rows, columns, pad_token_id)

    monkeypatch.setattr(generate, "prefill_by_length", counted)

    def grid(prefill: bool) -> Grid:
        return generate_token_grid(
            model, prompt_ids, COLUMNS, GREEDY, pad_token_id=tokenizer.pad_token_id, batched=batched, prefill=prefill
        )

    padded = grid(prefill=False)
    assert calls == []
    bucketed = grid(prefill=True)
    assert calls and all(n > 1 for n in calls), calls
    assert bucketed == padded
    assert len({len(ids) for ids in prompt_ids}) > 4


def test_models_with_sliding_windows_or_single_length_prompts_are_not_prefilled(loaded: Loaded) -> None:
    from workers.generate import can_prefill

    model, _ = loaded
    assert can_prefill(model, [[1, 2, 3], [1, 2, 3, 4]])
    assert not can_prefill(model, [[1, 2, 3], [4, 5, 6]])  # one length: nothing to save
    assert not can_prefill(model, [[1], [1, 2, 3]])  # a one-token prompt has nothing to cache
    model.config.sliding_window = 4
    try:
        assert not can_prefill(model, [[1, 2, 3], [1, 2, 3, 4]])
    finally:
        model.config.sliding_window = None
