"""The OpenAI fine-tuning subset at /v1/: files, fine_tuning/jobs (create, list, retrieve, cancel, pause, resume),
their events and checkpoints. Authenticated by the same API keys as /api/v1/ (as bearer tokens, the way the
`openai` package sends them); errors in OpenAI's shape (errors.py)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import IntegrityError
from django.db.models import QuerySet
from django.http import FileResponse
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from webapp.api.auth import ApiKeyAuthentication, ScopePermission
from webapp.api.idempotency import HEADER, run_idempotent
from webapp.api.negotiation import FirstRenderer
from webapp.api.openai import serializers as objects
from webapp.api.openai.errors import OpenAIError, error_response, exception_handler
from webapp.api.openai.jobs import create_job
from webapp.catalog.models import Dataset
from webapp.catalog.services import register_dataset, store
from webapp.ids import whole
from webapp.jobs import ledger
from webapp.jobs.models import RunState
from webapp.training.checkpoints import run_checkpoints
from webapp.training.models import RunEvent, TrainingRun
from workers.data.datasets import DatasetError

DEFAULT_LIMIT, MAX_LIMIT = 20, 100
FILES_DEFAULT_LIMIT, FILES_MAX_LIMIT = 100, 10000
PURPOSE = "fine-tune"


class OpenAIView(APIView):
    authentication_classes = [ApiKeyAuthentication]
    permission_classes = [ScopePermission]
    renderer_classes = [JSONRenderer]
    content_negotiation_class = FirstRenderer  # JSON whatever Accept says, as OpenAI's API answers
    parser_classes = [JSONParser]

    def get_exception_handler(self) -> Any:
        return exception_handler


def _limit(request: Request, default: int = DEFAULT_LIMIT, maximum: int = MAX_LIMIT) -> int:
    raw = request.query_params.get("limit")
    if raw in (None, ""):
        return default
    if not 1 <= (whole(raw, maximum) or 0):
        raise OpenAIError(400, f"limit must be an integer from 1 to {maximum}; got {raw!r}", "limit", "invalid_value")
    return int(raw)


def _after(request: Request, prefix: str, noun: str) -> int | None:
    raw = request.query_params.get("after")
    if not raw:
        return None
    try:
        return objects.parse_id(raw, prefix, noun)
    except OpenAIError as exc:
        raise OpenAIError(400, exc.message, "after", "invalid_value") from None


def _slice(rows: QuerySet[Any], limit: int) -> tuple[list[Any], bool]:
    found = list(rows[: limit + 1])
    return found[:limit], len(found) > limit


def _idempotent(request: Request, handler: Any) -> Any:
    """Idempotency-Key as on /api/v1/ (a retry replays the first response), its refusals in OpenAI's shape."""
    response = run_idempotent(request, handler)
    data = getattr(response, "data", None)
    if response.status_code >= 400 and isinstance(data, dict) and "detail" in data:
        headers = {name: response[name] for name in ("Retry-After",) if response.has_header(name)}
        return error_response(response.status_code, str(data["detail"]), HEADER, "idempotency_key", headers)
    return response


# --- files ---------------------------------------------------------------------------------------------


def _dataset_name(filename: str) -> str:
    """Dataset names are unique: the file's name, numbered when it is taken."""
    stem = filename[:180] or "upload.jsonl"
    name, n = stem, 1
    while Dataset.objects.filter(name=name).exists():
        n += 1
        name = f"{stem} ({n})"
    return name


