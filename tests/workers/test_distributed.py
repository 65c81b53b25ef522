"""Multi-process training on the CPU: torchrun with the gloo backend, the tiny model, the real launcher.

Each run here starts a torchrun group of 2 real processes through `workers.runtime.launch.run_training_job`; the
reporter is an in-memory one held by the test process, as the Celery task holds the HTTP one.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from workers.contract.reporter import MemoryReporter
from workers.contract.spec import DatasetRef, LoraParams, ModelRef, TrainParams, TrainSpec
from workers.contract.store import ArtifactStore
from workers.training.demo import write_toy_dataset

# A group that does not end within this long has hung (a run here takes seconds).
HANG_S = 300


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    store = ArtifactStore(tmp_path / "store")
    write_toy_dataset(store.path("store://datasets/toy.jsonl"))
    return store


def make_spec(model_dir: Path, name: str, num_gpus: int, **train: Any) -> TrainSpec:
    params = TrainParams(
        learning_rate=5e-3, max_steps=6, batch_size=8, grad_accum=2, max_seq_length=64, warmup_ratio=0.0,
        logging_steps=1, save_steps=0, gradient_checkpointing="off", num_gpus=num_gpus,
    )
    for key, value in train.items():
        setattr(params, key, value)
    return TrainSpec(
        run_id=1, attempt=1, base_model=ModelRef(source=str(model_dir)),
        dataset=DatasetRef(uri="store://datasets/toy.jsonl", format="alpaca"),
        lora=LoraParams(dropout=0.0, r=8, alpha=16), train=params,
        output_uri=f"store://runs/{name}/adapter",
    )


def launch(spec: TrainSpec, reporter: MemoryReporter, store: ArtifactStore) -> dict[str, Any] | None:
    """run_training_job in a thread, so that a hung group fails the test instead of blocking it."""
    from workers.runtime.launch import run_training_job

    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.update(result=run_training_job(spec, lambda: reporter, store)))
    thread.start()
    thread.join(timeout=HANG_S)
    assert not thread.is_alive(), f"the launcher did not return within {HANG_S} s: {reporter.logs[-5:]}"
    return outcome.get("result")


def lora_tensors(store: ArtifactStore, result: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(store.path(result["adapter_uri"]) / "adapter_model.safetensors")


def group_processes() -> list[int]:
    """Live processes of a torchrun group started by this test process (its descendants running a rank)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"torch.distributed.run" in cmdline or b"workers.runtime.distributed" in cmdline:
            if state != "Z" and _descends_from(int(entry.name), os.getpid()):
                found.append(int(entry.name))
    return found


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
        if pid == ancestor:
            return True
    return False


def rank_pid(rank: int) -> int | None:
    for pid in group_processes():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"workers.runtime.distributed" in cmdline and f"RANK={rank}".encode() in environ:
            return pid
    return None


