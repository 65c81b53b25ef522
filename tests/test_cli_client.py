"""The `tunedeck` client commands as a user runs them: subprocesses against a live server, with a real
`tunedeck worker` training the tiny model and the scheduler ticking while the CLI waits.

Exit codes checked: 0 ok, 1 the run ended cancelled under --wait, 2 a refused dataset or run spec, 3 a bad key,
4 an unknown id.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import socket
import stat
import subprocess
import sys
import termios
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
from workers.training.demo import toy_rows

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


def cli_for(server: str, raw: str, tmp_path: Path) -> Cli:
    """The CLI as a user's shell runs it: this server and key, a config file of its own, no other TUNEDECK_ setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEDECK_")}
    env.update(TUNEDECK_SERVER=server, TUNEDECK_API_KEY=raw, TUNEDECK_CONFIG=str(tmp_path / "cli.toml"),
               OMP_NUM_THREADS="1", COLUMNS="100")
    return Cli(env, tmp_path)


@pytest.fixture
def setup(live_server, tmp_path: Path, tiny_model_dir: Path, settings) -> Iterator[tuple[Cli, Any]]:  # type: ignore[no-untyped-def]
    settings.ARTIFACT_STORE = tmp_path / "store"
    user, base, _toy, config = demo_objects(tiny_model_dir)
    _, raw = ApiKey.issue(user, "cli", ["read", "write"])
    fleet = Fleet(live_server.url, tmp_path / "store")
    fleet.start("w-cli")
    try:
        fleet.wait_ready("w-cli")
        yield cli_for(live_server.url, raw, tmp_path), {"user": user, "base": base, "config": config, "key": raw,
                                                         "model": tiny_model_dir}
    finally:
        fleet.stop()


@pytest.fixture
def bare(live_server, tmp_path: Path, tiny_model_dir: Path, settings) -> tuple[Cli, Any]:  # type: ignore[no-untyped-def]
    """The server and the demo catalog, no worker: for commands that train nothing."""
    settings.ARTIFACT_STORE = tmp_path / "store"
    user, base, toy, config = demo_objects(tiny_model_dir)
    _, raw = ApiKey.issue(user, "cli", ["read", "write"])
    return cli_for(live_server.url, raw, tmp_path), {"user": user, "base": base, "dataset": toy, "config": config,
                                                      "key": raw}


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
    assert done.code == 2 and "dataset: no dataset named 'no-such-data'" in done.err
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
    """In process (no subprocess, no worker): the YAML run spec's eval_dataset, by name or id, through a real Api;
    the server looks the names up."""
    from tunedeck_cli import runspec
    from tunedeck_cli.api import Api
    from tunedeck_cli.config import Settings
    from tunedeck_cli.errors import CliError
    from webapp.catalog.services import register_dataset

    settings.ARTIFACT_STORE = tmp_path / "store"
    user, _base, _toy, _config = demo_objects(tiny_model_dir)
    test_rows = register_dataset("toy-test", "t.jsonl", "".join(json.dumps(r) + "\n" for r in toy_rows(8, 5)).encode())
    _, raw = ApiKey.issue(user, "cli", ["read", "write"])
    api = Api(Settings(server=live_server.url, api_key=raw, source="test"))
    fields = {"name": "held", "base_model": "tiny", "dataset": "toy", "eval_dataset": "toy-test", "lora_config": "cfg",
              "hyperparameters": HP}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(fields))
    created = api.post("runs/", runspec.body(runspec.load(str(path)))).json()
    assert created["eval_dataset"] == test_rows.pk
    assert TrainingRun.objects.get(pk=created["id"]).eval_dataset == test_rows
    # Left out: no eval dataset in the body; by id: as is; unknown or of the wrong type: named.
    del fields["eval_dataset"]
    path.write_text(yaml.safe_dump(fields))
    assert "eval_dataset" not in runspec.body(runspec.load(str(path)))
    path.write_text(yaml.safe_dump({**fields, "eval_dataset": test_rows.pk}))
    assert api.post("runs/", runspec.body(runspec.load(str(path)))).json()["eval_dataset"] == test_rows.pk
    path.write_text(yaml.safe_dump({**fields, "eval_dataset": "nope"}))
    with pytest.raises(CliError) as refused:
        api.post("runs/", runspec.body(runspec.load(str(path))))
    assert refused.value.details == ["eval_dataset: no dataset named 'nope': GET /api/v1/datasets/ (tunedeck datasets "
                                     "list) lists their names and ids"]
    path.write_text(yaml.safe_dump({**fields, "eval_dataset": ["toy-test"]}))
    with pytest.raises(CliError) as refused:
        runspec.load(str(path))
    assert "eval_dataset: a name or an id, got list" in refused.value.details


