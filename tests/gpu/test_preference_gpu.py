"""On a CUDA GPU: DPO runs padding-free with varlen attention, scores pairs as the padded path does, and learns.

Skipped without a GPU (CI has none); run on a GPU machine with `python -m pytest tests/gpu`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _fused_model(tiny_model_dir: Path, attention: str) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention, dtype=torch.bfloat16)
    add_fused_lm_head(model)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian")
    return get_peft_model(model, config).to("cuda").eval()


def test_unpadded_varlen_scores_a_padded_batch_as_padded_sdpa_does(tiny_model_dir: Path) -> None:
    from workers.training.engine import VARLEN_ATTENTION, register_varlen_attention, varlen_available
    from workers.training.unpad import unpad_forward

    if not varlen_available():
        pytest.skip("varlen attention needs compute capability 8.0+ and PyTorch >= 2.10")
    register_varlen_attention()
    lengths = [40, 9, 23, 40, 2]
    torch.manual_seed(1)
    ids = torch.randint(3, 200, (len(lengths), max(lengths)), device="cuda")
    mask = (torch.arange(max(lengths), device="cuda") < torch.tensor(lengths, device="cuda")[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :1] = -100
    padded_model, varlen_model = _fused_model(tiny_model_dir, "sdpa"), _fused_model(tiny_model_dir, VARLEN_ATTENTION)
    unpad_forward(varlen_model)
    with torch.no_grad():
        padded = padded_model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        unpadded = varlen_model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    per_row = (padded.log_probs.float().sum(1), unpadded.log_probs.float().sum(1))
    torch.testing.assert_close(per_row[1], per_row[0], rtol=2e-2, atol=5e-2)


def test_qlora_dpo_on_the_gpu_runs_padding_free_and_learns(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.workers.test_dpo import dpo_spec, margins, write_rows
    from workers.contract.reporter import MemoryReporter
    from workers.contract.store import ArtifactStore
    from workers.training.demo import preference_rows
    from workers.training.train import run_training

    store = ArtifactStore(tmp_path / "store")
    write_rows(store.path("store://datasets/pairs.jsonl"), preference_rows(128, seed=0))
    spec = dpo_spec(tiny_model_dir)
    spec.lora.quantization = "4bit"
    reporter = MemoryReporter()
    result = run_training(spec, reporter, store)

    assert result is not None, reporter.states[-1]
    assert result["plan"]["batching"] == "padding_free" and result["plan"]["attention"] == "varlen", result["plan"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      store.path(result["adapter_uri"]))
    after = margins(tuned, tokenizer, preference_rows(64, seed=999))
    assert sum(m > 0 for m in after) / len(after) >= 0.8, after
