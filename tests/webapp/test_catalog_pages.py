"""The catalog pages: base models (inspect, register), LoRA configs (form, live estimate), datasets (upload, detail)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile

from webapp.catalog.models import BaseModel, Dataset, LoraConfig
from webapp.catalog.services import register_base_model, register_dataset
from workers.contract.store import ArtifactStore
from workers.training.demo import toy_rows

HOSTILE = "<img src=x onerror=alert(1)>"


@pytest.fixture
def user_client(client, db):  # type: ignore[no-untyped-def]
    get_user_model().objects.create_user("owner", password="owner-pass-123")
    client.login(username="owner", password="owner-pass-123")
    return client


@pytest.fixture
def tiny_base(tiny_model_dir: Path, db) -> BaseModel:  # type: ignore[no-untyped-def]
    return register_base_model("tiny", str(tiny_model_dir))


def _jsonl(rows: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _lora_post(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "name": "my-lora", "method": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear",
        "bias": "none", "init": "default", "modules_to_save": "", "feedforward_modules": "", "num_virtual_tokens": 20,
        "projection_hidden_size": 0, "prompt_init": "sample_vocab", "prompt_init_text": "", "quantization": "none",
        "quant_type": "nf4", "double_quant": "on", "compute_dtype": "auto", "gpu_gb": 80,
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


# --- every page renders ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_renders_each_page(user_client, tiny_base, store_dir) -> None:  # type: ignore[no-untyped-def]
    dataset = register_dataset("toy", "toy.jsonl", _jsonl(toy_rows(8, 0)))
    LoraConfig.objects.create(name="cfg", params={"r": 4})
    for url in ("/base-models/", "/lora-configs/", "/datasets/", f"/datasets/{dataset.pk}/"):
        response = user_client.get(url)
        assert response.status_code == 200, url
        assert b"<script>" not in response.content and b" style=" not in response.content, url


def test_it_asks_for_a_login(client, db) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/base-models/").status_code == 302


# --- base models -------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_inspects_a_local_model_before_saving_it(user_client, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    response = user_client.post("/base-models/", {"source": str(tiny_model_dir), "action": "inspect"}, HTTP_HX_REQUEST="true")
    page = response.content.decode()
    assert response.status_code == 200
    assert "LlamaForCausalLM" in page and "q_proj" in page and "attention+mlp" in page
    assert "<html" not in page  # the partial only
    assert not BaseModel.objects.exists()

    response = user_client.post("/base-models/", {"source": str(tiny_model_dir), "action": "save", "name": "mine"})
    assert response.status_code == 302
    base = BaseModel.objects.get()
    assert base.name == "mine" and base.architecture == "LlamaForCausalLM" and "q_proj" in base.linear_modules
    assert "mine" in user_client.get("/base-models/").content.decode()


@pytest.mark.django_db
@pytest.mark.parametrize(("source", "message"), [
    ("/no/such/model-dir", "local base models must be folders under"),
    ("not a hub id!!", "neither a hub id (owner/name) nor an absolute path"),
    ("bogus-org-tunedeck/no-such-model", "bogus-org-tunedeck/no-such-model"),  # offline: cannot reach; online: not found
])
def test_it_refuses_a_bad_source_next_to_the_field_keeping_it(user_client, source: str, message: str) -> None:  # type: ignore[no-untyped-def]
    response = user_client.post("/base-models/", {"source": source, "action": "inspect"})
    page = response.content.decode()
    assert response.status_code == 400
    assert message in page.replace("&#x27;", "'")
    assert 'class="field invalid"' in page and "Traceback" not in page
    assert re.search(r'name="source"[^>]*value="[^"]*' + re.escape(source.split("!")[0]), page)
    assert not BaseModel.objects.exists()


def _refusal(user_client, source: str) -> str:  # type: ignore[no-untyped-def]
    response = user_client.post("/base-models/", {"source": source, "action": "inspect"})
    assert response.status_code == 400
    match = re.search(r'<p class="error" role="alert">(.*?)</p>', response.content.decode(), re.S)
    assert match, response.content.decode()
    return html.unescape(match.group(1)).replace(source, "<source>")


@pytest.mark.django_db
def test_local_paths_outside_the_model_roots_all_get_one_answer(user_client, settings, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                 tiny_model_dir: Path) -> None:
    """/root/.ssh and a missing folder look the same: the answer says where local models may live, nothing else."""
    root = tmp_path / "models"
    (root / "empty").mkdir(parents=True)
    outside = tmp_path / "secrets"
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    settings.MODEL_ROOTS = [root]
    answers = {source: _refusal(user_client, source) for source in (
        str(outside),  # an existing folder outside the roots
        str(tmp_path / "missing"),  # no such folder
        str(root / "escape"),  # a symlink out of a root
        f"{root}/../secrets",  # .. out of a root
        str(tiny_model_dir),  # a real model, outside the roots
        "~/.ssh",
    )}
    assert len(set(answers.values())) == 1, answers
    assert "local base models must be folders under" in answers[str(outside)] and str(root) in answers[str(outside)]
    assert not BaseModel.objects.exists()
    # Inside the root: the folder is read (and this one holds no model).
    assert "cannot read a model config" in _refusal(user_client, str(root / "empty"))


def test_model_roots_are_absolute_folders(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from workers.config import ConfigError, model_roots

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.setenv("TUNEDECK_MODEL_ROOTS", f"{tmp_path / 'link'}, /srv/models")
    assert model_roots() == [tmp_path / "real", Path("/srv/models")]  # symlinks followed, as for the sources
    monkeypatch.setenv("TUNEDECK_MODEL_ROOTS", "models")
    with pytest.raises(ConfigError, match="TUNEDECK_MODEL_ROOTS: 'models' is not an absolute path"):
        model_roots()


@pytest.mark.django_db
def test_a_relative_source_is_a_hub_id_never_a_folder_of_the_server(user_client) -> None:  # type: ignore[no-untyped-def]
    """"tests/webapp" exists relative to the server's working directory: it is looked up on the hub all the same."""
    assert _refusal(user_client, "tests/webapp") == _refusal(user_client, "tests/no-such-folder")


