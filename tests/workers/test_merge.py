"""The merge and combine runners with real PEFT adapters on tiny random models (no mocks, no network).

The `task_adapters` fixture trains two LoRA adapters of the tiny Llama: "add" and "double" (r=8, alpha=16).
Other adapters are made here with get_peft_model and init_lora_weights=False, so that B is not zero.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from workers.adapters.merge import verify
from workers.adapters.merge.combine import run_combine
from workers.adapters.merge.job import run_merge
from workers.adapters.merge.lora import LoraFile
from workers.adapters.merge.stream import peft_merge, stream_merge, write_companions
from workers.adapters.merge.tolerance import TOLERANCES
from workers.adapters.merge.verify import verify_merge
from workers.contract.jobspecs import COMBINATIONS, DENSITY_COMBINATIONS, AdapterRef, CombineSpec, MergeSpec
from workers.contract.reporter import MemoryReporter
from workers.contract.spec import ModelRef
from workers.contract.store import ArtifactStore, sha256_of
from workers.training.demo import build_tiny_gpt2, build_tiny_llama


@pytest.fixture(scope="module")
def store(task_adapters, tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:  # type: ignore[no-untyped-def]
    """A store of this module's own, holding copies of the two task adapters at store://adapters/<task>."""
    source, uris = task_adapters
    store = ArtifactStore(tmp_path_factory.mktemp("merge-store"))
    for task, uri in uris.items():
        shutil.copytree(source.path(uri), store.path(f"store://adapters/{task}"))
    return store


def ref(task: str, r: int = 8, **extra: Any) -> AdapterRef:
    adapter = AdapterRef(key=task, label=f"{task} adapter", uri=f"store://adapters/{task}", r=r)
    for name, value in extra.items():  # fields the control plane may add (quantization of the training base)
        setattr(adapter, name, value)
    return adapter


