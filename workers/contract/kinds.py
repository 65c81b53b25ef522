"""Every adapter job kind, declared once: its spec, its runner, what it costs a GPU and how often it reports.

The control plane reads a kind's spec fields and GPU need from here, the worker builds the spec and runs the
runner from here. A runner is named by its dotted path ("module:function") and imported by the worker when a
job of its kind arrives, so this declaration imports no runner (nor the ML stack).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from workers.contract.jobspecs import (
    AdapterRef,
    ChatSpec,
    CombineSpec,
    CompareSpec,
    EvaluateSpec,
    ExportSpec,
    GenerationParams,
    LoadParams,
    MergeSpec,
    PromptRow,
    PushSpec,
)
from workers.contract.spec import DatasetRef, ModelRef, build


@dataclass(frozen=True)
class JobKindDecl:
    name: str
    spec: type[Any]
    runner: str  # "module:function", called as function(spec, reporter, store)
    # GPU bytes per base parameter: the base loaded once (bf16; a merge's check runs it in float32), the adapters,
    # generation's KV cache and the CUDA context come on top (webapp.fleet.placement). None: no GPU (a push uploads).
    weight_bytes_per_param: int | None
    flush_interval: float = 1.0  # seconds between the reporter's batches

    @property
    def runner_module(self) -> str:
        return self.runner.partition(":")[0]

    @property
    def runner_function(self) -> str:
        return self.runner.partition(":")[2]


KINDS: dict[str, JobKindDecl] = {
    decl.name: decl
    for decl in (
        # The grid fills token by token: its reporter sends four times a second.
        JobKindDecl("compare", CompareSpec, "workers.adapters.generate:run_compare", 2, flush_interval=0.25),
        # A chat session streams answers as they are typed: ten batches a second.
        JobKindDecl("chat", ChatSpec, "workers.adapters.chat:run_chat", 2, flush_interval=0.1),
        JobKindDecl("merge", MergeSpec, "workers.adapters.merge.job:run_merge", 4),
        # The merged form merges and checks as a merge does; the adapter form needs less, but is placed alike.
        JobKindDecl("export", ExportSpec, "workers.adapters.export:run_export", 4),
        JobKindDecl("combine", CombineSpec, "workers.adapters.merge.combine:run_combine", 2),
        JobKindDecl("evaluate", EvaluateSpec, "workers.adapters.evaluate:run_evaluate", 2),
        JobKindDecl("push", PushSpec, "workers.adapters.push:run_push", None),
    )
}
NESTED: dict[str, Any] = {
    "base_model": ModelRef,
    "adapter": AdapterRef,
    "generation": GenerationParams,
    "load": LoadParams,
    "dataset": DatasetRef,
}
NESTED_LISTS: dict[str, Any] = {"adapters": AdapterRef, "prompts": PromptRow}


def spec_from_dict(kind: str, data: dict[str, Any]) -> Any:
    """Build the spec of a job kind from its JSON form, refusing unknown fields at every level."""
    cls = KINDS[kind].spec
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in NESTED and isinstance(value, dict):
            values[key] = build(NESTED[key], value)
        elif key in NESTED_LISTS:
            values[key] = [build(NESTED_LISTS[key], item) for item in value]
        else:
            values[key] = value
    return cls(**values)
