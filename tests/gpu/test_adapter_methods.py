"""On a CUDA GPU: LoftQ goes through PEFT's replace_lora_weights_loftq and matches the CPU path; DoRA trains on
an 8-bit base (refused on CPU only).

Skipped without a GPU (CI has none); run on a GPU machine with `python -m pytest tests/gpu`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_loftq_through_peft_on_cuda_equals_the_cpu_path(tiny_model_dir: Path, tmp_path: Path) -> None:
    import bitsandbytes as bnb
    from peft import get_peft_model
    from peft.tuners.lora import Linear4bit
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from workers.contract.spec import LoraParams, ModelRef
    from workers.training.peftsetup import _loftq_layer, build_peft_config, prepare_adapter, quantization_config

    lora = LoraParams(quantization="4bit", init="loftq", r=8, alpha=8)
    base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=quantization_config(lora, torch.bfloat16), dtype=torch.bfloat16,
        device_map={"": 0},
    )
    model = get_peft_model(base, build_peft_config(lora, base))
    prepare_adapter(model, lora, ModelRef(source=str(tiny_model_dir)), tmp_path)
    full = load_file(str(tiny_model_dir / "model.safetensors"))
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        weight = full[name.removeprefix("base_model.model.") + ".weight"]
        q = module.get_base_layer().weight
        error = weight.cuda().float() - bnb.functional.dequantize_4bit(q.data, q.quant_state).float()
        by_peft = module.get_delta_weight("default").float()
        assert (error - by_peft).norm() < error.norm(), name
        _loftq_layer(module, weight)
        torch.testing.assert_close(module.get_delta_weight("default").float(), by_peft, rtol=1e-4, atol=1e-5)


def test_dora_trains_on_an_8bit_base_on_cuda(tiny_model_dir: Path) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from workers.contract.spec import LoraParams
    from workers.training.peftsetup import build_peft_config, quantization_config

    lora = LoraParams(quantization="8bit", use_dora=True, r=8, alpha=16)
    base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=quantization_config(lora, torch.bfloat16), dtype=torch.bfloat16,
        device_map={"": 0},
    )
    model = get_peft_model(base, build_peft_config(lora, base))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(8, 300, (4, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
