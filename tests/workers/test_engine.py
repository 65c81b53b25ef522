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
