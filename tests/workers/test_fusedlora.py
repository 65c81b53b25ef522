"""Fused LoRA layers (workers/training/fusedlora.py) compute what PEFT's layers compute: the same outputs and the
same gradients for the input and both adapter matrices, on a torch Linear base and on a bitsandbytes 4-bit one,
with and without dropout; the layers it does not cover keep PEFT's own forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from workers.training.fusedlora import LoraLinear, fuse_lora, unfuse_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    return LlamaForCausalLM(config)


def with_lora(model, dropout: float = 0.0, **extra):  # type: ignore[no-untyped-def]
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS, **extra)
    peft_model = get_peft_model(model, config)
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give it values so every gradient path carries something
            torch.nn.init.normal_(param, std=0.02)
    return peft_model.train()


def loss_and_grads(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a: tuple, b: tuple, atol: float = 1e-6) -> None:  # type: ignore[type-arg]
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=1e-5)
    assert a[1].keys() == b[1].keys() and len(a[1]) >= 2 * 7 * 2  # A and B of 7 projections in 2 layers
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=atol, rtol=1e-4, msg=name)


def test_fused_layers_give_peft_s_loss_and_gradients_on_a_linear_base() -> None:
    model = with_lora(tiny_llama())
    ids = torch.randint(0, 100, (2, 24))
    plain = loss_and_grads(model, ids)
    assert fuse_lora(model) == 2 * 7
    outputs: list[torch.Tensor] = []
    model.base_model.model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: outputs.append(o))
    fused = loss_and_grads(model, ids)
    assert outputs[0].grad_fn is not None and "LoraLinear" in type(outputs[0].grad_fn).__name__  # the fused path ran
    assert_same(plain, fused)
    unfuse_lora(model)
    assert_same(plain, loss_and_grads(model, ids))


def test_fused_layers_give_peft_s_gradients_on_a_4bit_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_llama().save_pretrained(tmp_path / "tiny")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", quantization_config=quant, dtype=torch.float32,
                                                device_map={"": "cpu"})  # on the CPU even where a GPU is present
    for param in base.parameters():
        param.requires_grad_(False)
    base.enable_input_require_grads()  # gradients flow through the 4-bit layers to the input, as in training
    model = with_lora(base)
    ids = torch.randint(0, 100, (2, 24))
    plain = loss_and_grads(model, ids)
    assert fuse_lora(model) == 0  # on the CPU bitsandbytes' own 4-bit matmul is faster: left to PEFT
    monkeypatch.setattr("workers.training.fusedlora.fusable_base", lambda base: True)  # the GPU's choice, here
    assert fuse_lora(model) == 2 * 7
    assert_same(plain, loss_and_grads(model, ids), atol=1e-5)


def test_dropout_masks_the_adapter_input_and_its_gradient_alike() -> None:
    torch.manual_seed(3)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    base = torch.nn.Linear(16, 8, dtype=torch.float64).requires_grad_(False)
    p, scaling = 0.3, 2.0
    torch.manual_seed(11)
    fused = LoraLinear.apply(x, a, b, base, scaling, p)
    upstream = torch.randn_like(fused)
    fused_grads = torch.autograd.grad(fused, (x, a, b), upstream)

    torch.manual_seed(11)  # the fused function's first draw is its mask
    mask = torch.empty(15, 16, dtype=torch.bool).bernoulli_(1 - p).reshape(3, 5, 16)
    reference = base(x) + ((x * mask / (1 - p)) @ a.t() @ b.t()) * scaling
    torch.testing.assert_close(fused, reference)
    assert 0 < int(mask.sum()) < mask.numel()
    for got, want in zip(fused_grads, torch.autograd.grad(reference, (x, a, b), upstream), strict=True):
        torch.testing.assert_close(got, want)


def test_what_the_fused_path_does_not_cover_keeps_peft_s_forward() -> None:
    ids = torch.randint(0, 100, (1, 12))
    dora = with_lora(tiny_llama(), use_dora=True)
    fuse_lora(dora)
    dora_plain = with_lora(tiny_llama(), use_dora=True)
    assert_same(loss_and_grads(dora_plain, ids), loss_and_grads(dora, ids))

    model = with_lora(tiny_llama())
    fuse_lora(model)
    assert fuse_lora(model) == 0  # already fused: nothing wrapped twice
    with torch.no_grad():  # inference (generation, a reference forward) takes PEFT's path, bitsandbytes' gemv
        fused_eval = model(input_ids=ids).logits
        with model.disable_adapter():
            base_only = model(input_ids=ids).logits
    unfuse_lora(model)
    with torch.no_grad():
        assert torch.equal(fused_eval, model(input_ids=ids).logits)
        assert not torch.equal(fused_eval, base_only)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_layers_match_peft_under_bf16_autocast_on_the_gpu(tmp_path: Path) -> None:
    tiny_llama().save_pretrained(tmp_path / "tiny")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", quantization_config=quant, dtype=torch.bfloat16,
                                                device_map={"": 0})
    for param in base.parameters():
        param.requires_grad_(False)
    base.enable_input_require_grads()
    model = with_lora(base)
    ids = torch.randint(0, 100, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = loss_and_grads(model, ids)
        fuse_lora(model)
        fused = loss_and_grads(model, ids)
    torch.testing.assert_close(plain[0], fused[0], atol=2e-2, rtol=1e-2)
    for name in plain[1]:
        cosine = torch.nn.functional.cosine_similarity(plain[1][name].flatten().float(),
                                                       fused[1][name].flatten().float(), dim=0)
        assert cosine > 0.99, (name, float(cosine))
