"""Every adapter method of the engine, trained on CPU through the real runner, and its validation.

Runs are a few optimizer steps each: enough to move every adapter weight off its initial value, which is
what these tests assert (learning the task is test_train_runner's job).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from workers.contract.reporter import MemoryReporter
from workers.contract.spec import DatasetRef, LoraParams, ModelRef, TrainParams, TrainSpec
from workers.contract.store import ArtifactStore
from workers.training.demo import build_tiny_gpt2, write_toy_dataset
from workers.training.modelinfo import check_adapter, inspect_model, resolve_targets

LLAMA_MODULES = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:
    store = ArtifactStore(tmp_path_factory.mktemp("store"))
    write_toy_dataset(store.path("store://datasets/toy.jsonl"), count=64)
    return store


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")


def train(model_dir: Path, store: ArtifactStore, name: str, **lora: Any) -> tuple[Path, MemoryReporter]:
    """Four steps through workers.training.train.run_training; returns the adapter folder."""
    from workers.training.train import run_training

    spec = TrainSpec(
        run_id=1,
        attempt=1,
        base_model=ModelRef(source=str(model_dir)),
        dataset=DatasetRef(uri="store://datasets/toy.jsonl", format="alpaca"),
        lora=LoraParams(**{"dropout": 0.0, **lora}),
        train=TrainParams(
            learning_rate=2e-2, max_steps=4, batch_size=8, max_seq_length=48, warmup_ratio=0.0, logging_steps=1,
            gradient_checkpointing="off", save_steps=0,
        ),
        output_uri=f"store://runs/{name}/adapter",
    )
    assert LoraParams(**{"dropout": 0.0, **lora}).validate(spec.train) == {}
    base_digest = _digest(model_dir / "model.safetensors")
    reporter = MemoryReporter()
    result = run_training(spec, reporter, store)
    assert result is not None, reporter.states[-1]
    assert _digest(model_dir / "model.safetensors") == base_digest  # the run never writes into the base
    return store.path(result["adapter_uri"]), reporter


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def load_back(model_dir: Path, adapter_dir: Path, quantization: str = "none") -> Any:
    """The adapter on a freshly loaded base, with the base weights checked against the base's safetensors."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {}
    if quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, **kwargs), adapter_dir)
    if quantization == "none":
        base = _tensors(model_dir / "model.safetensors")
        checked = 0
        for name, param in model.get_base_model().named_parameters():
            key = name.replace(".base_layer", "")
            if key in base:
                assert torch.equal(param, base[key]), name
                checked += 1
        assert checked >= len(base) - 1  # all of them (a tied head is stored once)
    return model


def adapter_tensors(adapter_dir: Path, model_dir: Path) -> dict[str, Any]:
    tensors = _tensors(adapter_dir / "adapter_model.safetensors")
    base_keys = set(_tensors(model_dir / "model.safetensors"))
    assert tensors and not {k.removeprefix("base_model.model.") for k in tensors} & base_keys  # no base weight saved
    return tensors


def adapter_config(adapter_dir: Path) -> dict[str, Any]:
    return json.loads((adapter_dir / "adapter_config.json").read_text())


def lora_b_all_trained(tensors: dict[str, Any]) -> bool:
    """B starts at zero in every LoRA init tested here: a trained adapter has none left at zero."""
    bs = [t for k, t in tensors.items() if "lora_B" in k]
    return bool(bs) and all(t.abs().sum() > 0 for t in bs)


# --- the LoRA family ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "lora", "expected"),
    [
        ("lora", {}, {"use_dora": False, "use_rslora": False, "init_lora_weights": True}),
        ("dora", {"use_dora": True}, {"use_dora": True}),
        ("rslora", {"use_rslora": True}, {"use_rslora": True}),
        ("gaussian", {"init": "gaussian", "target_modules": ["attention"]}, {"init_lora_weights": "gaussian"}),
    ],
)
def test_lora_variants_train_and_load_back(
    tiny_model_dir: Path, store: ArtifactStore, name: str, lora: dict[str, Any], expected: dict[str, Any]
) -> None:
    adapter_dir, _ = train(tiny_model_dir, store, name, r=8, alpha=16, **lora)
    config = adapter_config(adapter_dir)
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert {k: config[k] for k in expected} == expected
    tensors = adapter_tensors(adapter_dir, tiny_model_dir)
    assert lora_b_all_trained(tensors)
    adapted = {k.split(".lora_B")[0].rsplit(".", 1)[-1] for k in tensors if "lora_B" in k}
    assert adapted == ({"q_proj", "k_proj", "v_proj", "o_proj"} if name == "gaussian" else set(LLAMA_MODULES))
    if name == "dora":
        assert any("lora_magnitude_vector" in k for k in tensors)
    load_back(tiny_model_dir, adapter_dir)


