"""The export runner on the tiny Llama and real LoRA adapters (no mocks, no network): the folder Ollama imports."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from workers.adapters import ollama
from workers.adapters.export import run_export
from workers.contract.jobspecs import AdapterRef, ExportSpec
from workers.contract.reporter import MemoryReporter
from workers.contract.spec import ModelRef
from workers.contract.store import ArtifactStore
from workers.training.demo import build_tiny_llama


@pytest.fixture(scope="module")
def store(task_adapters, tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:  # type: ignore[no-untyped-def]
    source, uris = task_adapters
    store = ArtifactStore(tmp_path_factory.mktemp("export-store"))
    shutil.copytree(source.path(uris["add"]), store.path("store://adapters/add"))
    return store


def export_spec(model_dir: Path, output: str, uri: str = "store://adapters/add", **options: Any) -> ExportSpec:
    adapter = AdapterRef(key="add", label="add adapter", uri=uri, r=8)
    return ExportSpec(
        job_id=1, attempt=1, base_model=ModelRef(source=str(model_dir)), adapter=adapter, output_uri=output, **options
    )


def logs(reporter: MemoryReporter) -> str:
    return "\n".join(str(line) for line in reporter.logs)


def test_the_merged_form_is_a_checked_merge_with_a_modelfile_from_the_folder(
    tiny_model_dir: Path, store: ArtifactStore
) -> None:
    spec = export_spec(tiny_model_dir, "store://exports/merged", name="team/adder:v1", quantize="q4_K_M",
                       system="Add the numbers.", temperature=0.3)
    reporter = MemoryReporter()
    result = run_export(spec, reporter, store)
    assert result is not None, reporter.states[-1]
    folder = store.path("store://exports/merged")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "Modelfile", "README.md", "generation_config.json"} <= names
    assert any(n.endswith(".safetensors") for n in names) and any(n.startswith("tokenizer") for n in names)
    assert result["verified"] is True and result["form"] == "merged" and result["family"] == "zephyr"
    modelfile = (folder / "Modelfile").read_text()
    assert modelfile.startswith("FROM .\n") and "ADAPTER" not in modelfile
    assert f'TEMPLATE """{ollama.ZEPHYR}"""' in modelfile
    assert 'PARAMETER stop "</s>"' in modelfile and "PARAMETER temperature 0.3" in modelfile
    assert 'SYSTEM """Add the numbers."""' in modelfile and "top_p" not in modelfile
    readme = (folder / "README.md").read_text()
    assert "ollama create team/adder:v1 --quantize q4_K_M -f Modelfile" in readme and "ollama run team/adder:v1" in readme
    # The demo template looks like Zephyr's without being it: the log says where the two part.
    assert "render a probe conversation differently" in logs(reporter)
    assert result["size_bytes"] > 0 and len(result["sha256"]) == 64


def test_the_merged_model_answers_like_the_adapter(tiny_model_dir: Path, store: ArtifactStore) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert run_export(export_spec(tiny_model_dir, "store://exports/same", dtype="float32"), MemoryReporter(), store)
    merged = AutoModelForCausalLM.from_pretrained(store.path("store://exports/same"), dtype=torch.float32)
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), str(store.path("store://adapters/add"))
    )
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)


def test_a_chatml_adapter_gets_ollamas_chatml_template_and_its_turn_end_as_a_stop(chatml_adapter) -> None:  # type: ignore[no-untyped-def]
    model_dir, store, uri = chatml_adapter
    reporter = MemoryReporter()
    result = run_export(export_spec(model_dir, "store://exports/chatml", uri=uri, form="adapter",
                                    base_name="tiny-chatml:latest"), reporter, store)
    assert result is not None, reporter.states[-1]
    folder = store.path("store://exports/chatml")
    assert sorted(p.name for p in (folder / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    modelfile = (folder / "Modelfile").read_text()
    assert modelfile.startswith("FROM tiny-chatml:latest\nADAPTER ./adapter\n")
    assert f'TEMPLATE """{ollama.CHATML}"""' in modelfile
    assert result["stops"] == ["<|im_end|>", "</s>", "<|im_start|>"]
    assert "differently" not in logs(reporter)
    readme = (folder / "README.md").read_text()
    assert "ollama create tunedeck-model -f Modelfile" in readme and "Gemma" in readme


def test_a_base_without_a_chat_template_gets_no_template_and_says_so(
    task_adapters, store: ArtifactStore, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    plain = build_tiny_llama(tmp_path / "plain", chat_template=None)
    bare = store.path("store://adapters/bare")
    bare.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # no tokenizer: the base's is used
        shutil.copy2(store.path("store://adapters/add") / name, bare / name)
    reporter = MemoryReporter()
    result = run_export(export_spec(plain, "store://exports/plain", uri="store://adapters/bare", form="adapter"),
                        reporter, store)
    assert result is not None, reporter.states[-1]
    modelfile = (store.path("store://exports/plain") / "Modelfile").read_text()
    assert "TEMPLATE" not in modelfile and f"FROM {plain}\n" in modelfile
    assert 'PARAMETER stop "</s>"' in modelfile
    assert "no chat template" in logs(reporter) and result["family"] == ""


def test_a_base_of_no_known_template_family_fails_naming_what_it_saw(
    store: ArtifactStore, tmp_path: Path
) -> None:
    odd = build_tiny_llama(tmp_path / "odd", chat_template="{% for m in messages %}## {{ m['content'] }}\n{% endfor %}")
    bare = store.path("store://adapters/bare-odd")
    bare.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(store.path("store://adapters/add") / name, bare / name)
    reporter = MemoryReporter()
    assert run_export(export_spec(odd, "store://exports/odd", uri="store://adapters/bare-odd"), reporter, store) is None
    state, _, error = reporter.states[-1]
    assert state == "failed" and "## You are terse." in error and "chatml" in error and "Traceback" not in error
    assert not store.path("store://exports/odd").exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("change", "message"),
    [({"target": "gguf"}, "target: must be one of ollama"), ({"form": "gguf"}, "form: must be one of"),
     ({"name": "bad name; rm"}, "name: 'bad name; rm' is no Ollama name"), ({"quantize": "q2_K"}, "quantize: must be empty or one of"),
     ({"form": "adapter", "quantize": "q8_0"}, "only a merged model"), ({"system": 'a """ b'}, "system: must not")],
)
def test_an_invalid_export_fails_with_a_readable_reason(
    change: dict[str, Any], message: str, tiny_model_dir: Path, store: ArtifactStore
) -> None:
    spec = export_spec(tiny_model_dir, "store://exports/invalid", **change)
    reporter = MemoryReporter()
    assert run_export(spec, reporter, store) is None
    state, _, error = reporter.states[-1]
    assert state == "failed" and message in error


