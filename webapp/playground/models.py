"""Work with finished adapters: comparisons (prompt sets, outputs, votes), merges, combinations, evaluations.

Each of these runs as an `AdapterJob` on a worker, with the same ledger as a training run
(state, attempt fencing, cancel flag, events); what a job of each kind records, as it runs and once it has
succeeded, is declared in kinds.py.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.db import models
from django.urls import reverse
from django.utils.crypto import salted_hmac

from webapp.catalog.models import BaseModel, Dataset
from webapp.jobs.models import LedgerEvent, LedgerJob
from webapp.playground.kinds import HOOKS, JobKind
from webapp.training.models import Adapter
from workers.contract.jobspecs import BASE_KEY
from workers.contract.kinds import KINDS


class AdapterJob(LedgerJob):
    NOUN = "job"
    TASK = "tunedeck.run_adapter_job"
    WORKER_PATH = "adapter-jobs"
    ON_WORKER, SUMMARY_FIELDS = "current_job", ("kind",)

    kind = models.CharField(max_length=16, choices=JobKind.choices)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="adapter_jobs")
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT, related_name="adapter_jobs")
    # The job spec's fields chosen by the control plane (without job_id and attempt, added at claim).
    params = models.JSONField(default=dict)
    # The adapters the job reads (in column order for comparisons and evaluations).
    adapters = models.ManyToManyField(Adapter, related_name="jobs", blank=True)
    worker = models.ForeignKey("fleet.Worker", null=True, blank=True, on_delete=models.SET_NULL, related_name="adapter_jobs")
    result = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["state", "id"], name="adapterjob_state_id")]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} job {self.pk}"

    def output_uri(self) -> str:
        from workers.contract.store import ArtifactStore

        return ArtifactStore.uri("jobs", self.pk, "output")

    def job_spec(self) -> dict[str, Any]:
        """The worker's spec: the params that are spec fields (others, like a new adapter's name, stay here)."""
        names = {f.name for f in dataclasses.fields(KINDS[self.kind].spec)}
        spec = {**{k: v for k, v in self.params.items() if k in names}, "job_id": self.pk, "attempt": self.attempt}
        extras = HOOKS[self.kind].at_claim
        if extras is not None:
            spec.update(extras(self))
        return spec

    def base_precision(self) -> dict[str, Any] | None:
        """How a compare or evaluate job loads its base: the choice (jobspecs.BASE_PRECISIONS), the load it
        resolved to, and the precision the worker loaded (once the job has succeeded); None for other kinds."""
        load = (self.params or {}).get("load")
        if load is None:
            return None
        return {
            "chosen": self.params.get("base_precision", "auto"),
            "quantization": load.get("quantization", "none"),
            "compute_dtype": load.get("compute_dtype", "auto"),
            "used": (self.result or {}).get("base_precision"),
        }

    def on_start(self) -> None:
        hook = HOOKS[self.kind].on_start
        if hook is not None:
            hook(self)

    def worker_reply(self) -> dict[str, Any]:
        """What this kind of job is told with each reply to its batches, beyond the ledger's flags."""
        hook = HOOKS[self.kind].reply
        return hook(self) if hook is not None else {}

    def fold_events(self, events: list[dict[str, Any]]) -> None:
        hook = HOOKS[self.kind].fold_events
        if hook is not None:
            hook(self, events)

    def record_result(self, result: dict[str, Any]) -> None:
        """What a succeeded job produced (called by the ledger inside the state change's transaction): its
        result, and what its kind records from it (playground/kinds.py)."""
        AdapterJob.objects.filter(pk=self.pk).update(result=result)
        record = HOOKS[self.kind].record
        if record is not None:
            record(self, result)


class JobEvent(LedgerEvent):
    """An adapter job's log lines, progress and streamed outputs (see LedgerEvent)."""

    job = models.ForeignKey(AdapterJob, on_delete=models.CASCADE, related_name="events")

    class Meta(LedgerEvent.Meta):
        constraints = [models.UniqueConstraint(fields=["job", "attempt", "seq"], name="jobevent_unique_seq")]
        indexes = [models.Index(fields=["job", "id"], name="jobevent_job_id")]