class FileList(OpenAIView):
    parser_classes = [MultiPartParser, FormParser]

    def get(self, request: Request) -> Response:
        purpose = request.query_params.get("purpose")
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise OpenAIError(400, f"order must be asc or desc; got {order!r}", "order", "invalid_value")
        rows = Dataset.objects.order_by("id" if order == "asc" else "-id")
        if purpose and purpose != PURPOSE:
            rows = rows.none()  # every Tunedeck dataset is a fine-tune file
        after = _after(request, objects.FILE_PREFIX, "file")
        if after is not None:
            rows = rows.filter(id__gt=after) if order == "asc" else rows.filter(id__lt=after)
        found, more = _slice(rows, _limit(request, FILES_DEFAULT_LIMIT, FILES_MAX_LIMIT))
        return Response(objects.page([objects.file_object(d) for d in found], more))

    def post(self, request: Request) -> Any:
        return _idempotent(request, lambda: self._upload(request))

    def _upload(self, request: Request) -> Response:
        purpose = request.data.get("purpose")
        if purpose != PURPOSE:
            raise OpenAIError(400, f"purpose must be {PURPOSE!r} (the only kind of file Tunedeck keeps); got {purpose!r}",
                              "purpose", "invalid_value")
        upload = request.FILES.get("file")
        if upload is None:
            raise OpenAIError(400, "file is required: a JSONL training file sent as multipart form data",
                              "file", "missing_required_parameter")
        limit = settings.TUNEDECK_MAX_UPLOAD_MB * 2**20
        if upload.size > limit:
            raise OpenAIError(413, f"{upload.name} is {upload.size / 2**20:.1f} MB: the limit is "
                              f"{settings.TUNEDECK_MAX_UPLOAD_MB} MB", "file", "file_too_large")
        filename = upload.name or "upload.jsonl"
        for _ in range(3):
            try:
                dataset = register_dataset(_dataset_name(filename), filename, upload.file, request.user)
                break
            except DatasetError as exc:
                raise OpenAIError(400, str(exc), "file", "invalid_file") from None
            except ValueError as exc:  # an unknown file type
                raise OpenAIError(400, str(exc), "file", "invalid_file") from None
            except IntegrityError:  # the name was taken meanwhile: number it again
                continue
        else:
            raise OpenAIError(409, "could not name the dataset: retry the upload", "file", "conflict")
        return Response(objects.file_object(dataset), status=200)


def _dataset(file_id: str) -> Dataset:
    dataset = Dataset.objects.filter(pk=objects.parse_id(file_id, objects.FILE_PREFIX, "file")).first()
    if dataset is None:
        raise OpenAIError(404, f"No such File object: {file_id}", "id", "not_found")
    return dataset


class FileDetail(OpenAIView):
    def get(self, request: Request, file_id: str) -> Response:
        return Response(objects.file_object(_dataset(file_id)))


class FileContent(OpenAIView):
    def get(self, request: Request, file_id: str) -> Any:
        dataset = _dataset(file_id)
        try:
            path = store().path(dataset.uri)
        except ValueError:  # not in the artifact store
            path = None
        if path is None or not path.is_file():
            raise OpenAIError(404, f"the content of {file_id} is missing from the artifact store", "id", "not_found")
        return FileResponse(path.open("rb"), as_attachment=True,
                            filename=dataset.original_filename, content_type="application/octet-stream")


# --- jobs ----------------------------------------------------------------------------------------------


def _runs() -> QuerySet[TrainingRun]:
    return TrainingRun.objects.select_related(*objects.JOB_RELATED)


def _run(job_id: str) -> TrainingRun:
    run = _runs().filter(pk=objects.parse_id(job_id, objects.JOB_PREFIX, "fine-tuning job")).first()
    if run is None:
        raise OpenAIError(404, f"No such fine-tuning job: {job_id}", "fine_tuning_job_id", "not_found")
    return run


class JobList(OpenAIView):
    def get(self, request: Request) -> Response:
        rows = _runs().order_by("-id")
        after = _after(request, objects.JOB_PREFIX, "fine-tuning job")
        if after is not None:
            rows = rows.filter(id__lt=after)
        found, more = _slice(rows, _limit(request))
        return Response(objects.page([objects.job_object(r) for r in found], more))

    def post(self, request: Request) -> Any:
        return _idempotent(request, lambda: self._create(request))

    def _create(self, request: Request) -> Response:
        run = create_job(request.data, request.user)
        return Response(objects.job_object(_run(f"{objects.JOB_PREFIX}{run.pk}")), status=200)


