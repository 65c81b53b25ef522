"""Starting adapter jobs: checks that the request makes sense, then one queued AdapterJob row.

Everything here raises `JobError` with field-named messages before anything is stored, so
a refused request loses nothing and says what is wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from typing import Any

from django.conf import settings
from django.db import transaction

from webapp.catalog.models import BaseModel, Dataset
from webapp.fleet.needs import adapter_job_needs
from webapp.fleet.placement import runtime_label
from webapp.jobs import ledger
from webapp.playground.kinds import JobKind
from webapp.playground.models import AdapterJob, Comparison, PromptSet
from webapp.training.models import Adapter, TrainingRun
from workers.contract import jobspecs
from workers.contract.spec import DatasetRef
from workers.contract.store import ArtifactStore
from workers.data.datasets import numbered_records, to_trl_row
from workers.data.prompts import prompt_row

MAX_PROMPTS = 512


class JobError(ValueError):
    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


def common_base(adapters: list[Adapter]) -> BaseModel:
    """The one base model all the adapters belong to; refuses a mix, naming who was trained on what."""
    if not adapters:
        raise JobError({"adapters": "pick at least one adapter"})
    bases = {a.base_model_id for a in adapters}
    if len(bases) > 1 or None in bases:
        described = ", ".join(f"{a} on {a.base_model or 'an unknown base'}" for a in adapters)
        raise JobError({"adapters": f"the adapters must share one base model; got {described}"})
    base = adapters[0].base_model
    assert base is not None
    return base


def base_load(adapters: list[Adapter], precision: str = "auto") -> tuple[jobspecs.LoadParams, str]:
    """How the base is loaded for these adapters (jobspecs.base_load: auto follows what they were trained on),
    and the line that says so in the job's log."""
    try:
        return jobspecs.base_load(precision, [a.quantization for a in adapters])
    except ValueError as exc:
        raise JobError({"base_precision": str(exc)}) from exc


def queue_job(
    kind: str,
    owner: Any,
    base: BaseModel,
    spec: Any,
    adapters: list[Adapter],
    notes: tuple[str, ...] = (),
    extra: dict[str, Any] | None = None,
    labels: list[str] | None = None,
) -> AdapterJob:
    """The queued job of a checked spec. `extra`: what the server keeps in the job's params beside the worker's
    spec (a choice the spec holds only resolved, names for its pages), stored with the row in one write.
    `labels`: the worker labels the job needs (placement)."""
    problems = spec.validate()
    if problems:
        raise JobError(problems)
    params = dataclasses.asdict(spec)
    for transient in ("job_id", "attempt", "token"):
        params.pop(transient, None)
    params.update(extra or {})
    with transaction.atomic():
        job = AdapterJob.objects.create(kind=kind, owner=owner, base_model=base, params=params,
                                        needs_labels=list(labels or []), **adapter_job_needs(kind, base))
        job.adapters.set(adapters)
        if "output_uri" in params:  # known only once the row has its id
            job.params["output_uri"] = job.output_uri()
            job.save(update_fields=["params"])
        ledger.note(job, f"Queued by {owner}")
        for line in notes:
            ledger.note(job, line)
    return job


def start_compare(
    owner: Any,
    prompt_set: PromptSet,
    adapters: list[Adapter],
    generation: jobspecs.GenerationParams,
    include_base: bool = True,
    name: str = "",
    base_precision: str = "auto",
) -> Comparison:
    """A comparison job: `base_precision` is one of jobspecs.BASE_PRECISIONS (auto follows the adapters)."""
    base = common_base(adapters) if adapters else None
    if base is None:
        raise JobError({"adapters": "pick at least one adapter to compare with its base"})
    load, loading = base_load(adapters, base_precision)
    spec = jobspecs.CompareSpec(
        job_id=0,
        attempt=0,
        base_model=base.model_ref(),
        adapters=[a.ref() for a in adapters],
        prompts=[jobspecs.PromptRow(**row) for row in prompt_set.rows],
        generation=generation,
        load=load,
        include_base=include_base,
    )
    with transaction.atomic():
        # base_precision: the choice, beside the load it resolved to.
        job = queue_job(
            JobKind.COMPARE, owner, base, spec, adapters, notes=(loading,), extra={"base_precision": base_precision}
        )
        return Comparison.objects.create(
            name=name,
            owner=owner,
            base_model=base,
            prompt_set=prompt_set,
            include_base=include_base,
            generation=dataclasses.asdict(generation),
            job=job,
        )