class PromptSet(models.Model):
    """A reusable list of prompts, each with an optional reference answer."""

    name = models.CharField(max_length=200)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="prompt_sets")
    rows = models.JSONField(default=list)  # [{"prompt": str, "reference": str}]
    source_dataset = models.ForeignKey(Dataset, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return self.name

    @property
    def has_references(self) -> bool:
        return any(row.get("reference") for row in self.rows)


class Comparison(models.Model):
    """A base, up to 8 adapters (and the base itself) and a prompt set, generated side by side by one job."""

    name = models.CharField(max_length=200, blank=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="comparisons")
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT, related_name="comparisons")
    prompt_set = models.ForeignKey(PromptSet, on_delete=models.PROTECT, related_name="comparisons")
    include_base = models.BooleanField(default=True)
    generation = models.JSONField(default=dict)
    job = models.OneToOneField(AdapterJob, null=True, on_delete=models.SET_NULL, related_name="comparison")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return self.name or f"comparison {self.pk}"

    def columns(self) -> list[tuple[str, str]]:
        """(key, label) of each column, in order: the base first, then the adapters as chosen."""
        columns = [(BASE_KEY, f"{self.base_model} (base)")] if self.include_base else []
        params = self.job.params if self.job else {}
        return columns + [(a["key"], a["label"]) for a in params.get("adapters", [])]

    def store_outputs(self, outputs: list[dict[str, Any]]) -> None:
        """The final texts (authoritative: the streamed deltas only fill the grid while it runs)."""
        for out in outputs:
            ComparisonCell.objects.update_or_create(
                comparison=self,
                row=int(out["row"]),
                column=str(out["column"])[:64],
                defaults={"text": str(out["text"]), "tokens": int(out.get("tokens") or 0), "done": True},
            )

    def blind_order(self, user_id: int, row: int) -> list[str]:
        """The order a voter sees a row's outputs in: shuffled per voter and row, stable across page loads.

        The shuffle is seeded with an HMAC under the server's secret: seeded with the ids alone (all of them
        public), any voter could replay it and unmask every row of their ballot, or anyone else's."""
        keys = [key for key, _ in self.columns()]
        seed = salted_hmac("tunedeck.playground.blind_order", f"{self.pk}:{user_id}:{row}").digest()
        random.Random(seed).shuffle(keys)
        return keys

    def win_rates(self) -> list[dict[str, Any]]:
        """Per column: wins, rows voted, and the share of decided votes it won (ties count for nobody)."""
        votes = list(self.votes.values_list("choice", flat=True))
        decided = [v for v in votes if v != Vote.TIE]
        return [
            {
                "key": key,
                "label": label,
                "wins": decided.count(key),
                "rate": decided.count(key) / len(decided) if decided else None,
            }
            for key, label in self.columns()
        ] + [{"key": Vote.TIE, "label": "Tie", "wins": len(votes) - len(decided), "rate": None}]


class ComparisonCell(models.Model):
    comparison = models.ForeignKey(Comparison, on_delete=models.CASCADE, related_name="cells")
    row = models.PositiveIntegerField()
    column = models.CharField(max_length=64)
    text = models.TextField(blank=True)
    tokens = models.PositiveIntegerField(default=0)
    done = models.BooleanField(default=False)

    class Meta:
        ordering = ["row", "id"]
        constraints = [models.UniqueConstraint(fields=["comparison", "row", "column"], name="cell_unique")]

    def __str__(self) -> str:
        return f"row {self.row} · {self.column}"


class Vote(models.Model):
    """A teammate's blind pick of the best output of one row (or a tie): one per person per row."""

    TIE = "tie"

    comparison = models.ForeignKey(Comparison, on_delete=models.CASCADE, related_name="votes")
    row = models.PositiveIntegerField()
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="votes")
    choice = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["comparison", "row", "user"], name="vote_once_per_row")]

    def __str__(self) -> str:
        return f"{self.user_id} on row {self.row}: {self.choice}"


class MergedModel(models.Model):
    """A full model: an adapter merged into its base, with the figures of the check that followed; or an export,
    a folder another runtime imports (`target`), holding such a merged model or the adapter itself (`form`)."""

    MERGE = ""  # target of a plain merge

    adapter = models.ForeignKey(Adapter, on_delete=models.CASCADE, related_name="merged_models")
    job = models.OneToOneField(AdapterJob, null=True, on_delete=models.SET_NULL, related_name="merged_model")
    uri = models.CharField(max_length=500)
    dtype = models.CharField(max_length=16)
    size_bytes = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    verified = models.BooleanField(default=False)
    figures = models.JSONField(default=dict, blank=True)  # the check: logit differences, agreement, tolerance
    target = models.CharField(max_length=16, blank=True, default=MERGE)  # an export's runtime: ollama
    form = models.CharField(max_length=16, blank=True, default="")  # an export's: merged or adapter
    name = models.CharField(max_length=200, blank=True, default="")  # an export's model name (ollama create <name>)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        if self.target:
            return f"{self.adapter} for {self.target} ({self.form})"
        return f"{self.adapter} merged ({self.dtype})"

    @property
    def checked(self) -> bool:
        """Whether a merge was checked (an adapter-form export merges nothing)."""
        return self.form != "adapter"

    @property
    def kind_label(self) -> str:
        return f"{self.target} export, {self.form}" if self.target else "merged model"