@pytest.mark.django_db
def test_the_admin_cannot_change_where_a_base_model_is_read_from(client, tiny_base: BaseModel) -> None:  # type: ignore[no-untyped-def]
    get_user_model().objects.create_superuser("root", password="root-pass-123")
    client.login(username="root", password="root-pass-123")
    assert client.get("/admin/catalog/basemodel/add/").status_code == 403  # registered on the page, inspected
    client.post(f"/admin/catalog/basemodel/{tiny_base.pk}/change/", {"name": "tiny", "source": "/root/.ssh"})
    assert BaseModel.objects.get(pk=tiny_base.pk).source == tiny_base.source


# --- LoRA configs ------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_config_form_refuses_bad_values_next_to_fields_and_saves_good_ones(user_client) -> None:  # type: ignore[no-untyped-def]
    response = user_client.post("/lora-configs/", _lora_post(r=0, dropout=1.5))
    page = response.content.decode()
    assert response.status_code == 400 and page.count('class="field invalid"') >= 2
    assert 'name="dropout" value="1.5"' in page
    assert not LoraConfig.objects.exists()

    response = user_client.post("/lora-configs/", _lora_post(r="abc"))
    assert response.status_code == 400 and 'value="abc"' in response.content.decode()

    response = user_client.post("/lora-configs/", _lora_post())
    assert response.status_code == 302
    params = LoraConfig.objects.get(name="my-lora").lora_params()
    assert params.r == 8 and params.target_modules == ["all-linear"]


@pytest.mark.django_db
def test_the_estimate_follows_r(user_client, tiny_base) -> None:  # type: ignore[no-untyped-def]
    def trainable(r: int) -> int:
        response = user_client.post("/lora-configs/estimate/", _lora_post(r=r, base_model=tiny_base.pk), HTTP_HX_REQUEST="true")
        page = response.content.decode()
        assert response.status_code == 200 and "GiB" in page, page
        return int(re.search(r'class="trainable">[^<]*</strong>\s*<span class="muted">\((\d+)', page).group(1))  # type: ignore[union-attr]

    small, large = trainable(4), trainable(16)
    assert 0 < small < large and large == 4 * small

    response = user_client.post("/lora-configs/estimate/", _lora_post(r=0, base_model=tiny_base.pk))
    assert "r:" in response.content.decode()
    response = user_client.post("/lora-configs/estimate/", _lora_post(r=4))
    assert "choose a base model" in response.content.decode()


@pytest.mark.django_db
def test_a_config_can_start_from_a_preset(user_client) -> None:  # type: ignore[no-untyped-def]
    config = LoraConfig.objects.create(name="lora-attention-only", params={"r": 12, "target_modules": ["attention"]})
    page = user_client.get(f"/lora-configs/?from={config.pk}").content.decode()
    assert 'value="lora-attention-only-copy"' in page and 'name="r" value="12"' in page and "preset" in page