def start_merge(owner: Any, adapter: Adapter, dtype: str = "auto") -> AdapterJob:
    base = common_base([adapter])
    spec = jobspecs.MergeSpec(
        job_id=0, attempt=0, base_model=base.model_ref(), adapter=adapter.ref(), output_uri="pending", dtype=dtype
    )
    return queue_job(JobKind.MERGE, owner, base, spec, [adapter])


def start_export(
    owner: Any,
    adapter: Adapter,
    form: str = "merged",
    name: str = "tunedeck-model",
    quantize: str = "",
    system: str = "",
    base_name: str = "",
    dtype: str = "auto",
    temperature: float | None = None,
    top_p: float | None = None,
    target: str = "ollama",
    check_prompts: list[str] | None = None,
    max_new_tokens: int = 32,
) -> AdapterJob:
    """An export job: a folder Ollama imports, or one vLLM serves, checked on a worker that has vLLM (the job
    needs the worker label placement.runtime_label("vllm"), which such workers carry). jobspecs.ExportSpec says what each
    choice does."""
    base = common_base([adapter])
    spec = jobspecs.ExportSpec(
        job_id=0, attempt=0, base_model=base.model_ref(), adapter=adapter.ref(), output_uri="pending", target=target,
        form=form, name=name, base_name=base_name, quantize=quantize, system=system, temperature=temperature,
        top_p=top_p, dtype=dtype, check_prompts=list(check_prompts or []), max_new_tokens=max_new_tokens,
    )
    labels = [runtime_label("vllm")] if target == "vllm" else []
    return queue_job(JobKind.EXPORT, owner, base, spec, [adapter], labels=labels)


def start_combine(
    owner: Any,
    adapters: list[Adapter],
    weights: list[float],
    combination_type: str,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    name: str = "",
) -> AdapterJob:
    base = common_base(adapters)
    spec = jobspecs.CombineSpec(
        job_id=0,
        attempt=0,
        base_model=base.model_ref(),
        adapters=[a.ref() for a in adapters],
        weights=weights,
        combination_type=combination_type,
        output_uri="pending",
        density=density,
        majority_sign_method=majority_sign_method,
        svd_rank=svd_rank,
    )
    # name: the new adapter's (not part of the worker's spec).
    return queue_job(JobKind.COMBINE, owner, base, spec, adapters, extra={"name": name} if name else None)


