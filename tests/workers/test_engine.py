"""The execution plan: how the runner resolves its switches for a device (no GPU needed)."""

from __future__ import annotations

import pytest

from workers.contract.spec import LoraParams, TrainParams
from workers.training.engine import Plan, PlanError, check_switches, limit_checkpointed_layers, resolve_plan

GiB = 2**30


def linear_estimator(base: float, per_row_layer: float):  # type: ignore[no-untyped-def]
    """Peak = base + activations of the non-recomputed layers (per row per layer) + a little per recomputed one."""

    def estimate(plan: Plan) -> int:
        kept = plan.num_layers - plan.checkpoint_layers
        return int(base + plan.micro_batch * (kept * per_row_layer + plan.checkpoint_layers * per_row_layer * 0.05))

    return estimate


def plan_for(train: TrainParams, estimator=None, device: str = "cuda", gpu: int = 80 * GiB) -> Plan:  # type: ignore[no-untyped-def]
    return resolve_plan(
        train, LoraParams(), device=device, dtype="bfloat16", num_layers=32, gpu_total_bytes=gpu, estimator=estimator
    )


@pytest.fixture
def on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the kernels exist, so the plan logic can be checked on a CPU machine."""
    monkeypatch.setattr("workers.training.engine.varlen_available", lambda: True)
    monkeypatch.setattr("workers.training.engine.liger_available", lambda: True)


def test_throughput_mode_drops_recomputation_when_the_run_fits(on_gpu: None) -> None:
    plan = plan_for(TrainParams(batch_size=4, max_seq_length=2048), linear_estimator(6 * GiB, 0.3 * GiB))
    assert (plan.batching, plan.attention, plan.liger) == ("pack", "varlen", True)
    assert plan.checkpoint_layers == 0 and (plan.micro_batch, plan.grad_accum) == (4, 1)


def test_throughput_mode_halves_the_micro_batch_before_recomputing(on_gpu: None) -> None:
    # 8 rows without recomputation need 6 + 8*32*0.3 = 82.8 GiB: too much; 4 rows need 44.4 GiB.
    plan = plan_for(TrainParams(batch_size=8, grad_accum=2, max_seq_length=2048), linear_estimator(6 * GiB, 0.3 * GiB))
    assert plan.checkpoint_layers == 0
    assert (plan.micro_batch, plan.grad_accum) == (4, 4)  # same 16 rows per optimizer step


def test_throughput_mode_runs_the_optimizer_step_in_fewer_larger_passes_where_the_gpu_has_room(on_gpu: None) -> None:
    estimator = linear_estimator(6 * GiB, 0.3 * GiB)  # 4 rows: 44.4 GiB, 8 rows: 82.8 GiB, 16 rows: 159.6 GiB
    asked = TrainParams(batch_size=4, grad_accum=4, max_seq_length=2048)
    h200 = plan_for(asked, estimator, gpu=141 * GiB)
    assert (h200.micro_batch, h200.grad_accum, h200.checkpoint_layers) == (8, 2, 0)  # 16 rows a step, as asked
    assert "micro-batch 8 x 2 for the 16 rows per optimizer step asked as 4 x 4" in h200.describe()
    assert "8 rows per pass fit in 83 GiB of 141 without recomputation" in h200.describe()
    h100 = plan_for(asked, estimator, gpu=80 * GiB)
    assert (h100.micro_batch, h100.grad_accum) == (4, 4)
    # Any divisor of the step's rows, not only powers of two.
    twelve = plan_for(TrainParams(batch_size=3, grad_accum=4, max_seq_length=2048), estimator, gpu=141 * GiB)
    assert (twelve.micro_batch, twelve.grad_accum) == (12, 1)  # 121 GiB of the 127 the plan may use
    # No pass over MAX_PASS_TOKENS: short rows on a huge GPU stop at 32k tokens per pass.
    short = plan_for(TrainParams(batch_size=8, grad_accum=32, max_seq_length=512), linear_estimator(GiB, 0.001 * GiB),
                     gpu=141 * GiB)
    assert short.micro_batch * 512 <= 32_768 and short.micro_batch * short.grad_accum == 256
    # GRPO keeps its micro-batch (its generation groups are sized by it); it only splits to avoid recomputing.
    grpo = plan_for(TrainParams(objective="grpo", batch_size=4, grad_accum=4, max_seq_length=2048), estimator,
                    gpu=141 * GiB)
    assert (grpo.micro_batch, grpo.grad_accum) == (4, 4)
    # KTO never goes below 2 rows a pass (its KL term pairs rows within a pass): it recomputes instead.
    kto = plan_for(TrainParams(objective="kto", batch_size=2, grad_accum=4, max_seq_length=2048),
                   linear_estimator(6 * GiB, 3 * GiB), gpu=141 * GiB)
    assert kto.micro_batch == 2 and kto.checkpoint_layers > 0


def test_small_budgets_run_larger_passes_with_every_layer_recomputed(on_gpu: None) -> None:
    from workers.training.engine import pass_cost

    # Measured on an H100 under a 24 GB budget: 16 passes of one 2,048-token row 5.35 s a step, 4 passes of 4 rows
    # with every layer recomputed 3.40 s. The cost model says the same order.
    assert pass_cost(4, 4 * 2048, 1.0) < pass_cost(16, 2048, 0.0)
    estimator = linear_estimator(6 * GiB, 0.3 * GiB)  # no recomputation: 1 row 15.6 GiB, 2 rows 25.2 GiB
    asked = TrainParams(batch_size=4, grad_accum=4, max_seq_length=2048)
    small = plan_for(asked, estimator, gpu=24 * GiB)
    assert (small.micro_batch, small.grad_accum, small.checkpoint_layers) == (4, 4, 32)  # 8,192 tokens a pass at most
    assert "micro-batch 4 x 4 with every layer recomputed" in small.describe()
    assert "passes of 2,048 tokens leave the GPU waiting" in small.describe()
    assert small.estimate_bytes is not None and small.estimate_bytes <= 0.9 * 24 * GiB
    # Rows of 4,096 tokens already make passes large enough: one a pass, nothing recomputed.
    long_rows = plan_for(TrainParams(batch_size=4, grad_accum=4, max_seq_length=4096), estimator, gpu=24 * GiB)
    assert (long_rows.micro_batch, long_rows.checkpoint_layers) == (1, 0)

    def only_one_row_fits(plan: Plan) -> int:
        return 15 * GiB if plan.micro_batch == 1 and plan.checkpoint_layers == 0 else 30 * GiB

    tight = plan_for(asked, only_one_row_fits, gpu=24 * GiB)
    assert (tight.micro_batch, tight.grad_accum, tight.checkpoint_layers) == (1, 16, 0)
    # A large GPU is unchanged: the passes that fit without recomputation are large.
    assert plan_for(asked, estimator, gpu=80 * GiB).checkpoint_layers == 0


def test_compile_auto_is_on_for_long_throughput_fine_tuning_only(on_gpu: None) -> None:
    from workers.training.engine import COMPILE_MIN_STEPS

    def plan(steps: int, device: str = "cuda", use_dora: bool = False, **train: object) -> Plan:
        return resolve_plan(TrainParams(**train), LoraParams(use_dora=use_dora), device=device, dtype="bfloat16",
                            num_layers=32, gpu_total_bytes=80 * GiB if device == "cuda" else 0, steps=steps)

    long, short = plan(COMPILE_MIN_STEPS + 80, use_dora=True), plan(50)  # DoRA: PEFT's own layers
    assert long.compile and f"compile on: {COMPILE_MIN_STEPS + 80} steps" in long.describe()
    fused = plan(COMPILE_MIN_STEPS + 80)  # plain LoRA trains through fused layers: compiling them is not measured
    assert fused.fused_lora and not fused.compile
    assert "compile off: not measured to pay with fused LoRA layers" in fused.describe()
    asked_on = plan(COMPILE_MIN_STEPS + 80, torch_compile="on")
    # Asked for: on, through PEFT's own layers (a compiled backward failed around the fused ones on a GPU).
    assert asked_on.compile and not asked_on.fused_lora
    assert "LoRA layers: PEFT's (the fused ones do not compile)" in asked_on.describe()
    assert not short.compile and f"50 steps do not pay for compiling (from {COMPILE_MIN_STEPS})" in short.describe()
    assert not plan(0).compile  # unknown length: not worth the risk of a minute's compile
    assert not plan(5000, mode="memory").compile and not plan(5000, objective="dpo").compile
    assert not plan(5000, device="cpu").compile
    assert plan(50, torch_compile="on").compile and not plan(5000, torch_compile="off").compile
    asked = plan(50, torch_compile="on").describe()
    assert "compile on:" not in asked and "compile off:" not in asked  # asked for: nothing to explain


def test_stored_boolean_compile_settings_read_as_on_and_off() -> None:
    from workers.contract.spec import build

    assert build(TrainParams, {"torch_compile": True}).torch_compile == "on"
    assert build(TrainParams, {"torch_compile": False}).torch_compile == "off"
    assert "torch_compile" in TrainParams(torch_compile="sometimes").validate()


def test_throughput_mode_recomputes_as_few_layers_as_fit(on_gpu: None) -> None:
    # Even one row without recomputation needs 6 + 32*2.5 = 86 GiB: some layers must be recomputed.
    plan = plan_for(TrainParams(batch_size=1, max_seq_length=32768), linear_estimator(6 * GiB, 2.5 * GiB))
    assert 0 < plan.checkpoint_layers < 32
    assert plan.estimate_bytes is not None and plan.estimate_bytes <= 0.9 * 80 * GiB
    fewer = plan.checkpoint_layers - 1
    assert linear_estimator(6 * GiB, 2.5 * GiB)(Plan(**{**plan.as_dict(), "checkpoint_layers": fewer})) > 0.9 * 80 * GiB


def test_memory_mode_recomputes_every_layer_offloads_and_runs_4k_token_passes(on_gpu: None) -> None:
    plan = plan_for(TrainParams(mode="memory", batch_size=4, max_seq_length=2048), linear_estimator(6 * GiB, 0.3 * GiB))
    assert plan.checkpoint_layers == 32 and plan.activation_offload
    assert (plan.micro_batch, plan.grad_accum) == (2, 2)


def test_explicit_switches_are_kept(on_gpu: None) -> None:
    plan = plan_for(TrainParams(gradient_checkpointing="on", attention="sdpa", liger_kernels="off", batching="pad"))
    assert plan.checkpoint_layers == 32 and plan.attention == "sdpa" and not plan.liger and plan.batching == "pad"


def test_cpu_plan_is_plain_and_gpu_only_switches_are_refused() -> None:
    plan = plan_for(TrainParams(), device="cpu", gpu=0)
    assert (plan.batching, plan.attention, plan.checkpoint_layers, plan.liger) == ("pad", "sdpa", 0, False)
    with pytest.raises(PlanError, match="attention: varlen needs a CUDA GPU"):
        plan_for(TrainParams(attention="varlen", batching="pack"), device="cpu", gpu=0)
    with pytest.raises(PlanError, match="liger_kernels"):
        plan_for(TrainParams(liger_kernels="on"), device="cpu", gpu=0)


def test_combinations_refused_on_any_device_name_the_field() -> None:
    assert "attention" in check_switches(TrainParams(attention="varlen", batching="pad"), LoraParams())
    assert "activation_offload" in check_switches(
        TrainParams(activation_offload="on", gradient_checkpointing="off"), LoraParams()
    )
    assert check_switches(TrainParams(), LoraParams()) == {}


def test_only_the_chosen_decoder_layers_recompute(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    from workers.training.engine import decoder_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    limit_checkpointed_layers(model, 1)
    assert [layer.gradient_checkpointing for layer in decoder_layers(model)] == [True, False]


def test_tiled_mlp_gives_the_same_loss_and_gradients() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from workers.training.engine import tile_mlp

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    plain, tiled = LlamaForCausalLM(config), LlamaForCausalLM(config)
    tiled.load_state_dict(plain.state_dict())
    tiled.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tile_mlp(tiled, 16)
    ids = torch.randint(0, 100, (1, 70))  # 5 tiles, the last one short
    for model in (plain, tiled):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    for a, b in zip(plain.parameters(), tiled.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


def test_prefix_tuning_never_recomputes_and_refuses_checkpointing(on_gpu: None) -> None:
    lora = LoraParams(method="prefix_tuning")
    plan = resolve_plan(TrainParams(mode="memory"), lora, device="cuda", dtype="bfloat16", num_layers=32)
    assert plan.checkpoint_layers == 0 and plan.batching == "pad" and not plan.activation_offload
    assert "gradient_checkpointing" in lora.validate(TrainParams(gradient_checkpointing="on"))


def test_heads_wider_than_flash_attention_takes_get_sdpa_or_a_clear_refusal(on_gpu: None) -> None:
    wide = {"device": "cuda", "dtype": "bfloat16", "num_layers": 12, "head_dim": 512}
    assert resolve_plan(TrainParams(), LoraParams(), **wide).attention == "sdpa"  # auto: packed rows, sdpa
    assert resolve_plan(TrainParams(), LoraParams(), **{**wide, "head_dim": 128}).attention == "varlen"
    with pytest.raises(PlanError) as refused:
        resolve_plan(TrainParams(attention="varlen"), LoraParams(), **wide)
    assert refused.value.field == "attention" and "512" in str(refused.value) and "256" in str(refused.value)