# --- datasets ----------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_uploads_a_good_file_and_reports_a_bad_one_by_line(user_client, store_dir) -> None:  # type: ignore[no-untyped-def]
    good = SimpleUploadedFile("toy.jsonl", _jsonl(toy_rows(20, 0)))
    response = user_client.post("/datasets/", {"name": "toy", "file": good})
    dataset = Dataset.objects.get(name="toy")
    assert response.status_code == 302 and response["Location"] == f"/datasets/{dataset.pk}/"
    assert dataset.format == "alpaca" and dataset.row_count == 20

    bad = b'{"instruction": "a", "output": "b"}\n{not json\n{"instruction": "c"}\n'
    response = user_client.post("/datasets/", {"name": "bad", "file": SimpleUploadedFile("bad.jsonl", bad)})
    page = response.content.decode()
    assert response.status_code == 400
    assert "line 2" in page and "line 3" in page and "Traceback" not in page
    assert 'value="bad"' in page and not Dataset.objects.filter(name="bad").exists()

    response = user_client.post("/datasets/", {"name": "bad", "file": SimpleUploadedFile("bad.jsonl", bad)}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200 and "line 2" in response.content.decode() and "<html" not in response.content.decode()


@pytest.mark.django_db
def test_it_refuses_a_file_over_the_limit(user_client, store_dir, settings) -> None:  # type: ignore[no-untyped-def]
    settings.TUNEDECK_MAX_UPLOAD_MB = 1
    big = SimpleUploadedFile("big.jsonl", b'{"text": "' + b"x" * 2**20 + b'"}\n')
    response = user_client.post("/datasets/", {"name": "big", "file": big})
    assert response.status_code == 400 and "the limit is 1 MB" in response.content.decode()


@pytest.mark.django_db
def test_the_detail_page_shows_lengths_and_a_rendered_row(user_client, tiny_base, store_dir) -> None:  # type: ignore[no-untyped-def]
    rows = [{"instruction": f"add {i} and {i}", "output": str(2 * i)} for i in range(30)]
    rows[3] = {"instruction": HOSTILE, "output": HOSTILE}
    dataset = register_dataset("hostile", "hostile.jsonl", _jsonl(rows))

    page = user_client.get(f"/datasets/{dataset.pk}/").content.decode()
    assert HOSTILE not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "Choose a base model" in page

    query = {"base_model": tiny_base.pk, "max_length": 12, "batching": "pad", "completion_only_loss": "on", "row": 4}
    response = user_client.get(f"/datasets/{dataset.pk}/", query, HTTP_HX_REQUEST="true")
    page = response.content.decode()
    assert response.status_code == 200 and "<html" not in page
    assert '<rect class="bar' in page and "Truncated at 12" in page
    assert 'class="tok trained"' in page and 'class="tok masked"' in page
    assert "Row 4 of 30" in page
    tokens = re.search(r'<pre class="tokens">(.*?)</pre>', page, re.S).group(1)  # type: ignore[union-attr]
    assert HOSTILE not in tokens and "&lt;img src=x onerror=alert(1)&gt;" in re.sub(r"<[^>]+>", "", tokens)

    full = user_client.get(f"/datasets/{dataset.pk}/", {**query, "row": 999}).content.decode()
    assert "Row 30 of 30" in full and "<html" in full


def test_a_row_missing_from_the_stored_file_is_named_in_one_line(user_client, tiny_base, store_dir) -> None:  # type: ignore[no-untyped-def]
    rows = [{"instruction": f"sub {i} from {i}", "output": "0"} for i in range(10)]
    dataset = register_dataset("shrunk", "shrunk.jsonl", _jsonl(rows))
    ArtifactStore(store_dir).path(dataset.uri).write_bytes(_jsonl(rows[:5]))  # changed behind the catalog's back

    query = {"base_model": tiny_base.pk, "max_length": 12, "batching": "pad", "completion_only_loss": "on", "row": 8}
    page = html.unescape(user_client.get(f"/datasets/{dataset.pk}/", query, HTTP_HX_REQUEST="true").content.decode())
    assert "shrunk: row 8 is missing from the stored file" in page
    assert "no rows" not in page


# --- list pages: a constant number of queries --------------------------------------------------------------


@pytest.mark.django_db
def test_list_pages_make_the_same_queries_with_more_rows(user_client, tiny_model_dir, store_dir,
                                                         django_assert_max_num_queries) -> None:  # type: ignore[no-untyped-def]
    def add(i: int) -> None:
        BaseModel.objects.create(name=f"m{i}", source=str(tiny_model_dir), num_parameters=10**6, linear_modules=["q_proj"])
        LoraConfig.objects.create(name=f"c{i}", params={"r": 4 + i})
        register_dataset(f"d{i}", f"d{i}.jsonl", _jsonl(toy_rows(3, i)))

    add(0)
    counts = {}
    for url in ("/base-models/", "/lora-configs/", "/datasets/"):
        from django.db import connection
        from django.test.utils import CaptureQueriesContext

        with CaptureQueriesContext(connection) as ctx:
            assert user_client.get(url).status_code == 200
        counts[url] = len(ctx.captured_queries)
    for i in range(1, 6):
        add(i)
    for url, count in counts.items():
        with django_assert_max_num_queries(count):
            assert user_client.get(url).status_code == 200


# --- hostile uploads: bounded, refused naming the line, nothing stored lost ---------------------------------------

NESTED = ("[" * 200_000 + "]" * 200_000).encode()


def _bomb(megabytes: int = 2) -> bytes:
    """A Parquet file of a few hundred bytes whose one cell decodes to `megabytes` MB."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": ["x" * (megabytes * 2**20)]}), buffer, compression="zstd")
    return buffer.getvalue()


def _stored_files(store_dir: Path) -> set[Path]:
    return {p for p in store_dir.rglob("*") if p.is_file()}


@pytest.mark.django_db
def test_deeply_nested_json_is_a_400_naming_the_line(user_client, store_dir) -> None:  # type: ignore[no-untyped-def]
    for name, data in (("deep.jsonl", b'{"text": "ok"}\n' + NESTED + b"\n"), ("deep.json", b"[" + NESTED + b"]")):
        response = user_client.post("/datasets/", {"name": "deep", "file": SimpleUploadedFile(name, data)})
        page = response.content.decode()
        assert response.status_code == 400 and "nested deeper than 32 levels" in page, name
        assert ("line 2" if name == "deep.jsonl" else "line 1") in page
    assert not Dataset.objects.exists() and not _stored_files(store_dir)


@pytest.mark.django_db
def test_a_decompression_bomb_is_refused_and_what_was_stored_stays(user_client, store_dir) -> None:  # type: ignore[no-untyped-def]
    kept = register_dataset("kept", "kept.jsonl", _jsonl(toy_rows(3, 0)))
    files = _stored_files(store_dir)
    response = user_client.post("/datasets/", {"name": "bomb", "file": SimpleUploadedFile("bomb.parquet", _bomb())})
    page = response.content.decode()
    assert response.status_code == 400
    assert "row 1, field &#x27;text&#x27;: decodes to 2 MB" in page and "TUNEDECK_DATASET_MAX_ROW_KB" in page
    assert list(Dataset.objects.values_list("name", flat=True)) == ["kept"] and _stored_files(store_dir) == files
    kept.refresh_from_db()
    assert kept.row_count == 3 and kept.preview_rows() and user_client.get(f"/datasets/{kept.pk}/").status_code == 200


@pytest.mark.django_db
def test_the_bounds_follow_the_settings(user_client, store_dir, settings) -> None:  # type: ignore[no-untyped-def]
    from workers.data.bounds import Limits

    settings.DATASET_LIMITS = Limits(max_rows=10)
    response = user_client.post("/datasets/", {"name": "many", "file": SimpleUploadedFile("many.jsonl", _jsonl(toy_rows(11, 0)))})
    assert response.status_code == 400 and "line 11: the file holds more than 10 rows" in response.content.decode()
    response = user_client.post("/datasets/", {"name": "ten", "file": SimpleUploadedFile("ten.jsonl", _jsonl(toy_rows(10, 0)))})
    assert response.status_code == 302 and Dataset.objects.get(name="ten").row_count == 10


@pytest.mark.django_db
def test_the_stored_preview_holds_clipped_cells_of_a_few_rows(user_client, store_dir) -> None:  # type: ignore[no-untyped-def]
    rows = [{"text": "t" * 300_000}] + [{"text": f"row {i}"} for i in range(30)]
    response = user_client.post("/datasets/", {"name": "long", "file": SimpleUploadedFile("long.jsonl", _jsonl(rows))})
    assert response.status_code == 302
    dataset = Dataset.objects.get(name="long")
    assert dataset.row_count == 31
    preview = dataset.preview_rows()
    assert len(preview) == 5 and len(json.dumps(preview)) < 10_000
    assert preview[0]["text"].endswith("more characters]") and preview[1] == {"text": "row 0"}
    page = user_client.get(f"/datasets/{dataset.pk}/").content.decode()
    assert "more characters]" in page and len(page) < 100_000


@pytest.mark.django_db
def test_list_pages_load_no_stored_preview(client, tiny_model_dir, store_dir) -> None:  # type: ignore[no-untyped-def]
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from tests.webapp.factories import demo_objects, make_run

    user, base, dataset, config = demo_objects(tiny_model_dir)
    make_run(user, base, dataset, config)
    client.force_login(user)
    for url in ("/datasets/", "/runs/", "/runs/new/", "/", "/api/v1/datasets/", "/api/v1/runs/", "/adapters/"):
        with CaptureQueriesContext(connection) as ctx:
            assert client.get(url).status_code == 200, url
        loading = [q["sql"] for q in ctx.captured_queries if "preview" in q["sql"]]
        assert not loading, (url, loading)