def start_evaluate(
    owner: Any,
    adapters: list[Adapter],
    dataset: Dataset | None = None,
    held_out_of: TrainingRun | None = None,
    include_base: bool = True,
    max_rows: int = 200,
    generation: jobspecs.GenerationParams | None = None,
) -> AdapterJob:
    """Score adapters on a dataset with references, or on what a run evaluated on: its eval dataset (whole), or
    the held-out split of its own dataset."""
    base = common_base(adapters)
    split: dict[str, Any] = {}
    source = ""
    if held_out_of is not None:
        train = held_out_of.train_params()
        if held_out_of.eval_dataset is not None:
            dataset, source = held_out_of.eval_dataset, "eval_dataset"
        elif not train.eval_fraction:
            raise JobError({"held_out_of": f"run {held_out_of.pk} held nothing out (its eval_fraction is 0 and it "
                                           "has no eval dataset)"})
        else:
            dataset, source = held_out_of.dataset, "held_out"
            split = {"split": "held_out", "eval_fraction": train.eval_fraction, "seed": train.seed}
    if dataset is None:
        raise JobError({"dataset": "pick a dataset with reference answers, or a run's held-out split"})
    if dataset.format == "text":
        raise JobError({"dataset": f"{dataset} is plain text: evaluation needs prompts with reference answers"})
    load, loading = base_load(adapters)
    spec = jobspecs.EvaluateSpec(
        job_id=0,
        attempt=0,
        base_model=base.model_ref(),
        adapters=[a.ref() for a in adapters],
        dataset=DatasetRef(uri=dataset.uri, format=dataset.format),
        include_base=include_base,
        max_rows=max_rows,
        generation=generation or jobspecs.GenerationParams(max_new_tokens=64),
        load=load,
        **split,
    )
    named: dict[str, Any] = {"dataset_id": dataset.pk, "dataset_name": str(dataset)}
    if held_out_of is not None:  # the run whose evaluation rows these are: its held-out split or its eval dataset
        named.update(held_out_of=held_out_of.pk, eval_rows=source)
    return queue_job(JobKind.EVALUATE, owner, base, spec, adapters, notes=(loading,), extra=named)


def start_push(owner: Any, adapter: Adapter, source_uri: str, repo_id: str, private: bool = True) -> AdapterJob:
    if not settings.HF_TOKEN:
        raise JobError({"repo_id": "pushing needs a Hugging Face token: set TUNEDECK_HF_TOKEN on the server"})
    spec = jobspecs.PushSpec(
        job_id=0,
        attempt=0,
        source_uri=source_uri,
        repo_id=repo_id.strip(),
        private=private,
        commit_message=f"Upload {adapter} from Tunedeck",
        endpoint=settings.HF_ENDPOINT,
        token=settings.HF_TOKEN,
    )
    return queue_job(JobKind.PUSH, owner, common_base([adapter]), spec, [adapter])


# --- prompt sets ------------------------------------------------------------------------------------


def parse_prompts(text: str) -> list[dict[str, str]]:
    """Typed prompts: one per line, or blocks separated by a line holding only '---' (multi-line prompts)."""
    lines = text.replace("\r\n", "\n").split("\n")
    if any(line.strip() == "---" for line in lines):
        blocks: list[str] = []
        current: list[str] = []
        for line in lines:
            if line.strip() == "---":
                blocks.append("\n".join(current))
                current = []
            else:
                current.append(line)
        blocks.append("\n".join(current))
        prompts = [b.strip() for b in blocks]
    else:
        prompts = [line.strip() for line in lines]
    rows = [{"prompt": p, "reference": ""} for p in prompts if p]
    if not rows:
        raise JobError({"prompts": "type at least one prompt"})
    if len(rows) > MAX_PROMPTS:
        raise JobError({"prompts": f"at most {MAX_PROMPTS} prompts, got {len(rows)}"})
    return rows


def dataset_prompts(dataset: Dataset, count: int) -> list[dict[str, Any]]:
    """The first `count` rows of a dataset as prompts with their reference answers, as evaluations take them
    (workers.data.prompts.prompt_row): a conversation's every turn before its last answer, system prompt included."""
    if dataset.format == "text":
        raise JobError({"dataset": f"{dataset} is plain text: it has no prompts with answers"})
    try:
        # Only the rows asked for are read: a stored dataset was validated whole when it was registered.
        path = ArtifactStore(settings.ARTIFACT_STORE).path(dataset.uri)
        with contextlib.closing(numbered_records(path)) as records:
            first = itertools.islice(records, max(1, min(count, MAX_PROMPTS)))
            prompts = [prompt_row(to_trl_row(dataset.format, record), number)
                       for number, (_, record) in enumerate(first, 1)]
    except (OSError, ValueError, KeyError) as exc:  # a bad uri, or a stored row that no longer converts
        raise JobError({"dataset": f"{dataset} cannot be read: {exc}"}) from exc
    return [dataclasses.asdict(row) for row in prompts]
