"""On a CUDA GPU: the varlen attention over packed rows equals per-example causal attention.

Skipped without a GPU (CI has none); run on a GPU machine with `python -m pytest tests/gpu`.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("kv_heads", [8, 2])
def test_packed_rows_attend_only_within_their_example(kv_heads: int) -> None:
    from workers.training.engine import _varlen_attention_forward, register_varlen_attention, varlen_available

    if not varlen_available():
        pytest.skip("torch.nn.attention.varlen is not available here")
    register_varlen_attention()
    torch.manual_seed(0)
    lengths = [5, 300, 17, 190]
    total, heads, dim = sum(lengths), 8, 64
    q = torch.randn(1, heads, total, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, kv_heads, total, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, kv_heads, total, dim, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    out, _ = _varlen_attention_forward(None, q, k, v, None, scaling=dim**-0.5, cu_seq_lens_q=cu, max_length_q=max(lengths))
    assert out.shape == (1, total, heads, dim)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], is_causal=True, enable_gqa=kv_heads != heads
        ).transpose(1, 2)
        torch.testing.assert_close(out[:, start:end], ref, atol=2e-2, rtol=2e-2)
