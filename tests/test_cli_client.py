"""The `tunedeck` client commands as a user runs them: subprocesses against a live server, with a real
`tunedeck worker` training the tiny model and the scheduler ticking while the CLI waits.

Exit codes checked: 0 ok, 1 the run ended cancelled under --wait, 2 a refused dataset or run spec, 3 a bad key,
4 an unknown id.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.webapp.factories import demo_objects
from tests.webapp.fleetprocs import Fleet, until
from webapp.api.models import ApiKey
from webapp.fleet.scheduler import schedule_once
from webapp.training.models import TrainingRun
from workers.demo import toy_rows

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e, pytest.mark.usefixtures("local_models")]

HP = {"max_steps": 8, "logging_steps": 1, "save_steps": 0, "batch_size": 4, "max_seq_length": 64,
      "eval_fraction": 0.0, "warmup_ratio": 0.0}


@dataclass
class Done:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class Cli:
    env: dict[str, str]
    tmp: Path
    count: int = 0
    outputs: dict[int, tuple[Path, Path]] = field(default_factory=dict)

    def start(self, *args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.Popen[str]:
        """Start a command; its stdout and stderr go to files (a pipe left unread could fill up and block it)."""
        self.count += 1
        out, err = self.tmp / f"cli-{self.count}.out", self.tmp / f"cli-{self.count}.err"
        with open(out, "w") as stdout, open(err, "w") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "webapp.cli", *args], env={**self.env, **(env or {})},
                                    stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                    stdout=stdout, stderr=stderr, text=True)
        if stdin is not None:
            assert proc.stdin is not None
            proc.stdin.write(stdin)
            proc.stdin.close()
            proc.stdin = None
        self.outputs[proc.pid] = (out, err)
        return proc

    def result(self, proc: subprocess.Popen[str]) -> Done:
        proc.wait()
        out, err = self.outputs.pop(proc.pid)
        return Done(proc.returncode, out.read_text(), err.read_text())

    def __call__(self, *args: str, env: dict[str, str] | None = None, stdin: str | None = None,
                 timeout: float = 240) -> Done:
        """Run a command to its end, ticking the scheduler meanwhile (a waiting CLI needs its run placed)."""
        proc = self.start(*args, env=env, stdin=stdin)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"tunedeck {' '.join(args)} ran over {timeout}s: {self.result(proc)}")
            schedule_once()
            time.sleep(0.25)
        return self.result(proc)

    def spec(self, file: str, **fields: Any) -> str:
        path = self.tmp / f"{file}.yaml"
        path.write_text(yaml.safe_dump(fields))
        return str(path)


@pytest.fixture
def setup(live_server, tmp_path: Path, tiny_model_dir: Path, settings) -> Iterator[tuple[Cli, Any]]:  # type: ignore[no-untyped-def]
    settings.ARTIFACT_STORE = tmp_path / "store"
    user, base, _toy, config = demo_objects(tiny_model_dir)
    _, raw = ApiKey.issue(user, "cli", ["read", "write"])
    fleet = Fleet(live_server.url, tmp_path / "store")
    fleet.start("w-cli")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEDECK_")}
    env.update(TUNEDECK_SERVER=live_server.url, TUNEDECK_API_KEY=raw, TUNEDECK_CONFIG=str(tmp_path / "cli.toml"),
               OMP_NUM_THREADS="1", COLUMNS="100")
    try:
        fleet.wait_ready("w-cli")
        yield Cli(env, tmp_path), {"user": user, "base": base, "config": config, "key": raw, "model": tiny_model_dir}
    finally:
        fleet.stop()


def test_the_cli_logs_in_uploads_trains_follows_downloads_and_exits_with_codes_scripts_can_trust(setup) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cli, objs = setup
    tmp = cli.tmp

    # login: the key from stdin, stored 0600 in $TUNEDECK_CONFIG; later commands read it from there.
    no_key = {"TUNEDECK_API_KEY": ""}
    done = cli("login", "--server", cli.env["TUNEDECK_SERVER"], env=no_key, stdin=objs["key"] + "\n")
    assert done.code == 0, done.err
    config = Path(cli.env["TUNEDECK_CONFIG"])
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert objs["key"] in config.read_text()
    done = cli("whoami", "--json", env=no_key)
    assert done.code == 0, done.err
    assert done.json()["server"] == cli.env["TUNEDECK_SERVER"]
    assert done.json()["username"] == "owner" and "write" in done.json()["scopes"]

    # A dataset upload with --json; a broken file is refused with exit 2 and its line named.
    good = tmp / "addition.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in toy_rows(256, 3)))
    done = cli("datasets", "upload", str(good), "--name", "cli-addition", "--json", env=no_key)
    assert done.code == 0, done.err
    uploaded = done.json()
    assert uploaded["name"] == "cli-addition" and uploaded["row_count"] == 256
    bad = tmp / "broken.jsonl"
    bad.write_text(json.dumps(toy_rows(1, 0)[0]) + "\n" + json.dumps(toy_rows(1, 1)[0]) + "\n{not json\n")
    done = cli("datasets", "upload", str(bad), "--name", "broken", env=no_key)
    assert done.code == 2, (done.out, done.err)
    assert "line 3" in done.err and "broken.jsonl" in done.err
    listed = cli("datasets", "list", "--json")
    assert listed.code == 0 and [d["name"] for d in listed.json()].count("cli-addition") == 1
    assert "broken" not in [d["name"] for d in listed.json()]

    # A run from YAML (catalog objects by name and by id) with --wait: steps shown, exit 0 on success.
    spec = cli.spec("run", name="cli-run", base_model="tiny", dataset="cli-addition", lora_config=objs["config"].pk,
                    hyperparameters=HP)
    done = cli("runs", "create", "-f", spec, "--wait", "--idempotency-key", "cli-run-1")
    assert done.code == 0, (done.out, done.err)
    assert f"{HP['max_steps']}/{HP['max_steps']}" in done.err  # the progress bar reached the last step
    assert "succeeded" in done.out
    run = TrainingRun.objects.get(name="cli-run")
    assert run.state == "succeeded" and run.dataset_id == uploaded["id"]
    # The same create with the same Idempotency-Key is the same run, not a second one.
    again = cli("runs", "create", "-f", spec, "--idempotency-key", "cli-run-1", "--json")
    assert again.code == 0, again.err
    assert again.json()["id"] == run.pk and TrainingRun.objects.filter(name="cli-run").count() == 1

    # logs (people and JSON lines), show and list as JSON.
    done = cli("runs", "logs", str(run.pk))
    assert done.code == 0, done.err
    assert "Trainable parameters" in done.out and "Adapter saved" in done.out
    done = cli("runs", "logs", str(run.pk), "--json", "--metrics")
    events = [json.loads(line) for line in done.out.splitlines()]
    assert [e["id"] for e in events] == sorted(e["id"] for e in events) == list(
        run.events.order_by("id").values_list("id", flat=True))
    assert {"log", "metric"} <= {e["kind"] for e in events}
    followed = cli("runs", "logs", str(run.pk), "-f")
    assert followed.code == 0 and followed.out == cli("runs", "logs", str(run.pk)).out
    shown = cli("runs", "show", str(run.pk), "--json").json()
    assert shown["state"] == "succeeded" and shown["step"] == HP["max_steps"] and shown["adapter"]
    assert run.pk in [r["id"] for r in cli("runs", "list", "--state", "succeeded", "--json").json()]
    table = cli("runs", "list")
    assert table.code == 0 and "cli-run" in table.out and "STATE" in table.out

    # The adapter downloads as a zip that PeftModel loads.
    target = tmp / "adapter.zip"
    done = cli("adapters", "download", str(shown["adapter"]), "-o", str(target))
    assert done.code == 0, done.err
    unpacked = tmp / "adapter"
    with zipfile.ZipFile(target) as archive:
        archive.extractall(unpacked)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(objs["model"]), unpacked)
    assert any("lora_A" in name for name, _ in tuned.named_parameters())
    done = cli("adapters", "download", str(shown["adapter"]), "-o", str(target))
    assert done.code == 2 and "--force" in done.err  # an existing file is not overwritten silently

    # A waiting create whose run is cancelled by another command exits 1.
    long_spec = cli.spec("long", name="cli-long", base_model=objs["base"].pk, dataset="cli-addition",
                         lora_config="cfg", hyperparameters={**HP, "max_steps": 5000})
    waiter = cli.start("runs", "create", "-f", long_spec, "--wait", "--quiet")
    long_run = until(lambda: TrainingRun.objects.filter(name="cli-long").first(), 60, lambda: waiter.poll())
    done = cli("runs", "cancel", str(long_run.pk))
    assert done.code == 0, done.err
    until(lambda: waiter.poll() is not None, 120, lambda: TrainingRun.objects.get(pk=long_run.pk).state, tick=True)
    waited = cli.result(waiter)
    assert waited.code == 1, waited
    assert "cancelled" in waited.out
    assert TrainingRun.objects.get(pk=long_run.pk).state == "cancelled"
    done = cli("runs", "cancel", str(long_run.pk))
    assert done.code == 1 and "already finished" in done.err  # a 409: the operation failed

    # Refusals: a bad key (3), unknown ids (4), a spec naming nothing (2), the server's field errors (2).
    done = cli("runs", "list", env={"TUNEDECK_API_KEY": "tdk_not-a-key"})
    assert done.code == 3 and "invalid API key" in done.err
    assert cli("runs", "show", "987654").code == 4
    assert cli("adapters", "download", "987654", "-o", str(tmp / "none.zip")).code == 4
    assert not (tmp / "none.zip").exists()
    done = cli("runs", "create", "-f", cli.spec("ghost", base_model="tiny", dataset="no-such-data",
                                                  lora_config="cfg"))
    assert done.code == 2 and "dataset: no dataset is named 'no-such-data'" in done.err
    done = cli("runs", "create", "-f", cli.spec("badlr", base_model="tiny", dataset="cli-addition", lora_config="cfg",
                                                  hyperparameters={"learning_rate": -1}))
    assert done.code == 2
    assert any(line.strip().startswith("hyperparameters.learning_rate:") for line in done.err.splitlines()), done.err
    assert TrainingRun.objects.count() == 2

    done = cli("logout", env=no_key)
    assert done.code == 0 and objs["key"] not in config.read_text()
    assert cli("runs", "list", env=no_key).code == 3


def test_a_run_spec_names_its_eval_dataset_like_its_dataset(live_server, tmp_path: Path, tiny_model_dir: Path,  # type: ignore[no-untyped-def]
                                                            settings) -> None:
    """In process (no subprocess, no worker): the YAML run spec's eval_dataset, by name or id, through a real Api."""
    from webapp.catalog.services import register_dataset
    from webapp.client import runspec
    from webapp.client.api import Api
    from webapp.client.config import Settings
    from webapp.client.errors import CliError

    settings.ARTIFACT_STORE = tmp_path / "store"
    user, _base, toy, _config = demo_objects(tiny_model_dir)
    test_rows = register_dataset("toy-test", "t.jsonl", "".join(json.dumps(r) + "\n" for r in toy_rows(8, 5)).encode())
    _, raw = ApiKey.issue(user, "cli", ["read", "write"])
    api = Api(Settings(server=live_server.url, api_key=raw, source="test"))
    fields = {"name": "held", "base_model": "tiny", "dataset": "toy", "eval_dataset": "toy-test", "lora_config": "cfg",
              "hyperparameters": HP}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(fields))
    body = runspec.body(api, runspec.load(str(path)))
    assert (body["dataset"], body["eval_dataset"]) == (toy.pk, test_rows.pk)
    created = api.post("runs/", body).json()
    assert created["eval_dataset"] == test_rows.pk
    assert TrainingRun.objects.get(pk=created["id"]).eval_dataset == test_rows
    # Left out: no eval dataset in the body; by id: as is; unknown or of the wrong type: named.
    del fields["eval_dataset"]
    path.write_text(yaml.safe_dump(fields))
    assert "eval_dataset" not in runspec.body(api, runspec.load(str(path)))
    path.write_text(yaml.safe_dump({**fields, "eval_dataset": test_rows.pk}))
    assert runspec.body(api, runspec.load(str(path)))["eval_dataset"] == test_rows.pk
    path.write_text(yaml.safe_dump({**fields, "eval_dataset": "nope"}))
    with pytest.raises(CliError, match="eval_dataset: no dataset is named 'nope'"):
        runspec.body(api, runspec.load(str(path)))
    path.write_text(yaml.safe_dump({**fields, "eval_dataset": ["toy-test"]}))
    with pytest.raises(CliError) as refused:
        runspec.load(str(path))
    assert "eval_dataset: a name or an id, got list" in refused.value.details