def test_two_process_ddp_matches_one_process_and_reports_once(tiny_model_dir: Path, store: ArtifactStore) -> None:
    single = MemoryReporter()
    one = launch(make_spec(tiny_model_dir, "one", 1), single, store)
    assert one is not None, single.states[-1]

    group = MemoryReporter()
    two = launch(make_spec(tiny_model_dir, "two", 2), group, store)
    assert two is not None, (group.states[-1], group.logs[-10:])
    assert group_processes() == []

    # One reporter, one account: one running and one final state, one gap-free sequence, no line twice.
    assert [s for s, _, _ in group.states] == ["running", "succeeded"]
    seqs = [e["seq"] for e in group.events]
    assert seqs == list(range(1, len(seqs) + 1))
    assert sum(line.startswith("Training: ") for line in group.logs) == 1
    assert any("Launching 2 processes (ddp) on the CPU (gloo): micro-batch 8 x 1" in line for line in group.logs)
    steps = [m["step"] for m in group.metrics if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert two["num_processes"] == 2 and two["per_process_batch"] == [8, 1]
    assert two["steps"] == one["steps"] == 6

    # Same global batch, seed and sample order: the only possible difference is the order of float sums
    # (the all-reduce adds the ranks' gradients where one process accumulates its micro-batches in turn).
    # With two halves both add the same two partial sums, and the weights come out bit-identical here;
    # the bound, 1e-5 of each tensor's largest value, leaves room for fp32 rounding of another summation
    # order (ring all-reduce, more ranks) and is far below what a different sample order does (another
    # seed moves these tensors by more than their own size).
    a, b = lora_tensors(store, one), lora_tensors(store, two)
    assert set(a) == set(b) and any("lora_B" in k for k in a)
    for name in a:
        scale = float(a[name].abs().max())
        assert scale > 0, name
        assert float((a[name] - b[name]).abs().max()) <= 1e-5 * scale, name
    loss_one = [m["loss"] for m in single.metrics if "loss" in m]
    loss_two = [m["loss"] for m in group.metrics if "loss" in m]
    assert loss_two == pytest.approx(loss_one, rel=1e-4)


def test_cancel_stops_every_rank_at_the_same_step(tiny_model_dir: Path, store: ArtifactStore) -> None:
    reporter = MemoryReporter(cancel_after_events=15)  # the "server" answers cancel once 15 events are in
    reporter.flush_interval = 0.0
    assert launch(make_spec(tiny_model_dir, "stop", 2, max_steps=2000), reporter, store) is None
    assert reporter.states[-1][0] == "cancelled"
    assert max(m["step"] for m in reporter.metrics if "loss" in m) < 100
    assert group_processes() == []  # every rank left on its own: a rank still training would hang the group


def test_a_handover_checkpoints_on_every_rank_at_one_step_and_hands_the_job_back(
    tiny_model_dir: Path, store: ArtifactStore
) -> None:
    from workers.contract.jobrunner import INTERRUPTED

    reporter = MemoryReporter()
    reporter.stop_check = lambda: "the worker is shutting down" if len(reporter.events) > 15 else ""
    spec = make_spec(tiny_model_dir, "handover", 2, max_steps=2000, save_steps=1000)
    spec.checkpoint_uri = "store://runs/handover/checkpoints"
    assert launch(spec, reporter, store) is None
    state, _, reason = reporter.states[-1]
    assert state == INTERRUPTED and "shutting down" in reason
    saved = [e["data"]["step"] for e in reporter.events if e["kind"] == "checkpoint"]
    assert len(saved) == 1 and 0 < saved[0] < 1000  # the handover's own checkpoint, written at the stop
    assert (store.path(spec.checkpoint_uri) / f"checkpoint-{saved[0]}" / "trainer_state.json").exists()
    assert group_processes() == []


def test_a_killed_rank_fails_the_attempt_and_the_retry_resumes(tiny_model_dir: Path, store: ArtifactStore) -> None:
    def spec(attempt: int, num_gpus: int) -> TrainSpec:
        s = make_spec(tiny_model_dir, "cut", num_gpus, max_steps=40, save_steps=4, keep_checkpoints=3)
        s.attempt, s.checkpoint_uri = attempt, "store://runs/cut/checkpoints"
        s.output_uri = f"store://runs/cut/attempt-{attempt}/adapter"
        return s

    class KillRankOne(MemoryReporter):
        """SIGKILLs rank 1 as soon as the first checkpoint is reported, like a GPU process lost mid-run."""

        killed: int | None = None

        def _send_events(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
            if self.killed is None and any(e["kind"] == "checkpoint" for e in batch):
                self.killed = rank_pid(1)
                assert self.killed is not None
                os.kill(self.killed, signal.SIGKILL)
            return super()._send_events(batch)

    dying = KillRankOne()
    assert launch(spec(1, 2), dying, store) is None
    assert dying.killed is not None
    state, _, error = dying.states[-1]
    assert state == "failed"
    assert "rank 1 of 2 died (signal SIGKILL)" in error, error
    assert group_processes() == []  # no rank left behind
    saved = [e["data"]["step"] for e in dying.events if e["kind"] == "checkpoint"]
    assert saved and saved[0] == 4

    # The retry: a new attempt on the same checkpoint folder, here on 2 processes again.
    retry = MemoryReporter()
    result = launch(spec(2, 2), retry, store)
    assert result is not None, (retry.states[-1], retry.logs[-10:])
    assert result["resumed_from_step"] >= 4 and result["steps"] == 40
    assert any("Resuming from checkpoint checkpoint-" in line for line in retry.logs)
    trained = [m["step"] for m in retry.metrics if "loss" in m and not m.get("restart")]
    restart = [m["step"] for m in retry.metrics if m.get("restart")]
    assert restart == [result["resumed_from_step"]]  # it picked up at the checkpoint...
    # ...replayed the checkpoint's logged steps (for the lost attempt's unreported ones) and trained the rest
    assert trained[-1] == 40 and sorted(set(trained)) == list(range(1, 41))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_two_process_checkpoint_resumes_in_one_process(
    tiny_model_dir: Path, store: ArtifactStore, strategy: str
) -> None:
    """Checkpoints are un-sharded (FSDP saves full state dicts) and the data order is that of the global
    batch: a retry on one GPU continues the same run, with the learning-rate schedule and the losses of an
    uninterrupted one."""

    def spec(name: str, num_gpus: int, max_steps: int, attempt: int = 1) -> TrainSpec:
        s = make_spec(
            tiny_model_dir, name, num_gpus, max_steps=max_steps, save_steps=4, lr_scheduler="linear", strategy=strategy
        )
        s.attempt, s.checkpoint_uri = attempt, f"store://runs/{name}/checkpoints"
        s.output_uri = f"store://runs/{name}/attempt-{attempt}/adapter"
        return s

    whole = MemoryReporter()
    assert launch(spec("whole", 1, 8), whole, store) is not None

    first = MemoryReporter()
    assert launch(spec("moved", 2, 8), first, store) is not None
    assert [s for s, _, _ in first.states] == ["running", "succeeded"]
    # Keep only the step-4 checkpoint, as if the group had died after it.
    shutil.rmtree(store.path("store://runs/moved/checkpoints/checkpoint-8"))
    resumed = MemoryReporter()
    result = launch(spec("moved", 1, 8, attempt=2), resumed, store)
    assert result is not None, resumed.states[-1]
    assert result["resumed_from_step"] == 4 and result["steps"] == 8

    def curve(reporter: MemoryReporter) -> dict[int, tuple[float, float]]:
        return {m["step"]: (m["learning_rate"], m["loss"]) for m in reporter.metrics if "loss" in m}

    expected, got = curve(whole), curve(resumed)
    assert sorted(got) == [1, 2, 3, 4, 5, 6, 7, 8]  # 1-4 replayed from the checkpoint's log, 5-8 trained
    for step in got:
        assert got[step][0] == pytest.approx(expected[step][0], rel=1e-6)
        assert got[step][1] == pytest.approx(expected[step][1], rel=1e-3)  # the same samples, the same weights


@pytest.mark.parametrize(
    ("train", "lora", "field", "words"),
    [
        ({"num_gpus": 0}, {}, "num_gpus", "between 1 and 8"),
        ({"num_gpus": 9}, {}, "num_gpus", "between 1 and 8"),
        ({"num_gpus": 3, "batch_size": 8, "grad_accum": 2}, {}, "num_gpus", "multiple of 3"),
        ({"strategy": "zero3"}, {}, "strategy", "one of ddp, fsdp"),
        ({"num_gpus": 2, "strategy": "fsdp"}, {"quantization": "8bit"}, "strategy", "8-bit"),
        ({"num_gpus": 2, "strategy": "fsdp"}, {"use_dora": True}, "strategy", "DoRA"),
        ({"num_gpus": 2, "strategy": "fsdp"}, {"method": "ia3"}, "strategy", "LoRA adapters only"),
        ({"num_gpus": 2, "strategy": "fsdp"}, {"init": "pissa"}, "strategy", "pissa"),
        ({"num_gpus": 2, "strategy": "fsdp"}, {"quantization": "4bit", "init": "loftq", "alpha": 16}, "strategy", "loftq"),
    ],
)
def test_bad_combinations_are_refused_on_the_field(
    train: dict[str, Any], lora: dict[str, Any], field: str, words: str
) -> None:
    params, adapter = TrainParams(**train), LoraParams(r=16, **lora)
    errors = {**params.validate(), **adapter.validate(params)}
    assert field in errors and words in errors[field], errors


@pytest.mark.parametrize(
    ("train", "lora"),
    [
        ({"num_gpus": 2, "strategy": "fsdp"}, {"quantization": "4bit"}),  # storage set by the runner
        ({"num_gpus": 2, "strategy": "ddp"}, {"quantization": "8bit", "use_dora": True}),
        ({"num_gpus": 1, "strategy": "fsdp"}, {"quantization": "8bit"}),  # one GPU: the strategy is ignored
        ({"num_gpus": 3, "batch_size": 6, "grad_accum": 1}, {}),
    ],
)
def test_good_combinations_pass(train: dict[str, Any], lora: dict[str, Any]) -> None:
    params = TrainParams(**train)
    assert {**params.validate(), **LoraParams(**lora).validate(params)} == {}


def test_the_global_batch_is_split_accumulation_first() -> None:
    assert TrainParams(num_gpus=2, batch_size=8, grad_accum=4).per_rank_batch() == (8, 2)
    assert TrainParams(num_gpus=4, batch_size=8, grad_accum=1).per_rank_batch() == (2, 1)
    assert TrainParams(num_gpus=3, batch_size=8, grad_accum=2).per_rank_batch() is None


def test_fsdp_qlora_shards_a_4bit_base_stored_in_the_compute_dtype(tiny_model_dir: Path, store: ArtifactStore) -> None:
    reporter = MemoryReporter()
    spec = make_spec(tiny_model_dir, "qlora", 2, strategy="fsdp", max_steps=3)
    spec.lora.quantization = "4bit"
    result = launch(spec, reporter, store)
    assert result is not None, (reporter.states[-1], reporter.logs[-10:])
    assert any("FSDP: 4-bit weights stored as float32 (bnb_4bit_quant_storage)" in line for line in reporter.logs)
    assert result["strategy"] == "fsdp" and result["steps"] == 3
    assert any("lora_A" in name for name in lora_tensors(store, result))  # gathered and saved whole by rank 0


def test_a_refused_spec_fails_before_any_process_starts(tiny_model_dir: Path, store: ArtifactStore) -> None:
    reporter = MemoryReporter()
    assert launch(make_spec(tiny_model_dir, "bad", 3), reporter, store) is None
    state, _, error = reporter.states[-1]
    assert state == "failed" and "num_gpus" in error and "multiple of 3" in error
    assert not any(line.startswith("Launching") for line in reporter.logs)


# --- the memory estimate per GPU -------------------------------------------------------------------------

LLAMA_70B = {
    "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
    "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
}


def llama_70b() -> Any:
    from transformers import AutoConfig

    from workers.training.modelshape import ModelShape

    return ModelShape.from_config(AutoConfig.for_model("llama", **LLAMA_70B))


def test_fsdp_divides_what_it_shards_and_keeps_activations_per_gpu() -> None:
    from workers.training.estimate import FSDP_GATHERED_LAYERS, GiB, estimate

    shape = llama_70b()
    one = estimate(shape, quantization="4bit", seq_len=2048, micro_batch=1)
    two = estimate(shape, quantization="4bit", seq_len=2048, micro_batch=1, num_gpus=2, strategy="fsdp")
    layer = one.weights // shape.num_layers
    assert two.weights == pytest.approx(one.weights / 2 + FSDP_GATHERED_LAYERS * layer, abs=1)
    assert two.adapter == pytest.approx(one.adapter / 2, abs=1)
    assert (two.activations, two.logits, two.temporary) == (one.activations, one.logits, one.temporary)
    assert one.weights > 35 * GiB and two.total < 0.6 * one.total  # a 70B in 4-bit: ~20 GiB a GPU on two
    assert two.num_gpus == 2 and "per GPU on 2 (fsdp)" in two.summary()


def test_ddp_replicates_and_adds_its_gradient_buckets() -> None:
    from workers.training.estimate import estimate

    shape = llama_70b()
    one = estimate(shape, quantization="4bit", seq_len=2048, micro_batch=2)
    two = estimate(shape, quantization="4bit", seq_len=2048, micro_batch=2, num_gpus=2, strategy="ddp")
    assert two.weights == one.weights and two.activations == one.activations
    assert one.adapter < two.adapter < 1.5 * one.adapter  # one more copy of the adapter's gradients


def test_the_spec_estimate_uses_each_gpus_share_of_the_batch() -> None:
    from workers.training.specestimate import estimate_for_spec

    shape, lora = llama_70b(), LoraParams(quantization="4bit")
    one = estimate_for_spec(shape, lora, TrainParams(batch_size=4, grad_accum=1, max_seq_length=2048))
    fsdp = estimate_for_spec(
        shape, lora, TrainParams(batch_size=4, grad_accum=1, max_seq_length=2048, num_gpus=4, strategy="fsdp")
    )
    assert fsdp.estimate.tokens == one.estimate.tokens // 4  # micro-batch 4 split across 4 GPUs
    assert fsdp.estimate.total < one.estimate.total / 2
    assert fsdp.as_dict()["estimate"]["num_gpus"] == 4


# --- the run form ------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_run_form_offers_both_fields_and_names_the_refused_one(tiny_model_dir: Path, store_dir: Path, client, local_models) -> None:  # type: ignore[no-untyped-def]
    from tests.webapp.factories import demo_objects, make_run
    from webapp.training.models import TrainingRun

    user, base, dataset, config = demo_objects(tiny_model_dir)
    run = make_run(user, base, dataset, config)
    client.login(username="owner", password="owner-pass-123")
    page = client.get("/runs/new/").content.decode()
    assert 'name="num_gpus"' in page and 'name="strategy"' in page and '<option value="fsdp"' in page

    form = {
        "base_model": base.pk, "dataset": dataset.pk, "lora_config": config.pk,
        **{k: v for k, v in run.hyperparameters.items() if not isinstance(v, bool)},
    }
    config.params.update(use_dora=True)
    config.save()
    response = client.post("/runs/new/", {**form, "num_gpus": 2, "strategy": "fsdp"})
    assert response.status_code == 400 and "DoRA recomputes the norm" in response.content.decode()
    response = client.post("/runs/new/", {**form, "num_gpus": 3, "grad_accum": 1, "batch_size": 16})
    assert response.status_code == 400 and "must split evenly across 3 GPUs" in response.content.decode()
    response = client.post("/runs/new/", {**form, "num_gpus": 2, "strategy": "ddp"})
    assert response.status_code == 302
    created = TrainingRun.objects.latest("id")
    assert created.hyperparameters["num_gpus"] == 2 and created.hyperparameters["strategy"] == "ddp"
