"""Tunedeck's decode loop (workers.generation.decode): the answers of generate() with a dynamic cache, token for
token in float32 on the tiny random Llama — greedy and sampled, the base, stacked adapters, one column after
another, stops (EOS, stop strings, min_new_tokens), streaming and cancel. On CUDA the step is a CUDA graph
replay: the last test compares it with the eager loop there. No mocks, no network."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

from workers.contract.jobspecs import BASE_KEY, GenerationParams
from workers.generation.engine import encode_prompts, generate_token_grid, plan_decoding
from workers.generation.stops import Stop, Stops, stop_tokens
from workers.training.demo import double_rows, toy_rows

Adapters = tuple[Any, dict[str, str]]
Grid = dict[tuple[int, str], list[int]]
COLUMNS = [BASE_KEY, "add", "double"]


def prompts(tokenizer: Any, count: int = 12) -> list[list[int]]:
    """Chat prompts of 1 to 4 questions each: lengths far apart, so rows are left-padded."""
    texts = [r["instruction"] for r in toy_rows(12, seed=3001) + double_rows(12, seed=3002)]
    ids = encode_prompts(tokenizer, [" ".join(texts[i : i + 1 + i % 4]) for i in range(count)], chat_template=True)
    assert len({len(p) for p in ids}) > 2
    return ids


def grid(model: Any, tokenizer: Any, prompt_ids: list[list[int]], columns: list[str], cache: Any, **options: Any) -> Grid:
    options.setdefault("params", GenerationParams(max_new_tokens=12))
    options.setdefault("stops", stop_tokens(tokenizer, model))
    options.setdefault("batch_size", 5)
    return generate_token_grid(model, prompt_ids, columns, pad_token_id=tokenizer.pad_token_id, cache=cache, **options)


def test_greedy_answers_are_generate_s_for_the_base_stacked_adapters_and_one_column_at_a_time(
    adapted: tuple[Any, Any],
) -> None:
    model, tokenizer = adapted
    prompt_ids = prompts(tokenizer)
    assert plan_decoding(model, COLUMNS).loop
    dynamic = grid(model, tokenizer, prompt_ids, COLUMNS, "dynamic")
    loop = grid(model, tokenizer, prompt_ids, COLUMNS, "graph")
    sequential = grid(model, tokenizer, prompt_ids, COLUMNS, "graph", batched=False)
    base_only = grid(model, tokenizer, prompt_ids, [BASE_KEY], "graph")
    assert loop == dynamic == sequential
    assert base_only == {cell: ids for cell, ids in dynamic.items() if cell[1] == BASE_KEY}
    for a, b in ((BASE_KEY, "add"), ("add", "double")):  # one adapter on every row would show
        assert sum(loop[(i, a)] != loop[(i, b)] for i in range(len(prompt_ids))) >= len(prompt_ids) // 2
    # The trained adapters end their answers: rows stop at their turn end, at different steps.
    lengths = {len(ids) for cell, ids in loop.items() if cell[1] != BASE_KEY}
    assert len(lengths) > 1 and min(lengths) < 12


def test_sampled_answers_follow_the_seed_as_generate_s_do(adapted: tuple[Any, Any]) -> None:
    """Temperature and top-p as generate() applies them, drawing from the same generator in the same order:
    the same seed gives generate()'s samples; another seed other samples."""
    model, tokenizer = adapted
    prompt_ids = prompts(tokenizer, 6)
    sampled = GenerationParams(max_new_tokens=10, temperature=1.3, top_p=0.8, seed=7)
    dynamic = grid(model, tokenizer, prompt_ids, COLUMNS, "dynamic", params=sampled)
    loop = grid(model, tokenizer, prompt_ids, COLUMNS, "graph", params=sampled)
    assert loop == dynamic
    other = grid(model, tokenizer, prompt_ids, COLUMNS, "graph", params=GenerationParams(
        max_new_tokens=10, temperature=1.3, top_p=0.8, seed=8))  # fmt: skip
    assert other != loop
    greedy = grid(model, tokenizer, prompt_ids, COLUMNS, "graph", params=GenerationParams(max_new_tokens=10))
    assert greedy != loop


