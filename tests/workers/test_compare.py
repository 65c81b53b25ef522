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

from workers.adapters.generate import run_compare
from workers.adapters.inference import load_for_inference
from workers.contract.jobspecs import BASE_KEY, AdapterRef, CompareSpec, GenerationParams, LoadParams, PromptRow
from workers.contract.reporter import MemoryReporter
from workers.contract.spec import ModelRef
from workers.contract.store import ArtifactStore
from workers.generation.engine import encode_prompts, generate_grid, generate_token_grid
from workers.generation.stops import END_OF_TURN, Stop, decode, stop_tokens
from workers.training.demo import build_tiny_llama, double_rows, toy_rows

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
    stops = stop_tokens(tokenizer, model)
    return {
        mode: generate_token_grid(
            model, prompt_ids, COLUMNS, GREEDY, pad_token_id=tokenizer.pad_token_id, stops=stops, batch_size=32, **options
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
        return generate_token_grid(
            model, prompt_ids, columns, GREEDY, pad_token_id=tokenizer.pad_token_id,
            stops=stop_tokens(tokenizer, model), **options,
        )  # fmt: skip

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
    from workers.generation.stacked import stacked_lora

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

    from workers.generation.prefill import length_buckets

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
    import workers.generation.decode as decode
    import workers.generation.engine as generate
    import workers.generation.prefill as prefill

    model, tokenizer = loaded
    # Prompts of very different lengths (1 to 6 questions) so that padding would be most of one padded pass.
    prompts = [" ".join(r["instruction"] for r in rows[i : i + 1 + i % 6]) for i in range(0, 48, 2)]
    prompt_ids = encode_prompts(tokenizer, prompts, chat_template=True)
    calls: list[int] = []
    original = generate.prefill_by_length
    monkeypatch.setattr(prefill, "BUCKET_COST", 64)  # cheap calls: several buckets

    def counted(model: Any, rows: list[list[int]], columns: int, pad_token_id: int, *static: Any) -> Any:
        calls.append(len(prefill.length_buckets([len(r) - 1 for r in rows[: len(rows) // columns]], 64 // columns)))
        return original(model, rows, columns, pad_token_id, *static)

    monkeypatch.setattr(generate, "prefill_by_length", counted)
    monkeypatch.setattr(decode, "prefill_by_length", counted)  # the decode loop's prefill

    def grid(prefill: bool) -> Grid:
        return generate_token_grid(
            model, prompt_ids, COLUMNS, GREEDY, pad_token_id=tokenizer.pad_token_id,
            stops=stop_tokens(tokenizer, model), batched=batched, prefill=prefill,
        )  # fmt: skip

    padded = grid(prefill=False)
    assert calls == []
    bucketed = grid(prefill=True)
    assert calls and all(n > 1 for n in calls), calls
    assert bucketed == padded
    assert len({len(ids) for ids in prompt_ids}) > 4


def test_models_with_sliding_windows_or_single_length_prompts_are_not_prefilled(loaded: Loaded) -> None:
    from workers.generation.prefill import can_prefill

    model, _ = loaded
    assert can_prefill(model, [[1, 2, 3], [1, 2, 3, 4]])
    assert not can_prefill(model, [[1, 2, 3], [4, 5, 6]])  # one length: nothing to save
    assert not can_prefill(model, [[1], [1, 2, 3]])  # a one-token prompt has nothing to cache
    model.config.sliding_window = 4
    try:
        assert not can_prefill(model, [[1, 2, 3], [1, 2, 3, 4]])
    finally:
        model.config.sliding_window = None


# --- where answers end ---------------------------------------------------------------------------------

ChatmlAdapter = tuple[Path, ArtifactStore, str]  # the chatml_adapter fixture: (model folder, store, adapter URI)


LLAMA3_TEMPLATE = (
    "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + "
    "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else "
    "m['role']) + '\\n' + m['content'] + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
OPEN_TEMPLATE = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n\\n' }}{% endfor %}"
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]


@pytest.mark.parametrize(
    ("template", "specials", "expected"),
    [
        # ChatML with its tokens (Qwen, and Tunedeck's fallback on a tokenizer that has them).
        ("fallback", CHATML_TOKENS, [("<|im_end|>", True, "end of turn"), ("</s>", True, "EOS")]),
        # The fallback on a tokenizer without them: a stop string of several tokens.
        ("fallback", [], [("<|im_end|>", False, "end of turn"), ("</s>", True, "EOS")]),
        (LLAMA3_TEMPLATE, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
         [("<|eot_id|>", True, "end of turn"), ("</s>", True, "EOS")]),
        (GEMMA_TEMPLATE, ["<start_of_turn>", "<end_of_turn>"],
         [("<end_of_turn>", True, "end of turn"), ("</s>", True, "EOS")]),
        ("demo", [], [("</s>", True, "EOS, end of turn")]),  # turns end with EOS itself
        (OPEN_TEMPLATE, [], [("</s>", True, "EOS")]),  # nothing but blank lines after an answer
        (None, [], [("</s>", True, "EOS")]),
    ],
)  # fmt: skip
def test_answers_stop_where_the_chat_template_ends_an_assistant_turn_and_at_eos(
    tmp_path: Path, template: str | None, specials: list[str], expected: list[tuple[str, bool, str]]
) -> None:
    from workers.data.prompts import FALLBACK_CHAT_TEMPLATE
    from workers.training.demo import CHAT_TEMPLATE, build_tokenizer

    template = {"fallback": FALLBACK_CHAT_TEMPLATE, "demo": CHAT_TEMPLATE}.get(template or "", template)
    tokenizer = build_tokenizer(tmp_path, chat_template=template, extra_special_tokens=specials)

    stops = stop_tokens(tokenizer)

    assert [(s.text, s.token_id is not None, s.why) for s in stops.stops] == expected
    assert stops.token_ids == [tokenizer.convert_tokens_to_ids(s.text) for s in stops.stops if s.token_id is not None]


def test_a_stop_string_is_cut_from_the_text_and_held_back_while_it_may_be_starting(tmp_path: Path) -> None:
    from workers.data.prompts import FALLBACK_CHAT_TEMPLATE
    from workers.training.demo import build_tokenizer

    tokenizer = build_tokenizer(tmp_path, chat_template=FALLBACK_CHAT_TEMPLATE)
    stops = stop_tokens(tokenizer)
    ids = tokenizer("48<|im_end|>\n8<|im_end|>", add_special_tokens=False)["input_ids"]
    assert len(tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]) > 1
    ended_at = next(k for k in range(len(ids) + 1) if "<|im_end|>" in tokenizer.decode(ids[:k]))

    assert stops.cut(ids) == ids[:ended_at]
    assert (stops.text(ids), stops.answer_tokens(ids)) == ("48", 2)
    assert stops.visible(ids[:4]) == ("48", False)  # '48<|' may be the start of the stop
    assert stops.visible(ids[:2] + tokenizer("<b", add_special_tokens=False)["input_ids"]) == ("48<b", False)
    assert stops.visible(ids) == ("48", True)
    eos = [*ids[:2], tokenizer.eos_token_id, *ids[2:]]
    assert (stops.cut(eos), stops.text(eos), stops.answer_tokens(eos)) == ([*ids[:2], tokenizer.eos_token_id], "48", 2)


def test_a_turn_end_that_is_an_added_but_not_special_token_is_left_out_of_the_text(tmp_path: Path) -> None:
    """A turn end may be an added token that is not a special one (get_added_vocab lists both): it still stops
    the answer, and it is no part of its text although decoding skips special tokens only."""
    from workers.training.demo import build_tokenizer

    template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    tokenizer = build_tokenizer(tmp_path, chat_template=template)
    tokenizer.add_tokens(["<|end|>"])
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert "<|end|>" not in tokenizer.all_special_tokens
    stops = stop_tokens(tokenizer)
    ids = tokenizer("Hello there<|end|> more", add_special_tokens=False)["input_ids"]
    answer = ids[: ids.index(end)]

    assert stops.stops[0] == Stop("<|end|>", end, END_OF_TURN)
    assert stops.cut(ids) == [*answer, end]
    assert (stops.text(ids), stops.answer_tokens(ids)) == ("Hello there", len(answer))
    assert stops.visible(ids) == ("Hello there", True)
    assert stops.visible(answer) == ("Hello there", False)


def greedy_until(model_dir: Path, store: ArtifactStore, uri: str, prompts: list[str], stop: list[int], new: int) -> list[list[int]]:
    """transformers + PEFT alone: greedy answers to each prompt (one at a time, no padding), told to stop at `stop`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(store.path(uri))).eval()
    answers = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
        answers.append(out[0, ids.shape[1] :].tolist())
    return answers


def test_a_chat_adapter_stops_at_the_token_that_ends_its_turn_not_at_eos(chatml_adapter: ChatmlAdapter) -> None:
    """ChatML ends an assistant turn with <|im_end|>, not EOS: an answer stops there instead of running on into
    new turns up to max_new_tokens (it came back as '48\\n8\\n4\\n\\n44'), and the job says where answers stop."""
    from transformers import AutoTokenizer

    model_dir, store, uri = chatml_adapter
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    end, eos = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id
    prompts = [r["instruction"] for r in double_rows(12, seed=2024)]
    spec = make_spec(model_dir, [AdapterRef(key="double", label="double adapter", uri=uri)], prompts,
                     generation=GenerationParams(max_new_tokens=12), include_base=False)  # fmt: skip
    reporter = MemoryReporter()
    reporter.flush_interval = 0.0

    result = run_compare(spec, reporter, store)

    assert result is not None, reporter.states[-1]
    texts = [o["text"] for o in result["outputs"]]
    assert all(re.fullmatch(r"\d{1,3}", text) for text in texts), texts
    # The same answers as transformers' own generate() told to stop at <|im_end|> and EOS, cut before the stop.
    expected = greedy_until(model_dir, store, uri, prompts, [end, eos], 12)
    assert all(ids[-1] == end for ids in expected), "the adapter ends its answers with <|im_end|>"
    assert texts == [decode(tokenizer, ids) for ids in expected]
    assert [o["tokens"] for o in result["outputs"]] == [len(ids) - 1 for ids in expected]
    assert {cell: "".join(parts) for cell, parts in streamed(reporter).items()} == {(i, "double"): t for i, t in enumerate(texts)}
    assert result["stop_tokens"] == [
        {"text": "<|im_end|>", "token_id": end, "why": "end of turn"},
        {"text": "</s>", "token_id": eos, "why": "EOS"},
    ]
    assert f"Answers stop at '<|im_end|>' (token {end}, end of turn), '</s>' (token {eos}, EOS)" in reporter.logs


def test_a_turn_end_of_several_tokens_is_cut_from_the_answer_as_it_streams(
    tiny_model_dir: Path, tmp_path: Path, rows: Rows
) -> None:
    """A template whose turn end is no single token here (workers.training.train's ChatML-style fallback on a tokenizer
    without <|im_end|>) stops on the text: the answer is cut before it, and no piece of it is ever streamed."""
    import shutil

    from workers.training.demo import CHAT_TEMPLATE

    store = ArtifactStore(tmp_path / "store")
    prompt = rows[0]["instruction"]
    base, tokenizer, _ = load_for_inference(ModelRef(source=str(tiny_model_dir)), [], LoadParams(), store)
    plain = generate_grid(base, tokenizer, [prompt], [BASE_KEY], GenerationParams(max_new_tokens=24))[(0, BASE_KEY)]
    # The base's own answer, and a template whose turns end with a piece of it (ASCII letters and digits only).
    start = next(i for i in range(2, len(plain) - 3) if plain[i : i + 3].isascii() and plain[i : i + 3].isalnum())
    closing = plain[start : start + 3]
    assert len(tokenizer(closing, add_special_tokens=False)["input_ids"]) > 1
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE.replace("'</s>'", f"'{closing}'"))
    reporter = MemoryReporter()
    reporter.flush_interval = 0.0

    result = run_compare(make_spec(model_dir, [], [prompt], generation=GenerationParams(max_new_tokens=24)), reporter, store)

    assert result is not None, reporter.states[-1]
    (output,) = result["outputs"]
    assert output["text"] == plain[: plain.index(closing)]
    assert "".join(streamed(reporter)[(0, BASE_KEY)]) == output["text"]
    assert result["stop_tokens"][0] == {"text": closing, "token_id": None, "why": "end of turn"}


def test_a_system_prompt_reaches_the_model_in_a_comparison(task_adapters: Adapters, loaded: Loaded) -> None:
    """A dataset row's prompt is its whole conversation before the answer (workers.data.prompts.prompt_row, as for
    evaluations): the system prompt goes through the chat template to the model, not the last user turn alone."""
    import torch

    from workers.data.datasets import to_trl_row
    from workers.data.prompts import prompt_row

    store, uris = task_adapters
    model, tokenizer = loaded
    turns = [
        {"role": "system", "content": "Answer in words, never in digits."},
        {"role": "user", "content": "Double 21"},
        {"role": "assistant", "content": "42"},
    ]
    row = prompt_row(to_trl_row("messages", {"messages": turns}))
    assert row == PromptRow("system: Answer in words, never in digits.\nuser: Double 21", "42", turns=turns[:2])
    spec = make_spec(Path(model.name_or_path), task_refs(uris), [], generation=GREEDY)
    spec.prompts = [row, PromptRow("Double 21")]

    result = run_compare(spec, MemoryReporter(), store)

    assert result is not None
    base = {o["row"]: o["text"] for o in result["outputs"] if o["column"] == BASE_KEY}

    def greedy(conversation: list[dict[str, str]]) -> str:  # transformers alone, on the base
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with model.disable_adapter():
            out = model.generate(ids, max_new_tokens=GREEDY.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        return decode(tokenizer, out[0, ids.shape[1] :].tolist())

    assert base == {0: greedy(turns[:2]), 1: greedy(turns[1:2])}
    assert base[0] != base[1], "the system prompt changes the answer"