class Thumb(models.Model):
    """A teammate's thumbs up or down on one output of a comparison: one per person per output, changed in place."""

    comparison = models.ForeignKey(Comparison, on_delete=models.CASCADE, related_name="thumbs")
    row = models.PositiveIntegerField()
    column = models.CharField(max_length=64)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="thumbs")
    up = models.BooleanField()
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["comparison", "row", "column", "user"], name="thumb_once_per_output")
        ]

    def __str__(self) -> str:
        return f"{self.user_id} on row {self.row} · {self.column}: {'up' if self.up else 'down'}"


class VoteDataset(models.Model):
    """Where a dataset made from a comparison came from: its votes (preference pairs) or thumbs (feedback rows),
    with the figures of what was kept and left out. The link lives here, above catalog and training, so that a
    dataset, and an adapter trained on it, lead back to the comparison and the people who judged it."""

    PREFERENCE, FEEDBACK = "preference", "feedback"
    KINDS = [(PREFERENCE, "preference pairs from blind votes"), (FEEDBACK, "feedback from thumbs up and down")]

    dataset = models.OneToOneField(Dataset, on_delete=models.CASCADE, related_name="vote_source")
    # A deleted comparison leaves the dataset's provenance by name.
    comparison = models.ForeignKey(Comparison, null=True, on_delete=models.SET_NULL, related_name="datasets")
    comparison_name = models.CharField(max_length=200)
    # Or the chat whose thumbs it holds (feedback only).
    chat = models.ForeignKey("ChatSession", null=True, blank=True, on_delete=models.SET_NULL, related_name="datasets")
    kind = models.CharField(max_length=16, choices=KINDS)
    # The adapter whose column won the most votes when the dataset was made: where a run on it may start from.
    winner = models.ForeignKey(Adapter, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    judgements = models.PositiveIntegerField(help_text="The votes (or thumbs) counted.")
    figures = models.JSONField(default=dict)  # what was kept and left out: votedata.Figures
    summary = models.CharField(max_length=500)  # the figures in a line, as pages and the CLI show them
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.dataset_id} from {self.comparison_name}"

    @property
    def objective(self) -> str:
        """The objective the rows are made for: DPO for pairs, KTO for unpaired feedback."""
        return "dpo" if self.kind == self.PREFERENCE else "kto"

    def train_url(self) -> str:
        """The New run page filled in for this dataset: its objective, the comparison's base, and the winning
        adapter to start from (the page's initial values, to review before queueing)."""
        query = {"objective": self.objective, "dataset": self.dataset_id}
        if self.comparison is not None:
            query["base_model"] = self.comparison.base_model_id
        elif self.chat is not None:
            query["base_model"] = self.chat.base_model_id
        if self.winner_id is not None:
            query["init_adapter"] = self.winner_id
        return f"{reverse('run-new')}?{urlencode(query)}"


class AdapterAlias(models.Model):
    """A name a deployment asks for (`production`, `candidate`) that points at one adapter of a base model: unique
    per base, moved by people or scripts (aliases.move), each move or refusal kept as an AliasMove."""

    base_model = models.ForeignKey(BaseModel, on_delete=models.CASCADE, related_name="aliases")
    name = models.CharField(max_length=50)
    # The adapter it points at; null once that adapter was deleted (the alias and its history stay).
    adapter = models.ForeignKey(Adapter, null=True, on_delete=models.SET_NULL, related_name="aliases")
    updated_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["base_model_id", "name"]
        # Also the by-alias lookup of deployment scripts: (base, name) → adapter.
        constraints = [models.UniqueConstraint(fields=["base_model", "name"], name="alias_unique_per_base")]

    def __str__(self) -> str:
        return f"{self.name} ({self.base_model})"


