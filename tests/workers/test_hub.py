"""Pushing a folder to a Hub: the real huggingface_hub client against a local fake of the Hub's HTTP API."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest

from tests.fakehub import FakeHub
from workers.adapters.hub import HubError, push_folder
from workers.contract.hubids import repo_id_problem

TOKEN = "hf_TestTokenAbcdefghijklmnop0123456789"


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    """An adapter folder as PEFT writes it: weights (safetensors), config and a model card."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "adapter"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    weights = {
        "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(8, 64, generator=generator),
        "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 8, generator=generator),
    }
    save_file(weights, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n\n# A test adapter\n")
    return folder


@pytest.fixture
def no_xet(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client as with HF_HUB_DISABLE_XET=1 (read once at import, so the constant is patched)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_it_pushes_an_adapter_folder_with_the_weights_through_git_lfs(adapter_dir: Path, no_xet: None) -> None:
    lines: list[str] = []
    with FakeHub(TOKEN) as hub:
        result = push_folder(
            adapter_dir,
            "alice/toy-adapter",
            TOKEN,
            endpoint=hub.url,
            commit_message="Adapter of run 7",
            progress=lines.append,
        )
    repo = hub.repo("alice/toy-adapter")
    assert repo.private is True
    assert repo.files == files_of(adapter_dir)
    assert len(repo.files) == 3 and len(repo.files["adapter_model.safetensors"]) > 4096
    assert repo.lfs_paths == {"adapter_model.safetensors"}  # uploaded by PUT, not inline in the commit
    assert [c.message for c in repo.commits] == ["Adapter of run 7"]
    assert result["commit_oid"] == repo.head and result["commit_url"].endswith(f"/alice/toy-adapter/commit/{repo.head}")
    assert result["files"] == sorted(files_of(adapter_dir)) and result["bytes"] == sum(map(len, repo.files.values()))
    authed = [r for r in hub.requests if r.method != "PUT"]
    assert {r.path.split("/")[-1] for r in authed} >= {"create", "validate-yaml", "batch", "main"}
    assert all(r.authorization == f"Bearer {TOKEN}" for r in authed)
    assert any(r.method == "PUT" for r in hub.requests)
    assert hub.unhandled == []
    assert lines and not any(TOKEN in line for line in lines)


def test_it_pushes_with_the_default_xet_client_when_the_hub_takes_every_file_inline(adapter_dir: Path) -> None:
    with FakeHub(TOKEN, lfs_patterns=()) as hub:
        result = push_folder(
            adapter_dir,
            "team-x/public.adapter_v2",
            TOKEN,
            endpoint=hub.url,
            private=False,
            commit_message="First push",
        )
    repo = hub.repo("team-x/public.adapter_v2")
    assert repo.private is False
    assert repo.files == files_of(adapter_dir) and repo.lfs_paths == set()
    assert result["commit_oid"] == repo.head and result["private"] is False
    assert hub.unhandled == []


def test_a_second_push_keeps_the_repo_and_commits_only_what_changed(adapter_dir: Path, no_xet: None) -> None:
    with FakeHub(TOKEN) as hub:
        push_folder(adapter_dir, "alice/toy-adapter", TOKEN, endpoint=hub.url, commit_message="one")
        (adapter_dir / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
        second = push_folder(adapter_dir, "alice/toy-adapter", TOKEN, endpoint=hub.url, commit_message="two")
    repo = hub.repo("alice/toy-adapter")
    assert [c.message for c in repo.commits] == ["one", "two"]
    assert set(repo.commits[1].files) == {"adapter_config.json"}
    assert repo.files == files_of(adapter_dir)
    assert second["commit_oid"] == repo.head


def test_a_wrong_token_fails_clearly_without_the_token_in_the_message(adapter_dir: Path, no_xet: None) -> None:
    wrong = "hf_WrongTokenZyxwvutsrq9876543210"
    lines: list[str] = []
    with FakeHub(TOKEN) as hub, pytest.raises(HubError) as caught:
        push_folder(
            adapter_dir, "alice/toy-adapter", wrong, endpoint=hub.url, commit_message="m", progress=lines.append
        )
    message = str(caught.value)
    assert "401" in message and "access token" in message and "creating the repository" in message
    shown = "".join(traceback.format_exception(caught.value)) + "".join(lines)
    assert wrong not in shown and TOKEN not in shown
    assert hub.repos == {} and hub.requests and all(r.authorization == f"Bearer {wrong}" for r in hub.requests)


@pytest.mark.parametrize(
    ("repo_id", "why"),
    [
        ("toy-adapter", "namespace/name"),
        ("alice/toy/adapter", "namespace/name"),
        ("/toy-adapter", "namespace is empty"),
        ("alice/", "name is empty"),
        ("alice/toy adapter", "only letters, digits"),
        ("alice/-toy", "start and end"),
        ("alice/toy.", "start and end"),
        ("alice/café", "only letters, digits"),
        ("alice/toy--adapter", "'--' or '..'"),
        ("alice/toy..adapter", "'--' or '..'"),
        ("alice/toy.git", ".git"),
        ("alice/" + "a" * 97, "longer than 96"),
    ],
)
def test_a_bad_repo_id_is_refused_before_any_request(adapter_dir: Path, repo_id: str, why: str) -> None:
    assert why in (repo_id_problem(repo_id) or "")
    with FakeHub(TOKEN) as hub, pytest.raises(HubError, match="repository id") as caught:
        push_folder(adapter_dir, repo_id, TOKEN, endpoint=hub.url, commit_message="m")
    assert why in str(caught.value)
    assert hub.requests == []


def test_good_repo_ids_pass() -> None:
    for repo_id in ("alice/toy-adapter", "Org_1/Model.v2_final", "a/b", "a" * 96 + "/" + "b" * 96):
        assert repo_id_problem(repo_id) is None, repo_id


def test_a_token_pasted_as_repo_id_is_not_echoed(adapter_dir: Path) -> None:
    with pytest.raises(HubError) as caught:
        push_folder(adapter_dir, TOKEN, TOKEN, commit_message="m")
    assert TOKEN not in str(caught.value)


def test_missing_or_empty_folders_and_missing_tokens_are_refused(tmp_path: Path, adapter_dir: Path) -> None:
    with pytest.raises(HubError, match="no such folder"):
        push_folder(tmp_path / "nope", "alice/x", TOKEN, commit_message="m")
    (tmp_path / "empty" / ".git").mkdir(parents=True)
    (tmp_path / "empty" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    with pytest.raises(HubError, match="holds no files"):
        push_folder(tmp_path / "empty", "alice/x", TOKEN, commit_message="m")
    with pytest.raises(HubError, match="no Hugging Face access token"):
        push_folder(adapter_dir, "alice/x", "  ", commit_message="m")


def test_large_files_to_a_hub_without_xet_say_how_to_switch_to_git_lfs(adapter_dir: Path) -> None:
    with FakeHub(TOKEN) as hub, pytest.raises(HubError) as caught:
        push_folder(adapter_dir, "alice/toy-adapter", TOKEN, endpoint=hub.url, commit_message="m")
    assert "HF_HUB_DISABLE_XET=1" in str(caught.value) and TOKEN not in str(caught.value)
    assert any("xet" in request for request in hub.unhandled)
    assert hub.repo("alice/toy-adapter").commits == []
