"""Static KV cache and compiled decode step (workers.generation.engine.plan_decoding): the same greedy answers as
the dynamic cache, on the tiny random Llama in float32, for the base, stacked LoRA adapters and prompts of
different lengths (the static cache filled by prefill_by_length). No mocks, no network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from workers.adapters.inference import load_for_inference
from workers.contract.jobspecs import BASE_KEY, AdapterRef, GenerationParams, LoadParams
from workers.contract.spec import ModelRef
from workers.generation.engine import Decoding, encode_prompts, generate_token_grid, plan_decoding
from workers.generation.stops import stop_tokens
from workers.training.demo import double_rows, toy_rows

Adapters = tuple[Any, dict[str, str]]  # the task_adapters fixture: (store, {task: adapter URI})
Grid = dict[tuple[int, str], list[int]]
COLUMNS = [BASE_KEY, "add", "double"]
GREEDY = GenerationParams(max_new_tokens=10)


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from workers.contract.store import ArtifactStore

    store = ArtifactStore(tmp_path_factory.mktemp("static-store"))
    model, tokenizer, _ = load_for_inference(ModelRef(source=str(tiny_model_dir)), [], LoadParams(), store)
    return model, tokenizer


def prompts(tokenizer: Any) -> list[list[int]]:
    """12 chat prompts of 1 to 4 questions each: lengths far apart, so rows are left-padded."""
    texts = [r["instruction"] for r in toy_rows(12, seed=3001) + double_rows(12, seed=3002)]
    ids = encode_prompts(tokenizer, [" ".join(texts[i : i + 1 + i % 4]) for i in range(12)], chat_template=True)
    assert len({len(p) for p in ids}) > 3
    return ids


def grid(model: Any, tokenizer: Any, prompt_ids: list[list[int]], columns: list[str], **options: Any) -> Grid:
    return generate_token_grid(
        model, prompt_ids, columns, GREEDY, pad_token_id=tokenizer.pad_token_id, stops=stop_tokens(tokenizer, model),
        batch_size=6, **options,
    )  # fmt: skip


def test_the_cpu_plans_a_dynamic_cache_and_static_when_asked(adapted: tuple[Any, Any]) -> None:
    model, _ = adapted
    auto = plan_decoding(model, COLUMNS)
    assert (auto.static, auto.loop, auto.graphs, auto.compiled) == (True, True, False, False)
    assert auto.describe() == "static KV cache, Tunedeck's decode loop (each step run eagerly; CUDA graphs on GPUs only)"
    assert plan_decoding(model, COLUMNS, "graph") == auto
    mixed = plan_decoding(model, COLUMNS, stacked=False)
    assert mixed == Decoding(why="PEFT's mixed batches (adapter_names) go through generate()")
    assert mixed.describe() == "dynamic KV cache, eager decode step (PEFT's mixed batches (adapter_names) go through generate())"
    static = plan_decoding(model, COLUMNS, "static")
    assert (static.static, static.compiled) == (True, False)
    assert static.describe().startswith("static KV cache, eager decode step")
    assert plan_decoding(model, COLUMNS, "dynamic") == Decoding()
    sequential = plan_decoding(model, COLUMNS, "static", batched=False)
    assert sequential.why == "one column after another: every adapter switch would compile the step again"
    assert plan_decoding(model, COLUMNS, "static", stacked=False).why.startswith("PEFT's mixed batches")
    with pytest.raises(ValueError, match="cache must be one of auto, dynamic, static, graph"):
        plan_decoding(model, COLUMNS, "paged")


# prefill=True: the static cache filled by prefill_by_length; False: made by generate() over the padded prompts.
@pytest.mark.parametrize("prefill", [True, False])
def test_static_cache_gives_the_dynamic_cache_s_greedy_answers_on_the_base(
    base: tuple[Any, Any], prefill: bool
) -> None:
    model, tokenizer = base
    prompt_ids = prompts(tokenizer)
    dynamic = grid(model, tokenizer, prompt_ids, [BASE_KEY], cache="dynamic", prefill=prefill)
    static = grid(model, tokenizer, prompt_ids, [BASE_KEY], cache="static", prefill=prefill)
    assert static == dynamic
    # A job's calls share one cache length (its longest prompt's): the masked positions beyond change nothing.
    longer = Decoding(static=True, length=256)
    assert grid(model, tokenizer, prompt_ids, [BASE_KEY], cache=longer, prefill=prefill) == dynamic
    assert len({tuple(ids) for ids in dynamic.values()}) > 3, "the answers differ between prompts"


@pytest.mark.parametrize("prefill", [True, False])
def test_static_cache_gives_the_same_answers_with_two_stacked_adapters(adapted: tuple[Any, Any], prefill: bool) -> None:
    from workers.generation.stacked import can_stack

    model, tokenizer = adapted
    assert can_stack(model, COLUMNS)
    prompt_ids = prompts(tokenizer)
    dynamic = grid(model, tokenizer, prompt_ids, COLUMNS, cache="dynamic", prefill=prefill)
    static = grid(model, tokenizer, prompt_ids, COLUMNS, cache="static", prefill=prefill)
    sequential = grid(model, tokenizer, prompt_ids, COLUMNS, cache="static", batched=False, prefill=prefill)
    assert static == dynamic == sequential
    for a, b in ((BASE_KEY, "add"), ("add", "double")):  # one adapter on every row would show
        assert sum(static[(i, a)] != static[(i, b)] for i in range(len(prompt_ids))) >= len(prompt_ids) // 2


def test_the_prefill_fills_a_static_cache_with_the_dynamic_one_s_states(adapted: tuple[Any, Any]) -> None:
    import torch
    from transformers import StaticCache

    from workers.generation.prefill import can_prefill, prefill_by_length

    model, tokenizer = adapted
    rows = prompts(tokenizer)[:5]
    assert can_prefill(model, rows)
    width = max(len(r) for r in rows) - 1
    dynamic = prefill_by_length(model, rows, 1, tokenizer.pad_token_id)
    static = prefill_by_length(model, rows, 1, tokenizer.pad_token_id, max_cache_len=width + 20)
    assert isinstance(static, StaticCache) and int(static.get_seq_length()) == width == dynamic.get_seq_length()
    layers: list[tuple[Any, Any]] = list(zip(static.layers, dynamic.layers, strict=True))
    for fixed, grown in layers:
        assert fixed.keys.shape[2] == width + 20
        assert torch.equal(fixed.keys[:, :, :width], grown.keys)
        assert torch.equal(fixed.values[:, :, :width], grown.values)
        assert not fixed.keys[:, :, width:].any() and grown.keys.abs().sum() > 0


def test_a_compiled_decode_step_traces_the_stacked_layers_and_gives_the_same_answers(
    adapted: tuple[Any, Any],
) -> None:
    """torch.compile on the CPU (as transformers compiles the step on CUDA): the stacked LoRA forward is traced
    into the graph without a break, the answers do not change, and a second call reuses the compiled step."""
    import torch

    model, tokenizer = adapted
    prompt_ids = prompts(tokenizer)[:6]
    dynamic = grid(model, tokenizer, prompt_ids, COLUMNS, cache="dynamic")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = Decoding(static=True, compiled=True)
    assert grid(model, tokenizer, prompt_ids, COLUMNS, cache=compiled) == dynamic
    assert grid(model, tokenizer, prompt_ids, COLUMNS, cache=compiled) == dynamic
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # one graph, compiled once
    assert not counters["graph_break"], dict(counters["graph_break"])


class UnbuildableStep(Decoding):
    """A compiled decode step whose compiler cannot be found: a real torch.compile failure, at the first step."""

    def generate_options(self, device_type: str) -> dict[str, Any]:
        options = super().generate_options(device_type)
        options["compile_config"].backend = "no-such-backend"
        return options


def test_a_compiled_step_that_fails_falls_back_to_the_eager_path_with_the_same_answers(
    adapted: tuple[Any, Any],
) -> None:
    import torch

    model, tokenizer = adapted
    prompt_ids = prompts(tokenizer)[:6]
    dynamic = grid(model, tokenizer, prompt_ids, COLUMNS, cache="dynamic")
    torch._dynamo.reset()
    with pytest.warns(RuntimeWarning, match="compiled decode step failed.*dynamic KV cache and an eager step"):
        fallen = grid(model, tokenizer, prompt_ids, COLUMNS, cache=UnbuildableStep(static=True, compiled=True))
    assert fallen == dynamic


# --- 4-bit bases dequantized once -----------------------------------------------------------------------


def load_4bit(model_dir: Path, task_adapters: Adapters) -> tuple[Any, Any]:
    """The tiny base in NF4 with both adapters. On a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights at
    their first forward and then computes in bfloat16 whatever the compute dtype: that is turned off here, so
    that the 4-bit reference computes in float32 as the dequantized layers do."""
    from bitsandbytes.nn import Linear4bit

    store, uris = task_adapters
    refs = [AdapterRef(key=task, label=task, uri=uri) for task, uri in uris.items()]
    load = LoadParams(quantization="4bit")
    model, tokenizer, _ = load_for_inference(ModelRef(source=str(model_dir)), refs, load, store)
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model, tokenizer


def test_a_4bit_base_dequantized_once_gives_the_same_answers_and_stays_stackable(
    tiny_model_dir: Path, task_adapters: Adapters
) -> None:
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit
    from peft.tuners.lora import LoraLayer

    from workers.adapters.inference import dequantize_for_generation
    from workers.generation.stacked import can_stack

    model, tokenizer = load_4bit(tiny_model_dir, task_adapters)
    prompt_ids = prompts(tokenizer)
    stacked = grid(model, tokenizer, prompt_ids, COLUMNS)
    sequential = grid(model, tokenizer, prompt_ids, COLUMNS, batched=False)
    assert stacked == sequential
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = dequantize_4bit(q_proj.base_layer.weight.data, q_proj.base_layer.weight.quant_state)

    assert dequantize_for_generation(model).startswith("Kept 4-bit weights")  # the CPU's default
    assert dequantize_for_generation(model, force=False).startswith("Kept 4-bit weights")
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 14
    assert "bitsandbytes" in plan_decoding(model, COLUMNS, "static").why
    message = dequantize_for_generation(model, force=True)

    assert message == "Dequantized 288.0 KiB of 4-bit weights once into float32 (14 layers; on the CPU)"
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(lora_layers) == 14 and all(type(m.base_layer).__name__ == "DequantizedLinear" for m in lora_layers)
    assert torch.equal(q_proj.base_layer.weight, expected)
    assert getattr(model.get_base_model(), "hf_quantizer", None) is None  # transformers may compile the step now
    assert plan_decoding(model, COLUMNS, "static").why == "the decode step is compiled on CUDA only"
    assert can_stack(model, COLUMNS)
    assert grid(model, tokenizer, prompt_ids, COLUMNS) == stacked
    assert grid(model, tokenizer, prompt_ids, COLUMNS, batched=False) == stacked
    assert grid(model, tokenizer, prompt_ids, COLUMNS, cache="static") == stacked
    assert dequantize_for_generation(model, force=True) == ""  # nothing left to dequantize
    for a, b in ((BASE_KEY, "add"), ("add", "double")):
        assert sum(stacked[(i, a)] != stacked[(i, b)] for i in range(len(prompt_ids))) >= len(prompt_ids) // 2


def test_a_comparison_logs_its_4bit_weights_and_decoding(tiny_model_dir: Path, task_adapters: Adapters) -> None:
    from workers.adapters.generate import run_compare
    from workers.contract.jobspecs import CompareSpec, PromptRow
    from workers.contract.reporter import MemoryReporter

    store, uris = task_adapters
    spec = CompareSpec(
        job_id=1,
        attempt=1,
        base_model=ModelRef(source=str(tiny_model_dir)),
        adapters=[AdapterRef(key=task, label=task, uri=uri) for task, uri in uris.items()],
        prompts=[PromptRow(prompt=p) for p in ("Double 12", "What is 3 + 4?")],
        generation=GenerationParams(max_new_tokens=4),
        load=LoadParams(quantization="4bit"),
    )
    reporter = MemoryReporter()

    result = run_compare(spec, reporter, store)

    assert result is not None, reporter.states[-1]
    expected = "static KV cache, Tunedeck's decode loop (each step run eagerly; CUDA graphs on GPUs only)"
    assert result["decoding"] == expected and f"Decoding: {expected}" in reporter.logs
    assert result["base_weights"] == "Kept 4-bit weights (bitsandbytes' own 4-bit matmul on the CPU)"
    assert result["base_weights"] in reporter.logs


def test_4bit_weights_repacked_for_the_cpu_kernel_are_kept(tiny_model_dir: Path, task_adapters: Adapters) -> None:
    """bitsandbytes repacks 4-bit weights at their first CPU forward where the CPU has AVX512-BF16, rounding the
    block scales to bfloat16: the stored blocks are gone, so nothing is dequantized from them."""
    import torch
    from bitsandbytes.nn import Linear4bit

    from workers.adapters.inference import dequantize_for_generation

    store, _ = task_adapters
    model, _, _ = load_for_inference(ModelRef(source=str(tiny_model_dir)), [], LoadParams(quantization="4bit"), store)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 6]]))
    states = [m.weight.quant_state for m in model.modules() if isinstance(m, Linear4bit)]  # type: ignore[attr-defined]
    if not any(getattr(state, "packing_format_for_cpu", False) for state in states):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes keeps the blocks as stored")

    assert dequantize_for_generation(model, force=True).startswith("Kept 4-bit weights: bitsandbytes repacked them")
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 14