def merge_spec(model_dir: Path, adapter: AdapterRef, output: str, **options: Any) -> MergeSpec:
    return MergeSpec(
        job_id=1, attempt=1, base_model=ModelRef(source=str(model_dir)), adapter=adapter, output_uri=output, **options
    )


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def peft_merged_state(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """PEFT's own merge of the adapter into the float32 base, as a state dict."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().state_dict()


def assert_same_weights(ours: dict[str, torch.Tensor], peft: dict[str, torch.Tensor]) -> float:
    """Every tensor of ours equals PEFT's to float32 rounding; returns the largest difference relative to |W|."""
    assert set(ours) <= set(peft), set(ours) - set(peft)
    worst = 0.0
    for name, tensor in ours.items():
        expected = peft[name]
        assert tensor.dtype == expected.dtype and tensor.shape == expected.shape, name
        diff = float((tensor - expected).abs().max()) / max(float(expected.abs().max()), 1e-12)
        assert diff <= 8 * torch.finfo(torch.float32).eps, (name, diff)
        worst = max(worst, diff)
    return worst


# --- merging the trained LoRA ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def merged(tiny_model_dir: Path, store: ArtifactStore) -> tuple[dict[str, Any], MemoryReporter]:
    """The "add" adapter merged in float32, in shards of at most 64 kB (the tiny model is ~450 kB)."""
    reporter = MemoryReporter()
    spec = merge_spec(tiny_model_dir, ref("add"), "store://merged/add", dtype="float32", max_shard_size="64KB")
    result = run_merge(spec, reporter, store)
    assert result is not None, reporter.states[-1]
    return result, reporter


def test_a_lora_merge_is_verified_against_the_adapter_on_its_base(
    merged: tuple[dict[str, Any], MemoryReporter], store: ArtifactStore
) -> None:
    result, reporter = merged
    assert [state for state, _, _ in reporter.states] == ["running", "succeeded"]
    assert result["method"] == "streamed" and result["dtype"] == "float32" and result["merged_weights"] == 14
    check = result["check"]
    assert result["verified"] is True and check["verified"] is True
    assert check["tolerance"]["rule"] == "fixed" and "fallback_reason" not in check["tolerance"]
    assert check["tolerance"]["max_abs"] == pytest.approx(TOLERANCES["float32"].max_rel * check["logit_scale"])
    assert check["exact_reference"] is None  # float32 is the exact computation: no second reference
    assert check["max_abs_logit_diff"] <= check["tolerance"]["max_abs"]
    assert check["mean_abs_logit_diff"] <= check["tolerance"]["mean_abs"]
    assert check["token_agreement"] == 1.0 and check["greedy_agreement"] == 1.0
    assert check["probes"] == 12  # six built-in prompts, plain and through the chat template
    # The adapter itself moves the logits far more than the merge does: the check compares like with like.
    assert check["adapter_effect"]["mean_abs_logit_diff"] > 1000 * check["mean_abs_logit_diff"]
    assert check["quantized_gap"] is None
    out = store.path(result["merged_uri"])
    assert result["sha256"] == sha256_of(out) and result["size_bytes"] > 0
    assert any(line.startswith("Check passed") for line in reporter.logs)


def test_the_merged_folder_loads_as_a_plain_model_and_answers_like_the_adapter(
    merged: tuple[dict[str, Any], MemoryReporter], store: ArtifactStore, tiny_model_dir: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = store.path(merged[0]["merged_uri"])
    assert {"config.json", "generation_config.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    model: Any = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.float32 and not any(n for n, _ in model.named_modules() if "lora" in n)
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), store.path("store://adapters/add")
    )
    prompt: Any = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 30?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        ours: Any = model.generate(**prompt, **kwargs)
        theirs: Any = adapted.generate(**prompt, **kwargs)
    assert torch.equal(ours, theirs)
    assert ours.shape[1] > prompt["input_ids"].shape[1]


def test_the_streamed_merge_equals_peft_merge_and_unload(
    merged: tuple[dict[str, Any], MemoryReporter], store: ArtifactStore, tiny_model_dir: Path
) -> None:
    ours = load_state(store.path(merged[0]["merged_uri"]))
    peft = peft_merged_state(tiny_model_dir, store.path("store://adapters/add"))
    assert set(ours) == set(peft)
    assert_same_weights(ours, peft)
    base = load_state(tiny_model_dir)
    changed = [name for name in ours if not torch.equal(ours[name], base[name])]
    assert len(changed) == 14 and all("proj" in name for name in changed)  # the adapted weights, nothing else


def test_small_shards_give_an_index_and_the_memory_figures_are_plausible(
    merged: tuple[dict[str, Any], MemoryReporter], store: ArtifactStore
) -> None:
    result = merged[0]
    out = store.path(result["merged_uri"])
    shards = sorted(out.glob("model-*.safetensors"))
    assert result["shards"] == len(shards) >= 5
    assert all(s.stat().st_size <= 64_000 + 1024 for s in shards if len(load_state_names(s)) > 1)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert result["peak_rss_scope"] == "merge"
    assert 0 < result["rss_at_start_bytes"] <= result["peak_rss_bytes"]
    # Merging a 450 kB model adds little: well under 64 MiB above where the merge started.
    assert result["peak_rss_bytes"] - result["rss_at_start_bytes"] < 64 * 2**20


def load_state_names(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return list(handle.keys())


def corrupted(good: Path, folder: Path, name: str, change: Any) -> Path:
    """A copy of the merged model in `good` with one tensor replaced by change(tensor)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(good, folder)
    shard = next(f for f in sorted(folder.glob("*.safetensors")) if name in load_state_names(f))
    tensors = load_file(shard)
    tensors[name] = change(tensors[name])
    save_file(tensors, shard, metadata={"format": "pt"})
    return folder


def test_a_corrupted_merge_is_flagged_and_a_rounding_sized_change_is_not(
    merged: tuple[dict[str, Any], MemoryReporter], store: ArtifactStore, tiny_model_dir: Path, tmp_path: Path
) -> None:
    good = store.path(merged[0]["merged_uri"])
    base = load_state(tiny_model_dir)
    adapter = store.path("store://adapters/add")

    def corrupt(tag: str, name: str, change: Any) -> Path:
        return corrupted(good, tmp_path / tag, name, change)

    # One layer's delta dropped: that weight is the base's again.
    weight = "model.layers.1.mlp.down_proj.weight"
    dropped = verify_merge(tiny_model_dir, adapter, corrupt("dropped", weight, lambda _: base[weight]), "float32")
    assert dropped["verified"] is False
    assert dropped["max_abs_logit_diff"] > dropped["tolerance"]["max_abs"]
    assert dropped["token_agreement"] < 1.0

    # A relative change of 1e-6 is float32 rounding noise: still verified.
    nudged = verify_merge(tiny_model_dir, adapter, corrupt("nudged", weight, lambda w: w * (1 + 1e-6)), "float32")
    assert nudged["verified"] is True and nudged["max_abs_logit_diff"] < dropped["max_abs_logit_diff"] / 100

    # NaN weights give NaN logits: not verified, and no figure pretends otherwise.
    broken = verify_merge(tiny_model_dir, adapter, corrupt("nan", weight, lambda w: w * float("nan")), "float32")
    assert broken["verified"] is False and broken["max_abs_logit_diff"] is None


# --- bfloat16: held to the dtype's own rounding noise ---------------------------------------------------------------


@pytest.fixture(scope="module")
def merged_bf16(tiny_model_dir: Path, store: ArtifactStore) -> tuple[dict[str, Any], MemoryReporter]:
    """The "add" adapter merged in bfloat16 into the float32 checkpoint."""
    reporter = MemoryReporter()
    spec = merge_spec(tiny_model_dir, ref("add"), "store://merged/add-bf16", dtype="bfloat16")
    result = run_merge(spec, reporter, store)
    assert result is not None, reporter.states[-1]
    return result, reporter


def test_a_bfloat16_merge_adds_no_error_beyond_bfloat16_rounding(
    merged_bf16: tuple[dict[str, Any], MemoryReporter],
) -> None:
    result, reporter = merged_bf16
    check = result["check"]
    assert result["dtype"] == "bfloat16" and result["method"] == "streamed"
    assert result["verified"] is True and check["verified"] is True
    tolerance, exact = check["tolerance"], check["exact_reference"]
    assert tolerance["rule"] == "noise_floor" and exact["dtype"] == "float32" and exact["error"] is None
    merged, low = exact["merged"], exact["low_precision_reference"]
    rule, scale = TOLERANCES["bfloat16"], check["logit_scale"]
    # The bounds: the bfloat16 reference's own distance from float32, times the margin, plus a small floor.
    assert tolerance["max_abs"] == pytest.approx(
        rule.max_margin * low["max_abs_logit_diff"] + rule.floor_max_rel * scale
    )
    assert tolerance["mean_abs"] == pytest.approx(
        rule.mean_margin * low["mean_abs_logit_diff"] + rule.floor_mean_rel * scale
    )
    assert merged["max_abs_logit_diff"] <= tolerance["max_abs"]
    assert merged["mean_abs_logit_diff"] <= tolerance["mean_abs"]
    # Rounding noise is real and of one size for both: the bfloat16 reference is itself off the exact result by
    # about as much as the merged model (mean ratio measured 0.92 here), and far more than the floor.
    assert low["mean_abs_logit_diff"] > 5 * tolerance["floor_mean_abs"]
    assert 0.5 < tolerance["merged_to_reference_mean"] < rule.mean_margin
    assert tolerance["merged_to_reference_mean"] == pytest.approx(
        merged["mean_abs_logit_diff"] / low["mean_abs_logit_diff"]
    )
    # The figures against the bfloat16 reference are kept (the web page shows them), as is the adapter's effect.
    assert 0 < check["max_abs_logit_diff"] < check["logit_scale"] and 0 < check["mean_abs_logit_diff"]
    assert 0.0 <= check["token_agreement"] <= 1.0 and 0.0 <= check["greedy_agreement"] <= 1.0
    assert check["adapter_effect"]["mean_abs_logit_diff"] > 50 * merged["mean_abs_logit_diff"]
    passed = [line for line in reporter.logs if line.startswith("Check passed")]
    assert len(passed) == 1 and "no error beyond bfloat16's own rounding" in passed[0] and "in float32" in passed[0]


def test_a_corrupted_bfloat16_merge_is_flagged_even_within_the_fixed_bound(
    merged_bf16: tuple[dict[str, Any], MemoryReporter], store: ArtifactStore, tiny_model_dir: Path, tmp_path: Path
) -> None:
    good = store.path(merged_bf16[0]["merged_uri"])
    adapter = store.path("store://adapters/add")
    base = load_state(tiny_model_dir)
    rule = TOLERANCES["bfloat16"]

    # One layer's delta dropped: that weight is the base's again.
    weight = "model.layers.1.mlp.down_proj.weight"
    folder = corrupted(good, tmp_path / "dropped", weight, lambda w: base[weight].to(w.dtype))
    dropped = verify_merge(tiny_model_dir, adapter, folder, "bfloat16")
    assert dropped["verified"] is False and dropped["tolerance"]["rule"] == "noise_floor"
    assert dropped["tolerance"]["merged_to_reference_mean"] > 5 * rule.mean_margin

    # The last layer's o_proj delta scaled by 1.1, merged exactly that way, then rounded to bfloat16.
    weight = "model.layers.1.self_attn.o_proj.weight"
    delta = LoraFile.read(adapter).modules[weight.removesuffix(".weight")].delta(transpose=False)
    folder = corrupted(good, tmp_path / "scaled", weight, lambda w: (base[weight] + 1.1 * delta).to(w.dtype))
    scaled = verify_merge(tiny_model_dir, adapter, folder, "bfloat16")
    assert scaled["verified"] is False
    exact = scaled["exact_reference"]
    assert exact["merged"]["mean_abs_logit_diff"] > scaled["tolerance"]["mean_abs"]
    assert scaled["tolerance"]["merged_to_reference_mean"] > 2 * rule.mean_margin
    # The fixed bound, a fraction of the logit scale, would have let this mean through.
    assert scaled["mean_abs_logit_diff"] < rule.mean_rel * scaled["logit_scale"] / 2


def test_without_room_for_the_float32_reference_the_fixed_bfloat16_bound_applies(
    merged_bf16: tuple[dict[str, Any], MemoryReporter],
    store: ArtifactStore,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    good = store.path(merged_bf16[0]["merged_uri"])
    adapter = store.path("store://adapters/add")
    monkeypatch.setattr(verify, "available_host_bytes", lambda: 2**18)  # the float32 model needs ~1 MiB
    check = verify_merge(tiny_model_dir, adapter, good, "bfloat16")
    tolerance = check["tolerance"]
    assert tolerance["rule"] == "fixed" and "available host memory is 0.2 MiB" in tolerance["fallback_reason"]
    assert check["exact_reference"] == {
        "dtype": "float32",
        "merged": None,
        "low_precision_reference": None,
        "error": tolerance["fallback_reason"],
    }
    assert tolerance["max_abs"] == pytest.approx(TOLERANCES["bfloat16"].max_rel * check["logit_scale"])
    assert check["verified"] is True  # the tiny model's bfloat16 noise is well inside the fixed bound
    # The same sequences as with the float32 reference (then its greedy tokens, here the bfloat16 reference's):
    # the figures against the bfloat16 reference are of the same size.
    assert check["mean_abs_logit_diff"] < 3 * merged_bf16[0]["check"]["mean_abs_logit_diff"]


def test_a_float32_reference_that_fails_to_load_falls_back_and_says_so(
    tiny_model_dir: Path, store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    load = verify._load_with_adapter

    def out_of_memory(ref: ModelRef, adapter_dir: Path, dtype: torch.dtype, *args: Any) -> Any:
        if dtype == torch.float32:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 28.00 GiB")
        return load(ref, adapter_dir, dtype, *args)

    monkeypatch.setattr(verify, "_load_with_adapter", out_of_memory)
    reporter = MemoryReporter()
    spec = merge_spec(tiny_model_dir, ref("add"), "store://merged/add-bf16-fallback", dtype="bfloat16")
    result = run_merge(spec, reporter, store)
    assert result is not None, reporter.states[-1]
    check = result["check"]
    assert check["tolerance"]["rule"] == "fixed" and result["verified"] is True
    assert "OutOfMemoryError: CUDA out of memory" in check["exact_reference"]["error"]
    assert check["adapter_effect"]["mean_abs_logit_diff"] > 0  # taken from the bfloat16 reference instead
    warning = next(line for line in reporter.logs if line.startswith("The float32 reference was not run"))
    assert "OutOfMemoryError" in warning and "fixed bfloat16 tolerance" in warning
    assert any(
        line.startswith("Check passed: the merged model matches the adapter on its base in bfloat16")
        for line in reporter.logs
    )


def test_a_qlora_adapter_merges_into_the_unquantized_base(tiny_model_dir: Path, store: ArtifactStore) -> None:
    from workers.contract.spec import DatasetRef, LoraParams, TrainSpec, suggest_train_params
    from workers.training.demo import write_toy_dataset
    from workers.training.train import run_training

    write_toy_dataset(store.path("store://datasets/add.jsonl"), task="add", seed=3)
    train = suggest_train_params(100_000)
    train.max_steps = 8
    spec = TrainSpec(
        run_id=7,
        attempt=1,
        base_model=ModelRef(source=str(tiny_model_dir)),
        dataset=DatasetRef(uri="store://datasets/add.jsonl", format="alpaca"),
        lora=LoraParams(dropout=0.0, r=8, alpha=16, quantization="4bit", quant_type="nf4"),
        train=train,
        output_uri="store://adapters/qlora",
    )
    trained = MemoryReporter()
    assert run_training(spec, trained, store) is not None, trained.states[-1]

    reporter = MemoryReporter()
    adapter = ref("qlora", quantization="4bit", quant_type="nf4")
    result = run_merge(merge_spec(tiny_model_dir, adapter, "store://merged/qlora"), reporter, store)
    assert result is not None, reporter.states[-1]
    assert result["dtype"] == "float32" and result["verified"] is True  # "auto": the checkpoint's own float32
    assert any("trained on a 4bit nf4 base" in line and "unquantized" in line for line in reporter.logs)
    gap = result["check"]["quantized_gap"]
    assert gap["quantization"] == "4bit nf4"
    # The 4-bit base is a different model: its gap is far above the merge's own error, and it is recorded.
    assert gap["max_abs_logit_diff"] > 100 * result["check"]["max_abs_logit_diff"]
    assert 0.0 <= gap["token_agreement"] <= 1.0 and 0.0 <= gap["greedy_agreement"] <= 1.0
    assert any("For information" in line for line in reporter.logs)


# --- adapters with every scaling and layer kind -------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Llama, a tiny GPT-2 (Conv1D layers) and a tiny Llama whose lm_head is tied to its embeddings."""
    root = tmp_path_factory.mktemp("merge-models")
    tied = build_tiny_llama(root / "tied")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tied)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    (tied / "model.safetensors").unlink()
    model.save_pretrained(tied)
    return {"llama": tiny_model_dir, "gpt2": build_tiny_gpt2(root / "gpt2"), "tied": tied}


CASES = {
    "rslora-rank-and-alpha-patterns": (
        "llama",
        {
            "r": 8,
            "lora_alpha": 16,
            "use_rslora": True,
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {"v_proj": 4},
            "alpha_pattern": {"down_proj": 5},
        },
    ),
    "dora": ("llama", {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["q_proj", "o_proj", "up_proj"]}),
    "gpt2-conv1d-dora": (
        "gpt2",
        {"r": 4, "lora_alpha": 8, "use_dora": True, "fan_in_fan_out": True, "target_modules": ["c_attn", "c_fc"]},
    ),
    "modules-to-save": (
        "llama",
        {"r": 4, "lora_alpha": 8, "target_modules": ["k_proj"], "modules_to_save": ["lm_head"]},
    ),
    "tied-embedding-lora": ("tied", {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]}),
}


