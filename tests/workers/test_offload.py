"""Activation offloading with prefetch (workers/training/offload.py): the same gradients as keeping every activation,
each offloaded tensor copied once, the backward's copies started ahead, nothing kept after a backward."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pytest
import torch

from workers.training.offload import ActivationOffload


def _tiny_llama(dtype: torch.dtype, device: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, attn_implementation="eager")
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


def _batch(device: str, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 100, (2, 24), generator=generator).to(device)
    return {"input_ids": input_ids, "labels": input_ids}


def _grads(model: Any, batches: list[dict[str, torch.Tensor]],
           context: Callable[[], AbstractContextManager[Any]]) -> dict[str, torch.Tensor]:
    """Each batch's forward under a fresh `with` of the context and its backward inside it, as a training step runs,
    the gradients accumulated."""
    model.zero_grad(set_to_none=True)
    for batch in batches:
        with context():
            model(**batch).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    unequal = [name for name in want if not torch.equal(got[name], want[name])]
    assert not unequal, unequal


def test_offloaded_gradients_equal_the_plain_ones_with_saves_deduplicated_and_prefetched() -> None:
    model = _tiny_llama(torch.float32, "cpu")
    batch = _batch("cpu", 1)
    plain = _grads(model, [batch], nullcontext)
    offload = ActivationOffload(min_bytes=1, device="cpu")

    _assert_equal(_grads(model, [batch], lambda: offload), plain)
    stats = offload.stats
    assert stats["offloaded"] >= 3  # at least each checkpointed layer's input
    assert stats["offloaded_bytes"] >= 3 * 2 * 24 * 64 * 4
    assert stats["deduped"] > 0  # the final norm saves its float32 input twice (pow, then the scaling)
    assert stats["prefetched"] > 0
    assert offload.tracked == 0


def test_gradient_accumulation_passes_keep_nothing_between_backwards() -> None:
    model = _tiny_llama(torch.float32, "cpu")
    batches = [_batch("cpu", 1), _batch("cpu", 2)]
    plain = _grads(model, batches, nullcontext)
    offload = ActivationOffload(min_bytes=1, device="cpu")
    after_each: list[tuple[int, int]] = []

    def context() -> AbstractContextManager[Any]:
        after_each.append((offload.tracked, offload.stats["offloaded"]))
        return offload

    _assert_equal(_grads(model, batches, context), plain)
    after_each.append((offload.tracked, offload.stats["offloaded"]))
    assert [tracked for tracked, _ in after_each] == [0, 0, 0]
    per_pass = after_each[1][1]
    assert per_pass > 0 and after_each[2][1] == per_pass  # stats restart with each pass
    assert offload.totals["offloaded"] == 2 * per_pass
    assert offload.totals["prefetched"] > offload.stats["prefetched"] > 0


def test_small_tensors_and_weights_stay_where_they_are() -> None:
    torch.manual_seed(0)
    big = torch.randn(64, 64, requires_grad=True)  # 16 KiB
    small = torch.randn(8, requires_grad=True)  # 32 bytes
    weight = torch.nn.Parameter(torch.randn(64, 64))

    def loss() -> torch.Tensor:
        # mm saves big and the weight; mul saves big again and a contiguous view of the weight; sin saves small
        return torch.mm(big, weight).sum() + (big * weight.view(64, 64)).sum() + small.sin().sum()

    plain = torch.autograd.grad(loss(), [big, small, weight])
    offload = ActivationOffload(min_bytes=1024, device="cpu")
    with offload:
        out = loss()
    assert offload.stats["offloaded"] == 1  # big, once: its second save is deduplicated
    assert offload.stats["offloaded_bytes"] == big.nbytes
    assert offload.stats["deduped"] == 1
    got = torch.autograd.grad(out, [big, small, weight])
    assert all(torch.equal(g, p) for g, p in zip(got, plain, strict=True))
    assert offload.stats["resident"] == 2  # big is still alive here: both saves read it without a copy
    assert offload.tracked == 0


def test_a_tensor_saved_twice_and_freed_is_copied_back_once() -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 32, requires_grad=True)
    offload = ActivationOffload(min_bytes=1, device="cpu")
    with offload:
        out = x.exp().sin().sum()  # exp saves its output, sin saves it again; nothing else holds it
    (grad,) = torch.autograd.grad(out, x)
    assert torch.equal(grad, x.exp().cos() * x.exp())
    assert offload.stats == {"offloaded": 1, "offloaded_bytes": x.nbytes, "deduped": 1, "prefetched": 0,
                             "on_demand": 1, "resident": 0}
    assert offload.tracked == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offloaded_gradients_equal_the_plain_ones_on_cuda() -> None:
    model = _tiny_llama(torch.bfloat16, "cuda")
    batches = [_batch("cuda", 1), _batch("cuda", 2)]
    plain = _grads(model, batches, nullcontext)
    offload = ActivationOffload(min_bytes=1)

    _assert_equal(_grads(model, batches, lambda: offload), plain)
    torch.cuda.synchronize()
    assert offload.stats["offloaded"] >= 3
    assert offload.stats["prefetched"] > 0
    assert offload.tracked == 0