class JobDetail(OpenAIView):
    def get(self, request: Request, job_id: str) -> Response:
        return Response(objects.job_object(_run(job_id)))


def _run_to_change(request: Request, job_id: str, verb: str) -> TrainingRun:
    run = _run(job_id)
    user = request.user
    if not (user.is_staff or run.owner_id == user.pk):
        raise OpenAIError(403, f"only the job's owner or an admin can {verb} it", None, "not_owner")
    return run


class JobCancel(OpenAIView):
    def post(self, request: Request, job_id: str) -> Response:
        run = _run_to_change(request, job_id, "cancel")
        if run.is_final:
            raise OpenAIError(400, f"the job has already {run.state}: nothing to cancel", None, "job_finished")
        ledger.request_cancel(run)
        return Response(objects.job_object(_run(job_id)))


class JobPause(OpenAIView):
    """A queued job is `paused` at once; a running one stays `running` until its worker has saved a checkpoint at
    its next step, then is `paused`, its GPU freed."""

    def post(self, request: Request, job_id: str) -> Response:
        run = _run_to_change(request, job_id, "pause")
        if not ledger.request_pause(run, request.user):
            status = objects.STATUSES.get(RunState(run.state), run.state)
            raise OpenAIError(400, f"the job is {status}: only a queued or running job can be paused", None,
                              "job_not_pausable")
        return Response(objects.job_object(_run(job_id)))


class JobResume(OpenAIView):
    """A paused job goes back to `queued`, in the place it held, and continues from its latest checkpoint."""

    def post(self, request: Request, job_id: str) -> Response:
        run = _run_to_change(request, job_id, "resume")
        if not ledger.resume(run, request.user):
            status = objects.STATUSES.get(RunState(run.state), run.state)
            raise OpenAIError(400, f"the job is {status}: only a paused job can be resumed", None, "job_not_paused")
        return Response(objects.job_object(_run(job_id)))


class JobEvents(OpenAIView):
    """The run's log lines, status changes, metric points and checkpoints, newest first."""

    def get(self, request: Request, job_id: str) -> Response:
        run = _run(job_id)
        rows = RunEvent.objects.filter(run=run).order_by("-id")
        after = _after(request, objects.EVENT_PREFIX, "event")
        if after is not None:
            rows = rows.filter(id__lt=after)
        found, more = _slice(rows, _limit(request))
        return Response(objects.page([objects.event_object(e) for e in found], more))


class JobCheckpoints(OpenAIView):
    """Each checkpoint the run still has (it keeps its last `keep_checkpoints` on disk), newest first, with the
    metrics at its step."""

    def get(self, request: Request, job_id: str) -> Response:
        run = _run(job_id)
        kept = [checkpoint["id"] for checkpoint in run_checkpoints(run).kept]
        rows = RunEvent.objects.filter(run=run, id__in=kept).order_by("-id")
        after = _after(request, objects.CHECKPOINT_PREFIX, "checkpoint")
        if after is not None:
            rows = rows.filter(id__lt=after)
        found, more = _slice(rows, _limit(request, 10))
        points = objects.points_at(run, {objects.checkpoint_step(e) for e in found})
        items = [objects.checkpoint_object(run, e, points.get(objects.checkpoint_step(e))) for e in found]
        return Response(objects.page(items, more))


class NotFound(OpenAIView):
    """Any other path under /v1/: a 404 in OpenAI's shape (after authentication, like the rest)."""

    def _missing(self, request: Request) -> Response:
        raise OpenAIError(404, f"Tunedeck does not serve {request.method} {request.path}: only files and "
                          "fine_tuning/jobs are available under /v1/", None, "unknown_url")

    get = post = put = patch = delete = _missing