def make_adapter(base_dir: Path, out: Path, **options: Any) -> Path:
    """An adapter with non-zero B (and, for DoRA and modules_to_save, weights moved off their initial values)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(init_lora_weights=False, **options)
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.mul_(0.1)
            elif "lora_magnitude_vector" in name or "modules_to_save" in name:
                param.mul_(1 + 0.5 * torch.rand_like(param))
    model.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_adapters_of_every_scaling_and_layer_kind_stream_merge_exactly(
    case: str, models: dict[str, Path], tmp_path: Path
) -> None:
    model_name, options = CASES[case]
    base = models[model_name]
    adapter = make_adapter(base, tmp_path / "adapter", **options)
    out = tmp_path / "merged"
    stats = stream_merge(base, adapter, out, "float32")
    write_companions(base, adapter, out)
    check = verify_merge(base, adapter, out, "float32")
    assert check["verified"] is True, check
    assert check["token_agreement"] == 1.0 and check["greedy_agreement"] == 1.0
    assert check["adapter_effect"]["max_abs_logit_diff"] > 100 * check["max_abs_logit_diff"]
    ours = load_state(out)
    if case == "tied-embedding-lora":
        # Adapter on base: LoRA changes the input embeddings only. The merge keeps lm_head as the base's.
        config = json.loads((out / "config.json").read_text())
        assert stats["untied"] is True and config["tie_word_embeddings"] is False
        base_embeddings = load_state(base)["model.embed_tokens.weight"]
        assert torch.equal(ours["lm_head.weight"], base_embeddings)
        assert not torch.equal(ours["model.embed_tokens.weight"], base_embeddings)
    else:
        assert stats["untied"] is False
        assert_same_weights(ours, peft_merged_state(base, adapter))


def test_an_adapter_the_stream_cannot_reproduce_is_merged_by_peft(
    models: dict[str, Path], store: ArtifactStore
) -> None:
    make_adapter(
        models["gpt2"],
        store.path("store://adapters/lora-bias"),
        r=4,
        lora_alpha=8,
        lora_bias=True,
        target_modules=["c_attn"],
        fan_in_fan_out=True,
    )
    reporter = MemoryReporter()
    spec = merge_spec(models["gpt2"], ref("lora-bias", r=4), "store://merged/lora-bias")
    result = run_merge(spec, reporter, store)
    assert result is not None, reporter.states[-1]
    assert result["method"] == "peft" and result["verified"] is True
    assert any(
        "cannot reproduce" in line and "lora_bias" in line and "merge_and_unload" in line for line in reporter.logs
    )


def test_host_memory_stays_near_one_shard_whatever_the_model_size(tmp_path: Path) -> None:
    """A 150 MB model in 4 MB shards: the stream's peak grows by a fraction of the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from workers.adapters.merge.memory import peak_rss_bytes, reset_peak_rss, rss_bytes

    base = build_tiny_llama(tmp_path / "mid", hidden_size=768, layers=8)
    model = AutoModelForCausalLM.from_pretrained(base)
    (base / "model.safetensors").unlink()
    model.save_pretrained(base, max_shard_size="4MB")
    get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", init_lora_weights=False)).save_pretrained(
        str(tmp_path / "adapter")
    )
    del model
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    assert size > 140e6

    def growth(merge: Any, out: str) -> int:
        assert reset_peak_rss()
        start = rss_bytes()
        merge(base, tmp_path / "adapter", tmp_path / out, "float32", "4MB")
        return peak_rss_bytes() - start

    streamed = growth(stream_merge, "streamed")
    growth(peft_merge, "peft")
    assert streamed < size / 4, (streamed, size)
    # PEFT's growth is not asserted: in a process whose heap holds what earlier tests freed, its allocations
    # reuse that memory and its peak barely moves. bench/merge_memory.py measures both in fresh processes.
    assert_same_weights(load_state(tmp_path / "streamed"), load_state(tmp_path / "peft"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_shard_size": "lots"}, "max_shard_size: 'lots' is not a size"),
        ({"dtype": "int8"}, "dtype: must be one of"),
        ({"adapter": AdapterRef(key="x", label="gone", uri="store://adapters/none")}, "'gone': no adapter_config.json"),
    ],
)
def test_an_invalid_merge_fails_with_a_readable_reason(
    change: dict[str, Any], message: str, tiny_model_dir: Path, store: ArtifactStore
) -> None:
    spec = merge_spec(tiny_model_dir, ref("add"), "store://merged/invalid")
    for name, value in change.items():
        setattr(spec, name, value)
    reporter = MemoryReporter()
    assert run_merge(spec, reporter, store) is None
    state, _, error = reporter.states[-1]
    assert state == "failed" and message in error and "Traceback" not in error