def test_stop_strings_and_min_new_tokens_end_rows_as_generate_does(adapted: tuple[Any, Any]) -> None:
    """A stop string (several tokens, matched on the text) and min_new_tokens holding back the EOS ids."""
    model, tokenizer = adapted
    prompt_ids = prompts(tokenizer, 8)
    plain = grid(model, tokenizer, prompt_ids, COLUMNS, "graph")
    # A string the answers do write: two tokens of the base's first answer, as text.
    text = tokenizer.decode(plain[(0, BASE_KEY)][3:5], skip_special_tokens=True)
    assert len(text) > 1
    stops = Stops([*stop_tokens(tokenizer, model).stops, Stop(text=text, token_id=None, why="test")], tokenizer)
    assert stops.criteria()
    for options in ({"stops": stops}, {"min_new_tokens": 6}):
        dynamic = grid(model, tokenizer, prompt_ids, COLUMNS, "dynamic", **options)
        loop = grid(model, tokenizer, prompt_ids, COLUMNS, "graph", **options)
        assert loop == dynamic
        assert loop != plain


def test_the_loop_streams_every_step_and_stops_when_cancelled(adapted: tuple[Any, Any]) -> None:
    model, tokenizer = adapted
    prompt_ids = prompts(tokenizer, 4)
    seen: list[int] = []
    full = grid(model, tokenizer, prompt_ids, COLUMNS, "graph", params=GenerationParams(max_new_tokens=9),
                min_new_tokens=9, batch_size=4, on_step=lambda cells, ids: seen.append(ids.shape[1]))  # fmt: skip
    assert seen == list(range(1, 10))  # one call: every step's ids so far
    assert all(len(ids) == 9 for ids in full.values())

    steps: list[int] = []
    cut = grid(model, tokenizer, prompt_ids, COLUMNS, "graph", params=GenerationParams(max_new_tokens=9),
               min_new_tokens=9, batch_size=4, on_step=lambda cells, ids: steps.append(ids.shape[1]),
               should_stop=lambda: len(steps) >= 3)  # fmt: skip
    assert all(len(ids) == 3 and ids == full[cell][:3] for cell, ids in cut.items())


def test_one_token_prompts_go_through_generate(adapted: tuple[Any, Any]) -> None:
    model, tokenizer = adapted
    prompt_ids = [[5], [7, 8, 9]]
    assert grid(model, tokenizer, prompt_ids, COLUMNS, "graph") == grid(model, tokenizer, prompt_ids, COLUMNS, "dynamic")


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="CUDA graphs need a CUDA GPU")
def test_on_cuda_the_step_is_a_graph_replay_with_the_eager_loop_s_answers(tiny_model_dir: Path) -> None:
    """The base alone and two random adapters stacked, in float32 on the GPU: the graph replays give the eager
    loop's greedy answers, and the loop says it ran as a graph."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.generation.decode import Sampling, decode_rows
    from workers.generation.engine import Decoding

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda().eval()
    rows = prompts(tokenizer, 8)
    sampling = Sampling(max_new_tokens=16, min_new_tokens=16)
    eager, how_eager = decode_rows(model, rows, 1, tokenizer.pad_token_id, sampling, [], 64, graphs=False)
    graphed, how = decode_rows(model, rows, 1, tokenizer.pad_token_id, sampling, [], 64, graphs=True)
    assert (how_eager, how) == ("eager", "graph")
    assert graphed == eager

    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, config, adapter_name="one")
    peft_model.add_adapter("two", config)
    columns = [BASE_KEY, "one", "two"]
    assert plan_decoding(peft_model, columns).graphs

    def run(graphs: bool) -> Grid:
        plan = Decoding(static=True, loop=True, graphs=graphs)
        with warnings.catch_warnings():  # a capture that fails falls back to eager steps: an error here
            warnings.filterwarnings("error", message="The decode step could not be captured")
            return grid(peft_model, tokenizer, rows, columns, plan, min_new_tokens=12)

    stacked = run(graphs=True)
    assert stacked == run(graphs=False)
    assert sum(stacked[(i, "one")] != stacked[(i, "two")] for i in range(len(rows))) >= len(rows) // 2