def test_show_takes_a_name_or_an_id_and_a_run_spec_names_are_looked_up_by_the_server(bare) -> None:  # type: ignore[no-untyped-def]
    cli, objs = bare
    for group, name, obj in (("models", "tiny", objs["base"]), ("datasets", "toy", objs["dataset"]),
                             ("lora-configs", "cfg", objs["config"])):
        by_name = cli(group, "show", name, "--json")
        assert by_name.code == 0, (group, by_name.err)
        assert by_name.json()["id"] == obj.pk and by_name.json()["name"] == name
        by_id = cli(group, "show", str(obj.pk), "--json")
        assert by_id.code == 0 and by_id.json() == by_name.json(), (group, by_id.err)
        missing = cli(group, "show", "no-such-thing")
        assert missing.code == 4, (group, missing)
        assert f"`tunedeck {group} list`" in missing.err and "'no-such-thing'" in missing.err
    assert "report" in cli("datasets", "show", "toy", "--json").json()  # the detail, not the list's row
    shown = cli("lora-configs", "show", "cfg")
    assert shown.code == 0 and "cfg" in shown.out and "r" in shown.out

    # A run spec naming every reference, created without waiting: the server resolves the names.
    spec = cli.spec("named", name="by-names", base_model="tiny", dataset="toy", lora_config="cfg",
                    hyperparameters=HP)
    done = cli("runs", "create", "-f", spec, "--json")
    assert done.code == 0, done.err
    run = TrainingRun.objects.get(pk=done.json()["id"])
    assert (run.base_model, run.dataset, run.lora_config) == (objs["base"], objs["dataset"], objs["config"])
    done = cli("runs", "create", "-f", cli.spec("unknown", base_model="tiny", dataset="toy", lora_config="big"))
    assert done.code == 2 and "lora_config: no LoRA config named 'big'" in done.err
    assert "tunedeck lora-configs list" in done.err and TrainingRun.objects.count() == 1


def on_a_terminal(cli: Cli, *args: str, answers: list[tuple[str, str]], timeout: float = 60) -> tuple[int, str]:
    """Run a command with a pseudo-terminal as its controlling terminal (what getpass reads from): answer each
    prompt as it appears; return the exit code and everything the terminal showed."""
    master, slave = os.openpty()

    def take_the_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([sys.executable, "-m", "webapp.cli", *args], env=cli.env, stdin=slave, stdout=slave,
                            stderr=slave, preexec_fn=take_the_terminal)
    os.close(slave)
    shown, pending, since = b"", list(answers), 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the command ended: the terminal is gone
                break
            if not chunk:
                break
            shown += chunk
        if pending and pending[0][0].encode() in shown[since:]:  # getpass shows its prompt once echo is off
            os.write(master, pending.pop(0)[1].encode() + b"\n")
            since = len(shown)
    os.close(master)
    return proc.wait(timeout=30), shown.decode(errors="replace")


def test_login_with_a_user_name_and_password_makes_a_key_for_this_machine(bare, django_user_model) -> None:  # type: ignore[no-untyped-def]
    cli, objs = bare
    no_key = {"TUNEDECK_API_KEY": ""}
    server = cli.env["TUNEDECK_SERVER"]
    config = Path(cli.env["TUNEDECK_CONFIG"])

    # A script: --username, the password on stdin.
    done = cli("login", "--server", server, "--username", "owner", env=no_key, stdin="owner-pass-123\n")
    assert done.code == 0, done.err
    assert "as owner" in done.out and f"cli on {socket.gethostname()}" in done.out
    assert stat.S_IMODE(config.stat().st_mode) == 0o600 and "owner-pass-123" not in config.read_text()
    key = ApiKey.objects.get(name=f"cli on {socket.gethostname()}")
    assert key.user == objs["user"] and key.scopes == ["read", "write"]
    me = cli("whoami", "--json", env=no_key)
    assert me.code == 0 and (me.json()["username"], me.json()["key_prefix"]) == ("owner", key.prefix)
    shown = cli("lora-configs", "show", "cfg", "--json", env=no_key)  # the stored key works for every command
    assert shown.code == 0 and shown.json()["id"] == objs["config"].pk

    # Refusals: exit 3, nothing stored, the stored key kept.
    before = config.read_text()
    for username, password in (("owner", "not-the-password"), ("nobody", "owner-pass-123")):
        done = cli("login", "--server", server, "--username", username, env=no_key, stdin=password + "\n")
        assert done.code == 3 and "wrong user name or password" in done.err, done
        assert password not in done.err + done.out
    django_user_model.objects.create_user("gone", password="pw-gone-123", is_active=False)
    done = cli("login", "--server", server, "--username", "gone", env=no_key, stdin="pw-gone-123\n")
    assert done.code == 3 and "inactive" in done.err
    done = cli("login", "--server", server, "--username", "owner", "--scopes", "admin", env=no_key,
               stdin="owner-pass-123\n")
    assert done.code == 3 and "staff" in done.err
    assert config.read_text() == before and ApiKey.objects.count() == 2

    # A person at a terminal: asked for the user name, then the password, which is not echoed.
    code, screen = on_a_terminal(cli, "login", "--server", server,
                                 answers=[("Username", "owner"), ("Password for owner", "owner-pass-123")])
    assert code == 0, screen
    assert "owner-pass-123" not in screen and "Logged in to" in screen
    assert ApiKey.objects.filter(user=objs["user"]).count() == 3
    # An empty user name asks for a key instead (not echoed either), as login did before.
    code, screen = on_a_terminal(cli, "login", "--server", server,
                                 answers=[("Username", ""), ("API key", objs["key"])])
    assert code == 0 and objs["key"] not in screen, screen
    assert f'api_key = "{objs["key"]}"' in config.read_text()
    # And --key as always.
    done = cli("login", "--server", server, "--key", objs["key"], env=no_key)
    assert done.code == 0 and "as owner" in done.out
    assert cli("login", "--server", server, "--key", objs["key"], "--username", "owner").code == 2