def test_an_adapter_of_another_base_or_method_is_refused(
    tiny_model_dir: Path, store: ArtifactStore, tmp_path: Path
) -> None:
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    narrow = build_tiny_llama(tmp_path / "narrow", hidden_size=32)
    make_adapter(narrow, store.path("store://adapters/narrow"), r=4, lora_alpha=8, target_modules=["q_proj"])
    ia3 = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    ia3.save_pretrained(str(store.path("store://adapters/ia3")))
    for adapter, message in (
        ("narrow", "has shape [32, 32] but the base's tensor is [64, 64]: the adapter was trained on another base"),
        ("ia3", "'ia3 adapter' is a IA3 adapter (adapter_config.json); only LoRA adapters are merged"),
    ):
        reporter = MemoryReporter()
        assert run_merge(merge_spec(tiny_model_dir, ref(adapter), f"store://merged/{adapter}"), reporter, store) is None
        assert reporter.states[-1][0] == "failed" and message in reporter.states[-1][2], reporter.states[-1][2]


# --- combining ---------------------------------------------------------------------------------------------------


def hand_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """ΔW = scaling · B @ A per adapted module, in float64, read straight from the adapter's files.

    scaling = alpha / r, or alpha / sqrt(r) with rsLoRA (the adapters here have no rank or alpha patterns).
    """
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert not config["rank_pattern"] and not config["alpha_pattern"]
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    deltas = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            b = tensors[f"{module}.lora_B.weight"]
            r = a.shape[0]
            scaling = config["lora_alpha"] / (r**0.5 if config["use_rslora"] else r)
            deltas[module] = scaling * (b.double() @ a.double())
    return deltas