class AliasMove(models.Model):
    """One attempt to move an alias: who, when, from which adapter to which, the evaluation it required (if any)
    with the scores it compared, and whether it moved or was refused (and why)."""

    MOVED, REFUSED = "moved", "refused"

    alias = models.ForeignKey(AdapterAlias, on_delete=models.CASCADE, related_name="moves")
    from_adapter = models.ForeignKey(Adapter, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    from_name = models.CharField(max_length=200, blank=True)  # kept when that adapter is deleted
    to_adapter = models.ForeignKey(Adapter, null=True, on_delete=models.SET_NULL, related_name="+")
    to_name = models.CharField(max_length=200)
    by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    at = models.DateTimeField(auto_now_add=True)
    outcome = models.CharField(max_length=8, choices=[(MOVED, "moved"), (REFUSED, "refused")])
    # {"dataset", "dataset_name", "metric", "margin", "holder_score", "candidate_score", "holder_job",
    # "candidate_job"}: empty when the move required no evaluation.
    requirement = models.JSONField(default=dict, blank=True)
    message = models.CharField(max_length=1000)

    class Meta:
        ordering = ["-id"]
        # The alias's history, newest first.
        indexes = [models.Index(fields=["alias", "-id"], name="aliasmove_alias_id")]

    def __str__(self) -> str:
        return f"{self.alias_id}: {self.outcome} {self.from_name or '∅'} → {self.to_name}"


class ChatSession(models.Model):
    """A conversation with a base and up to four of its adapters (and the base itself) side by side.

    The model stays loaded on a worker while the session is in use: its current `job` (kind chat) holds the
    GPU and answers each message; after `idle_timeout_s` without one the job ends, and the next message loads
    the model again. Every column keeps its own conversation (its own earlier answers)."""

    title = models.CharField(max_length=200, blank=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="chat_sessions")
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT, related_name="chat_sessions")
    adapters = models.ManyToManyField(Adapter, related_name="chat_sessions", blank=True)
    include_base = models.BooleanField(default=True)
    # The adapters' column order ([{"key", "label"}]), as chosen.
    columns_order = models.JSONField(default=list)
    system_prompt = models.TextField(blank=True)
    generation = models.JSONField(default=dict)  # max_new_tokens, temperature, top_p, seed
    base_precision = models.CharField(max_length=16, default="auto")
    idle_timeout_s = models.PositiveIntegerField(default=600)
    job = models.ForeignKey(AdapterJob, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    closed = models.BooleanField(default=False)  # closed by its user: the model is unloaded; a new message reopens
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at", "-id"]

    def __str__(self) -> str:
        return self.title or f"chat {self.pk}"

    def get_absolute_url(self) -> str:
        return reverse("chat-detail", args=[self.pk])

    def columns(self) -> list[tuple[str, str]]:
        """(key, label) of each column, in order: the base first, then the adapters as chosen."""
        base = [(BASE_KEY, f"{self.base_model} (base)")] if self.include_base else []
        return base + [(c["key"], c["label"]) for c in self.columns_order]


class ChatMessage(models.Model):
    """One message of a chat session (a turn, numbered from 1), with the settings it was answered with."""

    session = models.ForeignKey(ChatSession, on_delete=models.CASCADE, related_name="messages")
    index = models.PositiveIntegerField()
    content = models.TextField()
    system_prompt = models.TextField(blank=True)
    generation = models.JSONField(default=dict)
    stop_requested = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["index"]
        constraints = [models.UniqueConstraint(fields=["session", "index"], name="chatmessage_unique_index")]

    def __str__(self) -> str:
        return f"{self.session} turn {self.index}"


class ChatAnswer(models.Model):
    """One column's answer to a message: filled as it streams, final once `done`."""

    message = models.ForeignKey(ChatMessage, on_delete=models.CASCADE, related_name="answers")
    column = models.CharField(max_length=64)
    text = models.TextField(blank=True)
    done = models.BooleanField(default=False)
    stopped = models.BooleanField(default=False)
    tokens = models.PositiveIntegerField(default=0)
    first_token_s = models.FloatField(null=True, blank=True)
    seconds = models.FloatField(null=True, blank=True)
    error = models.TextField(blank=True)  # why it was not answered (e.g. longer than the model's context)

    class Meta:
        ordering = ["message__index", "id"]
        constraints = [models.UniqueConstraint(fields=["message", "column"], name="chatanswer_unique_column")]

    def __str__(self) -> str:
        return f"{self.message} · {self.column}"


class ChatThumb(models.Model):
    """A teammate's thumbs up or down on one answer of a chat: one per person per answer, changed in place."""

    answer = models.ForeignKey(ChatAnswer, on_delete=models.CASCADE, related_name="thumbs")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="chat_thumbs")
    up = models.BooleanField()
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["answer", "user"], name="chatthumb_once_per_answer")]

    def __str__(self) -> str:
        return f"{self.user_id} on {self.answer}: {'up' if self.up else 'down'}"