def test_the_adapter_form_on_a_base_ollama_takes_no_adapters_for_says_so(store: ArtifactStore, tmp_path: Path) -> None:
    from workers.training.demo import build_tiny_gpt2

    gpt2 = build_tiny_gpt2(tmp_path / "gpt2")
    reporter = MemoryReporter()
    assert run_export(export_spec(gpt2, "store://exports/gpt2", form="adapter"), reporter, store) is not None
    assert "this base is a gpt2: export the merged form instead" in logs(reporter)


# --- vLLM: the folder vLLM serves, checked by vLLM (its test double: tests/doubles/README.md) ---------------------

VLLM_SITE = Path(__file__).resolve().parents[1] / "doubles" / "vllm_site"
ADD_PROMPTS = ["What is 23 + 41?", "What is 2 + 3?", "What is 10 + 7?"]  # the "add" adapter's task


@pytest.fixture
def with_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's stand-in on this process's path (its version is read here) and on its children's (vLLM runs in one)."""
    import os

    monkeypatch.syspath_prepend(str(VLLM_SITE))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(VLLM_SITE), os.environ.get("PYTHONPATH", "")) if p))


def test_a_vllm_export_of_the_adapter_is_served_by_vllm_with_tunedeck_s_answers(
    tiny_model_dir: Path, store: ArtifactStore, with_vllm: None
) -> None:
    import json

    reporter = MemoryReporter()
    result = run_export(export_spec(tiny_model_dir, "store://exports/vllm-adapter", target="vllm", form="adapter",
                                    name="adder", check_prompts=ADD_PROMPTS, max_new_tokens=12), reporter, store)
    assert result is not None, (reporter.states[-1], logs(reporter))
    folder = store.path("store://exports/vllm-adapter")
    assert {p.name for p in (folder / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    report = json.loads((folder / "vllm-check.json").read_text())
    assert report["vllm_version"] == "0.0.0+test" and report["total"] == 3
    # Greedy in float32 on both sides: every answer is the same, token for token, and none is empty.
    assert report["agree"] == 3 and all(row["agree"] and row["tunedeck"] == row["vllm"] for row in report["answers"])
    assert all(row["tunedeck"] for row in report["answers"])
    assert result["vllm"] == {"vllm_version": "0.0.0+test", "dtype": "float32", "agree": 3, "total": 3}
    readme = (folder / "README.md").read_text()
    assert f"vllm serve {tiny_model_dir} --enable-lora --max-lora-rank 8" in readme and "adder=./adapter" in readme
    assert "3 of 3 equal Tunedeck's token for token" in logs(reporter)


def test_a_merged_vllm_export_is_loaded_by_vllm_from_its_folder(
    tiny_model_dir: Path, store: ArtifactStore, with_vllm: None
) -> None:
    reporter = MemoryReporter()
    spec = export_spec(tiny_model_dir, "store://exports/vllm-merged", target="vllm", form="merged",
                       check_prompts=ADD_PROMPTS[:2], max_new_tokens=8)
    result = run_export(spec, reporter, store)
    assert result is not None, (reporter.states[-1], logs(reporter))
    assert result["verified"] is True and result["vllm"]["total"] == 2 and result["vllm"]["agree"] == 2
    folder = store.path("store://exports/vllm-merged")
    assert (folder / "config.json").is_file() and (folder / "vllm-check.json").is_file()
    assert "vllm serve ./" in (folder / "README.md").read_text()


def test_a_vllm_export_on_a_worker_without_vllm_fails_saying_so(tiny_model_dir: Path, store: ArtifactStore) -> None:
    reporter = MemoryReporter()
    assert run_export(export_spec(tiny_model_dir, "store://exports/no-vllm", target="vllm", form="adapter"),
                      reporter, store) is None
    assert "vLLM is not installed on this worker" in str(reporter.states[-1])


def test_a_broken_vllm_install_fails_the_job_in_vllm_s_process_s_words(
    tiny_model_dir: Path, store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its metadata is there (this process sees a version), its package is not where vLLM's process looks.
    monkeypatch.syspath_prepend(str(VLLM_SITE))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    reporter = MemoryReporter()
    spec = export_spec(tiny_model_dir, "store://exports/vllm-broken", target="vllm", form="adapter",
                       check_prompts=ADD_PROMPTS[:1], max_new_tokens=4)
    assert run_export(spec, reporter, store) is None
    assert "vLLM could not be imported on this worker: ModuleNotFoundError" in str(reporter.states[-1])
    assert "Tunedeck answered 1 check prompt" in logs(reporter)  # its own side ran


def test_a_vllm_export_refuses_ollama_s_settings_and_bad_prompts(tiny_model_dir: Path) -> None:
    spec = export_spec(tiny_model_dir, "store://x", target="vllm", quantize="q8_0", check_prompts=["ok", "  "],
                       max_new_tokens=0)
    assert set(spec.validate()) == {"quantize", "check_prompts", "max_new_tokens"}
    assert "prompt 2 is empty" in spec.validate()["check_prompts"]