def combine(
    tiny_model_dir: Path,
    store: ArtifactStore,
    kind: str,
    output: str,
    adapters: tuple[str, ...] = ("add", "double"),
    weights: tuple[float, ...] = (0.7, 0.3),
    ranks: tuple[int, ...] = (8, 8),
) -> tuple[dict[str, Any] | None, MemoryReporter]:
    spec = CombineSpec(
        job_id=2,
        attempt=1,
        base_model=ModelRef(source=str(tiny_model_dir)),
        adapters=[ref(a, r=r) for a, r in zip(adapters, ranks, strict=True)],
        weights=list(weights),
        combination_type=kind,
        output_uri=output,
        density=0.5 if kind in DENSITY_COMBINATIONS else None,
    )
    reporter = MemoryReporter()
    return run_combine(spec, reporter, store), reporter


def test_linear_is_exactly_the_weighted_sum_of_the_deltas(tiny_model_dir: Path, store: ArtifactStore) -> None:
    result, reporter = combine(tiny_model_dir, store, "linear", "store://combined/linear")
    assert result is not None, reporter.states[-1]
    assert result["combination_type"] == "linear" and result["peft_combination_type"] == "cat"
    assert result["r"] == 16 and result["weights"] == [0.7, 0.3]
    add, double = hand_deltas(store.path("store://adapters/add")), hand_deltas(store.path("store://adapters/double"))
    combined = hand_deltas(store.path(result["adapter_uri"]))
    assert set(combined) == set(add) == set(double) and len(combined) == 14
    for module, delta in combined.items():
        expected = 0.7 * add[module] + 0.3 * double[module]
        error = float((delta - expected).abs().max()) / float(expected.abs().max())
        assert error < 1e-6, (module, error)
    assert result["weighted_sum_rel_error"] < 1e-6
    assert 0 < result["trainable_params"] < result["total_params"]