def test_8bit_base_trains_on_cpu(tiny_model_dir: Path, store: ArtifactStore) -> None:
    adapter_dir, reporter = train(tiny_model_dir, store, "int8", quantization="8bit", r=8, alpha=16)
    assert any("8-bit LLM.int8" in line for line in reporter.logs)
    assert lora_b_all_trained(adapter_tensors(adapter_dir, tiny_model_dir))
    load_back(tiny_model_dir, adapter_dir)


@pytest.fixture(scope="module")
def loftq_run(tiny_model_dir: Path, store: ArtifactStore) -> tuple[Path, MemoryReporter]:
    return train(tiny_model_dir, store, "loftq", quantization="4bit", init="loftq", r=8, alpha=8)


def test_loftq_on_the_4bit_base_trains_and_loads_on_the_4bit_base(
    tiny_model_dir: Path, loftq_run: tuple[Path, MemoryReporter]
) -> None:
    adapter_dir, reporter = loftq_run
    assert any("4-bit NF4" in line for line in reporter.logs)
    assert lora_b_all_trained(adapter_tensors(adapter_dir, tiny_model_dir))
    load_back(tiny_model_dir, adapter_dir, quantization="4bit")


def test_the_runner_applies_loftq(loftq_run: tuple[Path, MemoryReporter]) -> None:
    assert any(line.startswith("LoftQ:") for line in loftq_run[1].logs)


def test_the_runner_saves_pissa_as_a_plain_lora_of_twice_the_rank(tiny_model_dir: Path, store: ArtifactStore) -> None:
    adapter_dir, _ = train(tiny_model_dir, store, "pissa-hook", init="pissa", r=4, alpha=4)
    assert adapter_config(adapter_dir)["r"] == 8


