"""A whole installation on one GPU machine: control plane, scheduler and `tunedeck worker`, then QLoRA runs.

What it shows: the worker enrolls with a token from `manage.py register_worker`, reports the machine's
inventory read through NVML, the scheduler places one job per GPU, and each QLoRA run trains to completion
on its own GPU. It prints the inventory JSON, where each run went and its figures (steps, runtime,
throughput, peak GPU memory, first and final loss), and writes them to --out as JSON.

    python bench/fleet_gpu.py --runs 2 --steps 60 --out fleet.json

Runs on the embedded default (SQLite, filesystem broker) in a private folder; nothing is downloaded (the base
is a random-weight Llama-architecture model built on the spot, --hidden/--layers set its size).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2, help="QLoRA runs queued at once (one per GPU is placed)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--timeout", type=float, default=420)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    var = Path(tempfile.mkdtemp(prefix="tunedeck-fleet-"))
    os.environ.update({"TUNEDECK_VAR": str(var), "DJANGO_SETTINGS_MODULE": "webapp.settings",
                       "TUNEDECK_HEARTBEAT_INTERVAL": "2"})
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("REDIS_URL", None)
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from webapp.catalog.demo import DEMO_DATASET, QLORA_CONFIG, ensure_demo_content
    from webapp.catalog.models import Dataset, LoraConfig
    from webapp.catalog.services import register_base_model, store
    from webapp.fleet.models import Worker
    from webapp.training.models import TrainingRun
    from workers.contract.spec import suggest_train_params
    from workers.training.demo import build_tiny_llama

    started = time.monotonic()
    call_command("migrate", interactive=False, verbosity=0)
    ensure_demo_content()
    path = store().path("store://models/fleet-llama")
    build_tiny_llama(path, hidden_size=args.hidden, layers=args.layers, init_std=0.02)
    base = register_base_model("fleet-llama", str(path))
    print(f"base model: {base.num_parameters / 1e6:.0f}M parameters (hidden {args.hidden}, {args.layers} layers)")
    owner = get_user_model().objects.create_user("fleet-bench", password="fleet-bench-pass")

    server = f"http://127.0.0.1:{args.port}"
    token = subprocess.run([sys.executable, "-m", "webapp.cli", "manage", "register_worker", "gpu-box",
                            "--labels", "gpu"], capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    token_file = var / "worker.token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    logs = {name: open(var / f"{name}.log", "wb") for name in ("web", "scheduler", "worker")}
    cli = [sys.executable, "-m", "webapp.cli"]
    procs = [
        subprocess.Popen([*cli, "web", "--host", "127.0.0.1", "--port", str(args.port)], stdout=logs["web"],
                         stderr=subprocess.STDOUT, cwd=ROOT),
        subprocess.Popen([*cli, "scheduler", "--interval", "0.5"], stdout=logs["scheduler"], stderr=subprocess.STDOUT,
                         cwd=ROOT),
        subprocess.Popen([*cli, "worker", "--server", server, "--token-file", str(token_file)], stdout=logs["worker"],
                         stderr=subprocess.STDOUT, cwd=ROOT),
    ]
    report: dict = {}
    try:
        worker = _wait(lambda: _check_alive(procs, var) or Worker.objects.filter(name="gpu-box", last_heartbeat__isnull=False).first(), 180,
                       lambda: (var / "worker.log").read_text()[-3000:])
        report["inventory"] = worker.inventory
        print("worker inventory (heartbeat, NVML):")
        print(json.dumps(worker.inventory, indent=2))
        hp = {**_asdict(suggest_train_params(base.num_parameters)), "max_steps": args.steps, "save_steps": 20,
              "logging_steps": 5, "max_seq_length": 256, "batch_size": 8}
        config = LoraConfig.objects.get(name=QLORA_CONFIG)
        dataset = Dataset.objects.get(name=DEMO_DATASET)
        runs = [TrainingRun.objects.create(name=f"qlora-{i}", owner=owner, base_model=base, dataset=dataset,
                                           lora_config=config, hyperparameters=hp) for i in range(args.runs)]
        t0 = time.monotonic()
        deadline = t0 + args.timeout
        while time.monotonic() < deadline:
            _check_alive(procs, var)
            states = {r.pk: TrainingRun.objects.get(pk=r.pk).state for r in runs}
            if all(s in ("succeeded", "failed", "cancelled") for s in states.values()):
                break
            time.sleep(1)
        report["wall_s"] = round(time.monotonic() - t0, 1)
        report["runs"] = [_figures(TrainingRun.objects.get(pk=r.pk)) for r in runs]
        worker.refresh_from_db()
        report["telemetry_samples"] = len(worker.telemetry)
        report["telemetry_last"] = worker.telemetry[-1] if worker.telemetry else None
        print(json.dumps({k: v for k, v in report.items() if k != "inventory"}, indent=2))
        print(f"{len(runs)} QLoRA runs queued at once finished in {report['wall_s']} s "
              f"(setup {round(t0 - started, 1)} s)")
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs.values():
            log.close()
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
            for name in ("worker", "scheduler"):
                (args.out.parent / f"fleet-{name}.log").write_text((var / f"{name}.log").read_text()[-200000:])
    return 0 if report.get("runs") and all(r["state"] == "succeeded" for r in report["runs"]) else 1


def _asdict(params: object) -> dict:
    import dataclasses

    return dataclasses.asdict(params)  # type: ignore[call-overload]


def _figures(run: object) -> dict:
    from webapp.training.models import TrainingRun

    assert isinstance(run, TrainingRun)
    adapter = getattr(run, "adapter", None)
    metrics = adapter.metrics if adapter else {}
    losses = [p["loss"] for p in run.metric_points if "loss" in p]
    return {
        "run": run.pk, "state": run.state, "error": run.error[:500], "attempts": run.attempt_log,
        "worker": run.attempt_log[-1]["worker"] if run.attempt_log else None,
        "gpu": next((e.message for e in run.events.filter(kind="status", message__contains="dispatched")), None),
        "steps": metrics.get("steps"), "runtime_s": metrics.get("runtime_s"), "device": metrics.get("device"),
        "first_loss": losses[0] if losses else None, "final_loss": metrics.get("final_loss"),
        "tokens_per_s": next((p["tokens_per_s"] for p in reversed(run.metric_points) if "tokens_per_s" in p), None),
        **{k: v for k, v in metrics.items() if "peak" in k or "memory" in k},
    }


def _check_alive(procs: list, var: Path) -> None:
    """Stop at once when the web server, the scheduler or the worker has exited."""
    for name, proc in zip(("web", "scheduler", "worker"), procs, strict=True):
        if proc.poll() is not None:
            raise SystemExit(f"the {name} process exited ({proc.returncode}):\n{(var / f'{name}.log').read_text()[-4000:]}")


def _wait(check, timeout, describe):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1)
    raise SystemExit(f"timed out after {timeout}s: {describe()}")


if __name__ == "__main__":
    sys.exit(main())