def test_peft_factorwise_linear_is_not_the_weighted_sum(tiny_model_dir: Path, store: ArtifactStore) -> None:
    """Why Tunedeck's linear runs PEFT's cat: PEFT's linear sums √w-scaled A's and B's, adding cross terms."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), store.path("store://adapters/add"), adapter_name="first"
    )
    model.load_adapter(store.path("store://adapters/double"), adapter_name="second")
    model.add_weighted_adapter(["first", "second"], [0.7, 0.3], "peft_linear", combination_type="linear")
    add, double = hand_deltas(store.path("store://adapters/add")), hand_deltas(store.path("store://adapters/double"))
    layer: Any = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    expected = (
        0.7 * add["base_model.model.model.layers.0.self_attn.q_proj"]
        + 0.3 * double["base_model.model.model.layers.0.self_attn.q_proj"]
    )
    error = float((layer.get_delta_weight("peft_linear").double() - expected).abs().max()) / float(expected.abs().max())
    assert error > 0.05


@pytest.mark.parametrize("kind", COMBINATIONS)
def test_every_combination_type_gives_an_adapter_that_loads_on_the_base(
    kind: str, tiny_model_dir: Path, store: ArtifactStore
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, reporter = combine(tiny_model_dir, store, kind, f"store://combined/{kind}")
    assert result is not None, reporter.states[-1]
    expected_r = 16 if kind in ("linear", "cat") else 8
    assert result["r"] == expected_r and result["combination_type"] == kind
    folder = store.path(result["adapter_uri"])
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert result["sha256"] == sha256_of(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir) and config["r"] == expected_r
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, folder)(input_ids=ids).logits
    assert torch.isfinite(adapted).all() and (adapted - plain).abs().max() > 1e-3


def test_mixed_ranks_and_rslora_combine_exactly_with_linear_and_are_refused_where_ranks_must_match(
    tiny_model_dir: Path, store: ArtifactStore
) -> None:
    make_adapter(
        tiny_model_dir,
        store.path("store://adapters/small"),
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj"],
    )
    # The AdapterRefs leave r unknown (0): the ranks are read from the adapters' files.
    pair, ranks = ("small", "add"), (0, 0)
    result, reporter = combine(tiny_model_dir, store, "ties", "store://combined/mixed-ties", pair, ranks=ranks)
    assert result is None
    error = reporter.states[-1][2]
    assert "ties adds the adapters' A and B factors entry-wise" in error
    assert "'small adapter' r=4" in error and "'add adapter' r=8" in error

    # PEFT copies the first adapter's config (here rsLoRA) into the new one; the saved config must not rescale.
    result, reporter = combine(tiny_model_dir, store, "linear", "store://combined/mixed", pair, ranks=ranks)
    assert result is not None, reporter.states[-1]
    assert result["r"] == 12 and result["weighted_sum_rel_error"] < 1e-6
    folder = store.path(result["adapter_uri"])
    assert json.loads((folder / "adapter_config.json").read_text())["use_rslora"] is False
    small, add = hand_deltas(store.path("store://adapters/small")), hand_deltas(store.path("store://adapters/add"))
    combined = hand_deltas(folder)
    assert set(combined) == set(add) > set(small)
    for module, delta in combined.items():
        expected = 0.7 * small.get(module, torch.zeros_like(delta)) + 0.3 * add[module]
        assert float((delta - expected).abs().max()) <= 1e-6 * float(expected.abs().max()), module


def test_non_lora_and_dora_adapters_are_refused_naming_them(tiny_model_dir: Path, store: ArtifactStore) -> None:
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    ia3 = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        IA3Config(target_modules=["k_proj"], feedforward_modules=[]),
    )
    ia3.save_pretrained(str(store.path("store://adapters/ia3-combine")))
    make_adapter(
        tiny_model_dir,
        store.path("store://adapters/dora"),
        r=8,
        lora_alpha=16,
        use_dora=True,
        target_modules=["q_proj"],
    )
    result, reporter = combine(
        tiny_model_dir,
        store,
        "cat",
        "store://combined/refused",
        ("add", "ia3-combine", "dora"),
        (0.5, 0.3, 0.2),
        (8, 8, 8),
    )
    assert result is None
    error = reporter.states[-1][2]
    assert "'ia3-combine adapter' is a IA3 adapter, and only LoRA adapters can be combined" in error
    assert "'dora adapter' is a DoRA adapter" in error
    assert "add adapter" not in error