def test_loftq_starts_the_4bit_base_closer_to_the_full_precision_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    import bitsandbytes as bnb
    import torch
    from peft import get_peft_model
    from peft.tuners.lora import Linear4bit
    from transformers import AutoModelForCausalLM

    from workers.training.peftsetup import build_peft_config, prepare_adapter, quantization_config

    lora = LoraParams(quantization="4bit", init="loftq", r=8, alpha=8)
    base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=quantization_config(lora, torch.float32), dtype=torch.float32
    )
    model = get_peft_model(base, build_peft_config(lora, base))
    lines = prepare_adapter(model, lora, ModelRef(source=str(tiny_model_dir)), tmp_path)
    assert lines and lines[0].startswith("LoftQ: 14 adapted layers")
    full = _tensors(tiny_model_dir / "model.safetensors")
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        weight = full[name.removeprefix("base_model.model.") + ".weight"]
        q = module.get_base_layer().weight
        dequantized = bnb.functional.dequantize_4bit(q.data, q.quant_state)
        delta = module.get_delta_weight("default")
        before = (weight - dequantized).norm()
        after = (weight - dequantized - delta).norm()
        assert after < 0.9 * before, (name, before, after)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_adapters_apply_to_the_original_base(tiny_model_dir: Path, tmp_path: Path, init: str) -> None:
    """They train on W - B0·A0; saved through save_adapter they are plain LoRAs that fit the unchanged base."""
    import torch
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from workers.training.peftsetup import build_peft_config, prepare_adapter, save_adapter

    lora = LoraParams(init=init, r=4, alpha=8, dropout=0.0, target_modules=["attention+mlp"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, build_peft_config(lora, base))
    prepare_adapter(model, lora, ModelRef(source=str(tiny_model_dir)), tmp_path / "work")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(8, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    save_adapter(model, lora, tmp_path / "adapter", tmp_path / "work")

    assert adapter_config(tmp_path / "adapter")["r"] == 8
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        original = fresh(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")(input_ids=ids).logits
    assert not torch.allclose(original, trained, atol=1e-3)
    torch.testing.assert_close(reloaded, trained, atol=1e-4, rtol=1e-4)


# --- IA3, prefix and prompt tuning --------------------------------------------------------------


def test_ia3_trains_its_vectors_with_the_mlp_as_feedforward(tiny_model_dir: Path, store: ArtifactStore) -> None:
    adapter_dir, _ = train(tiny_model_dir, store, "ia3", method="ia3", target_modules=["attention+mlp"])
    config = adapter_config(adapter_dir)
    assert config["peft_type"] == "IA3"
    assert set(config["feedforward_modules"]) == {"gate_proj", "up_proj", "down_proj"}
    tensors = adapter_tensors(adapter_dir, tiny_model_dir)
    vectors = [t for k, t in tensors.items() if "ia3_l" in k]
    assert len(vectors) == 14 and all(not bool((v == 1).all()) for v in vectors)  # IA3 starts at ones
    load_back(tiny_model_dir, adapter_dir)


def test_prefix_tuning_with_projection_trains(tiny_model_dir: Path, store: ArtifactStore) -> None:
    adapter_dir, reporter = train(
        tiny_model_dir, store, "prefix", method="prefix_tuning", num_virtual_tokens=8, prefix_projection=True,
        projection_hidden_size=32,
    )
    config = adapter_config(adapter_dir)
    assert config["peft_type"] == "PREFIX_TUNING" and config["prefix_projection"] is True
    assert config["num_virtual_tokens"] == 8 and config["encoder_hidden_size"] == 32
    # Saved are the projected key/value prefixes: 8 tokens x (2 layers x key and value x 2 kv heads x 16).
    (prefixes,) = adapter_tensors(adapter_dir, tiny_model_dir).values()
    assert tuple(prefixes.shape) == (8, 2 * 2 * 2 * 16)
    losses = [m["loss"] for m in reporter.metrics if "loss" in m]
    assert losses[-1] < losses[0] - 0.5
    load_back(tiny_model_dir, adapter_dir)


def test_prompt_tuning_starts_from_the_text_and_moves_away(tiny_model_dir: Path, store: ArtifactStore) -> None:
    from transformers import AutoTokenizer

    text = "What is the sum"
    adapter_dir, _ = train(
        tiny_model_dir, store, "prompt", method="prompt_tuning", num_virtual_tokens=8, prompt_init="text",
        prompt_init_text=text,
    )
    config = adapter_config(adapter_dir)
    assert config["peft_type"] == "PROMPT_TUNING" and config["prompt_tuning_init"] == "TEXT"
    (prompt,) = adapter_tensors(adapter_dir, tiny_model_dir).values()
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(text)["input_ids"]
    ids = (ids * 8)[:8]  # PEFT repeats the text's tokens to fill the virtual tokens
    start = _tensors(tiny_model_dir / "model.safetensors")["model.embed_tokens.weight"][ids]
    assert prompt.shape == start.shape
    assert 0 < (prompt - start).abs().max() < 1.0  # moved by training, from the text's embeddings
    load_back(tiny_model_dir, adapter_dir)


def test_prefix_tuning_refuses_gradient_checkpointing_before_training(tiny_model_dir: Path, store: ArtifactStore) -> None:
    from workers.training.train import run_training

    spec = TrainSpec(
        run_id=1, attempt=1, base_model=ModelRef(source=str(tiny_model_dir)),
        dataset=DatasetRef(uri="store://datasets/toy.jsonl", format="alpaca"),
        lora=LoraParams(method="prefix_tuning"),
        train=TrainParams(max_steps=1, gradient_checkpointing="on", save_steps=0),
        output_uri="store://runs/prefix-ckpt/adapter",
    )
    assert "gradient_checkpointing" in spec.lora.validate(spec.train)
    reporter = MemoryReporter()
    assert run_training(spec, reporter, store) is None
    error = reporter.states[-1][2]
    assert error.startswith("gradient_checkpointing: prefix tuning") and "Traceback" not in error


# --- GPT-2: Conv1D layers -----------------------------------------------------------------------


def test_gpt2_trains_its_own_conv1d_targets(tiny_gpt2_dir: Path, store: ArtifactStore) -> None:
    adapter_dir, _ = train(tiny_gpt2_dir, store, "gpt2", target_modules=["c_attn", "c_proj", "c_fc"], r=8, alpha=16)
    config = adapter_config(adapter_dir)
    assert set(config["target_modules"]) == {"c_attn", "c_proj", "c_fc"} and config["fan_in_fan_out"] is True
    tensors = adapter_tensors(adapter_dir, tiny_gpt2_dir)
    assert lora_b_all_trained(tensors)
    adapted = {k.split(".lora_B")[0].split(".h.")[1][2:] for k in tensors if "lora_B" in k}
    assert adapted == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    load_back(tiny_gpt2_dir, adapter_dir)


def test_gpt2_presets_tell_attention_c_proj_from_mlp_c_proj(tiny_gpt2_dir: Path) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from workers.training.peftsetup import build_peft_config

    def adapted(lora: LoraParams) -> set[str]:
        base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
        model = get_peft_model(base, build_peft_config(lora, base))
        return {n.split(".h.0.")[1] for n, m in model.named_modules() if ".h.0." in n and hasattr(m, "base_layer")}

    assert adapted(LoraParams(target_modules=["attention"])) == {"attn.c_attn", "attn.c_proj"}
    assert adapted(LoraParams(target_modules=["attention+mlp"])) == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    config = build_peft_config(LoraParams(method="ia3", target_modules=["attention+mlp"]), base)
    assert sorted(config.feedforward_modules) == ["mlp.c_fc", "mlp.c_proj"]


# --- validation ---------------------------------------------------------------------------------


def test_presets_resolve_per_family_from_meta_device_modules(tiny_model_dir: Path, tiny_gpt2_dir: Path) -> None:
    llama, gpt2 = inspect_model(str(tiny_model_dir)), inspect_model(str(tiny_gpt2_dir))
    assert (llama.family, gpt2.family) == ("llama", "gpt2")
    assert gpt2.linear_modules == ["c_attn", "c_fc", "c_proj"]
    assert llama.target_presets["attention"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert llama.target_presets["attention+mlp"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert gpt2.target_presets["attention"] == ["attn.c_attn", "attn.c_proj"]
    assert gpt2.target_presets["attention+mlp"] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert gpt2.target_presets["all-linear"] == ["c_attn", "c_fc", "c_proj"]
    bloom = ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
    assert resolve_targets(["attention"], bloom, "falcon") == ["query_key_value", "dense"]
    # An unknown model type is placed by its module names.
    assert resolve_targets(["attention"], ["c_attn", "c_fc", "c_proj"], "my_gpt") == ["attn.c_attn", "attn.c_proj"]


def test_unknown_targets_are_refused_with_the_valid_names(tiny_model_dir: Path, tiny_gpt2_dir: Path) -> None:
    info = inspect_model(str(tiny_gpt2_dir))
    errors = check_adapter(LoraParams(target_modules=["q_proj", "c_attn"]), info.linear_modules, info.model_type)
    assert errors == {"target_modules": "q_proj not found; the linear modules of this model are: c_attn, c_fc, c_proj"}
    errors = check_adapter(LoraParams(target_modules=["attention"]), ["fc_in", "fc_out", "qkv"], "mystery", model_name="m")
    assert "attention preset needs a known architecture" in errors["target_modules"]
    assert "the linear modules of m are: fc_in, fc_out, qkv" in errors["target_modules"]
    assert check_adapter(LoraParams(target_modules=["mlp.c_fc", "attn.c_proj"]), info.linear_modules, "gpt2") == {}


def test_dora_on_an_8bit_base_is_refused_on_cpu_only(tiny_model_dir: Path, store: ArtifactStore) -> None:
    """bitsandbytes' CPU int8 path loses the weight scales DoRA reads after one step (it trains on CUDA)."""
    from workers.training.train import run_training

    lora = LoraParams(use_dora=True, quantization="8bit")
    assert lora.validate() == {}  # nothing wrong with it on a GPU worker
    spec = TrainSpec(
        run_id=1, attempt=1, base_model=ModelRef(source=str(tiny_model_dir)),
        dataset=DatasetRef(uri="store://datasets/toy.jsonl", format="alpaca"), lora=lora,
        train=TrainParams(max_steps=1, gradient_checkpointing="off", save_steps=0),
        output_uri="store://runs/dora-int8/adapter",
    )
    reporter = MemoryReporter()
    assert run_training(spec, reporter, store) is None
    assert reporter.states[-1][2] == (
        "use_dora: DoRA on an 8-bit base does not train on CPU (it does on CUDA); use 4-bit or none here"
    )


def test_the_runner_refuses_a_module_to_save_that_does_not_exist(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from workers.contract.jobrunner import RunnerError
    from workers.training.peftsetup import build_peft_config

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert build_peft_config(LoraParams(modules_to_save=["lm_head"]), base).modules_to_save == ["lm_head"]
    with pytest.raises(RunnerError, match="modules_to_save: lm_heads not found"):
        build_peft_config(LoraParams(modules_to_save=["lm_heads"]), base)


@pytest.mark.parametrize(
    ("lora", "train", "field", "words"),
    [
        ({"r": 0}, None, "r", "between 1 and 1024"),
        ({"r": 2048}, None, "r", "between 1 and 1024"),
        ({"method": "vera"}, None, "method", "lora, ia3, prefix_tuning, prompt_tuning"),
        ({"method": "prefix_tuning"}, {"batching": "pack"}, "batching", "prepends virtual tokens"),
        ({"method": "prompt_tuning"}, {"batching": "padding_free"}, "batching", "use pad"),
        ({"method": "ia3", "target_modules": ["k_proj", "v_proj"], "feedforward_modules": ["down_proj"]}, None,
         "feedforward_modules", "down_proj not among the target modules"),
        ({"method": "lora", "feedforward_modules": ["down_proj"]}, None, "feedforward_modules", "IA3 only"),
        ({"init": "loftq"}, None, "init", "set quantization to 4bit"),
        ({"init": "loftq", "quantization": "8bit"}, None, "init", "set quantization to 4bit"),
        ({"init": "loftq", "quantization": "4bit", "r": 16, "alpha": 32}, None, "alpha", "alpha / r must be 1"),
        ({"init": "pissa", "quantization": "4bit"}, None, "init", "set quantization to none"),
        ({"init": "olora", "use_dora": True}, None, "init", "cannot be combined with DoRA"),
        ({"init": "orthogonal", "r": 7}, None, "r", "even rank"),
        ({"method": "ia3", "use_dora": True}, None, "use_dora", "LoRA only"),
        ({"method": "prompt_tuning", "bias": "all"}, None, "bias", "LoRA only"),
        ({"target_modules": ["attention", "q_proj"]}, None, "target_modules", "use it alone"),
        ({"target_modules": []}, None, "target_modules", "at least one module"),
        ({"method": "prompt_tuning", "prompt_init": "text"}, None, "prompt_init_text", "give the text"),
        ({"method": "prompt_tuning", "num_virtual_tokens": 0}, None, "num_virtual_tokens", "between 1"),
        ({"method": "prompt_tuning", "prefix_projection": True}, None, "prefix_projection", "prefix tuning only"),
        ({"quantization": "3bit"}, None, "quantization", "none, 8bit, 4bit"),
    ],
)
def test_validation_names_the_field_and_says_why(
    lora: dict[str, Any], train: dict[str, Any] | None, field: str, words: str
) -> None:
    errors = LoraParams(**lora).validate(TrainParams(**train) if train else None)
    assert field in errors and words in errors[field], errors


def test_ia3_feedforward_modules_are_checked_against_the_resolved_preset() -> None:
    lora = LoraParams(method="ia3", target_modules=["attention"], feedforward_modules=["down_proj"])
    assert lora.validate() == {}  # a preset is resolved with the model only
    errors = check_adapter(lora, LLAMA_MODULES, "llama")
    assert errors["feedforward_modules"].startswith("down_proj not among the targets (q_proj, k_proj, v_proj, o_proj)")


def test_virtual_tokens_count_against_the_model_positions() -> None:
    lora = LoraParams(method="prompt_tuning", num_virtual_tokens=40)
    errors = check_adapter(lora, LLAMA_MODULES, "llama", train=TrainParams(max_seq_length=230), max_positions=256)
    assert errors == {"num_virtual_tokens": "max_seq_length 230 + 40 virtual tokens exceeds the model's 256 positions"}


def test_every_field_has_a_default_and_a_one_line_help_text() -> None:
    for f in dataclasses.fields(LoraParams):
        help_text = f.metadata.get("help", "")
        assert help_text and "\n" not in help_text and len(help_text) < 200, f.name
    assert LoraParams().validate(TrainParams()) == {}
    assert LoraParams(method="prefix_tuning").validate(TrainParams()) == {}  # auto batching pads for it
